"""Token alignment between prompt pairs (replace spreading, refine LCS), batch-row pairing, step schedules."""

from __future__ import annotations

import pytest
import torch

from promptcontrol.alignment import edit_images, edit_rows, refine_map, replace_map
from promptcontrol.context import RunInfo, batch_layout
from promptcontrol.schedule import Window, schedule, window
from promptcontrol.testing import clip_tokenizer
from promptcontrol.tokens import tokenize


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


def pairs(matrix):
    """Nonzero entries {(source, edit): value} of an alignment matrix, prompt part only (first 12 positions)."""
    return {(int(i), int(j)): float(matrix[i, j]) for i, j in torch.nonzero(matrix[:12, :12])}


def test_replace_same_token_count_is_the_identity(tok):
    m = replace_map(tokenize(tok, "a red circle"), tokenize(tok, "a blue circle"))
    assert torch.equal(m.matrix, torch.eye(77))
    assert torch.equal(m.alpha, torch.ones(77))


def test_replace_spreads_a_word_over_more_tokens(tok):
    src, dst = tokenize(tok, "a red circle, and a square"), tokenize(tok, "a photorealistic circle, and a square")
    assert dst.find("photorealistic")[0].tokens == (2, 3)
    m = replace_map(src, dst)
    expected = {(0, 0): 1, (1, 1): 1, (2, 2): 0.5, (2, 3): 0.5}  # red → photo + realistic, half each
    expected.update({(i, i + 1): 1 for i in range(3, 11)})  # circle , and a square <end> padding: shifted by one
    assert pairs(m.matrix) == expected
    assert torch.allclose(m.matrix.sum(1)[:8], torch.ones(8))  # every source token's attention is passed on whole
    assert m.matrix[75, 76] == 1 and m.matrix[:, 76].sum() == 1  # padding stays shifted up to the last slot


def test_replace_merges_several_tokens_into_one(tok):
    src, dst = tokenize(tok, "a photorealistic circle"), tokenize(tok, "a red circle")
    m = replace_map(src, dst)
    assert pairs(m.matrix)[(2, 2)] == 1.0 and pairs(m.matrix)[(3, 2)] == 1.0  # both source tokens into "red"
    assert m.matrix[4, 3] == 1  # circle after the merged word


def test_replace_refuses_different_word_counts_and_names_refine(tok):
    with pytest.raises(ValueError, match=r"3 words \(a red circle\).*4 \(a big red circle\).*pc\.Refine"):
        replace_map(tokenize(tok, "a red circle"), tokenize(tok, "a big red circle"))


def test_refine_aligns_common_tokens_and_marks_new_ones(tok):
    src, dst = tokenize(tok, "a cat on grass"), tokenize(tok, "a fluffy cat on green grass")
    m = refine_map(src, dst)
    expected = {(0, 0): 1, (1, 1): 1, (2, 3): 1, (3, 4): 1, (4, 6): 1, (5, 7): 1}
    expected.update({(i, i + 2): 1 for i in range(6, 10)})  # padding after the end token
    assert pairs(m.matrix) == expected
    assert m.alpha[:9].tolist() == [1, 1, 0, 1, 1, 0, 1, 1, 1]


def test_refine_with_removed_words(tok):
    m = refine_map(tokenize(tok, "a big red cat"), tokenize(tok, "a cat"))
    assert pairs(m.matrix) == {(0, 0): 1, (1, 1): 1, (4, 2): 1, (5, 3): 1, **{(i + 2, i): 1 for i in range(4, 10)}}
    assert torch.equal(m.alpha, torch.ones(77))


@pytest.mark.parametrize("align", [replace_map, refine_map])
def test_a_prompt_aligned_with_itself_is_the_identity(tok, align):
    tokens = tokenize(tok, "a cat")
    m = align(tokens, tokens)
    assert torch.equal(m.matrix, torch.eye(77))
    assert torch.equal(m.alpha, torch.ones(77))


@pytest.mark.parametrize("cfg", [True, False])
def test_edit_rows_pair_each_edit_with_the_source(cfg):
    run = RunInfo(prompts=["s", "e1", "e2"], images_per_prompt=2, cfg=cfg)
    layout = batch_layout(12 if cfg else 6, run)
    offset = 6 if cfg else 0
    assert edit_rows(layout) == [(offset + 2, offset + 0), (offset + 3, offset + 1), (offset + 4, offset + 0), (offset + 5, offset + 1)]
    assert edit_images(layout) == [(2, 0), (3, 1), (4, 0), (5, 1)]


def test_windows_count_steps():
    w = window(0.8)
    assert w == Window(0.0, 0.8)
    assert [i for i in range(50) if w.contains(i, 50)] == list(range(40))
    assert [i for i in range(10) if window((0.3, 0.7)).contains(i, 10)] == [3, 4, 5, 6]
    assert not any(window(0).contains(i, 10) for i in range(10))
    assert all(window(1.0).contains(i, 3) for i in range(3))


@pytest.mark.parametrize(
    "value, error, message",
    [
        (1.2, ValueError, r"outside \[0, 1\]"),
        (-0.5, ValueError, r"outside \[0, 1\]"),
        ((0.5, 0.2), ValueError, "start is after end"),
        ((0.1, 0.2, 0.3), ValueError, r"\(start, end\)"),
        ("half", TypeError, "must be a number"),
        (True, TypeError, "must be a number"),
    ],
)
def test_bad_windows_are_refused(value, error, message):
    with pytest.raises(error, match=message):
        window(value, "cross_steps")


def test_per_word_schedules():
    s = schedule({"green": (0.2, 0.6), "default": 0.5}, default=0.8)
    assert s.default == Window(0.0, 0.5) and s.words == (("green", Window(0.2, 0.6)),)
    assert schedule({"green": 0.3}, default=0.8).default == Window(0.0, 0.8)  # no "default": the caller's default
    with pytest.raises(TypeError, match="cross_steps only"):
        schedule({"green": 0.3}, default=0.4, what="self_steps", per_word=False)
    with pytest.raises(ValueError, match=r"cross_steps\['green'\] = 2.0 is outside"):
        schedule({"green": 2.0}, default=0.8)
