"""API errors and warnings that name the problem and the fix (issue 14, items 7 and 13): bad ``edits``, unknown
``pc.generate`` modes, negative weights in softmax mode, a latents batch that does not fit the prompts, prompts
past the token limit in heat maps and in edits."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import promptcontrol as pc
from promptcontrol.testing import clip_tokenizer
from promptcontrol.tokens import tokenize

FAST = dict(num_inference_steps=2, height=32, width=32)
# "wordN" with N >= 10 is three CLIP tokens (word, digit, digit): 25 of them fill the 75 prompt positions
FILLER = " ".join(f"word{i}" for i in range(10, 35))


def processors(pipe):
    return {k: type(v) for k, v in pipe.unet.attn_processors.items()}


# ---- item 7: API messages ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "edits, message",
    [
        (5, r"edits must be a prompt \(str\) or a list/tuple of prompts, got int: 5"),
        (None, r"edits must be a prompt .* got NoneType"),
        (["a dog", 3], r"every edit must be a prompt string; got item 1: int"),
    ],
)
def test_edit_names_the_edits_argument_and_the_accepted_types(sd15, edits, message):
    before = processors(sd15)
    with pytest.raises(TypeError, match=message):
        pc.edit(sd15, "a cat", edits, seed=0, output_type="latent", **FAST)
    assert processors(sd15) == before


@pytest.mark.parametrize("prompt", ["a red cat", "a (red:1.5) cat"])
def test_generate_refuses_an_unknown_mode_with_or_without_weights(sd15, prompt):
    before = processors(sd15)
    with pytest.raises(ValueError, match=r"mode must be one of 'attention', 'softmax', 'embedding'; got 'foo'"):
        pc.generate(sd15, prompt, mode="foo", seed=0, output_type="latent", **FAST)
    assert processors(sd15) == before


@pytest.mark.parametrize(
    "prompt, negative, word",
    [("a (red:-1) cat", None, "red"), ("a cat", "(blurry ugly:-0.5)", "blurry ugly"), ("a [(red:-1):blue:0.5] cat", None, "red")],
)
def test_softmax_mode_names_the_word_with_a_negative_weight(sd15, prompt, negative, word):
    with pytest.raises(ValueError, match=rf"'{word}' has the weight -[0-9.]+ in the prompt .*use mode='attention'"):
        pc.generate(sd15, prompt, negative_prompt=negative, mode="softmax", seed=0, output_type="latent", **FAST)


def test_reweight_calls_an_int_key_a_token_position():
    with pytest.raises(ValueError, match=r"the weight of token position 2 is -1.0, but mode='softmax'"):
        pc.Reweight({2: -1.0}, mode="softmax")
    with pytest.raises(ValueError, match=r"the weight of 'a' \(occurrence 2\) is nan"):
        pc.Reweight({("a", 2): float("nan")})


@pytest.mark.parametrize(
    "per_prompt, guidance, message",
    [
        (1, 7.5, r"2 prompt\(s\) × 1 image\(s\) per prompt = 2 image\(s\), but the latents hold 3 \(the UNet got 6 "
                 r"latent rows and 4 text rows, doubled for guidance\); pass latents \(or images\) with 2 row\(s\)"),
        (2, 1.0, r"2 prompt\(s\) × 2 image\(s\) per prompt = 4 image\(s\), but the latents hold 3 \(the UNet got 3 "
                 r"latent rows and 4 text rows\); pass latents \(or images\) with 4 row\(s\)"),
    ],
)
def test_trace_names_a_latents_batch_that_does_not_fit_the_prompts(sd15, per_prompt, guidance, message):
    before = dict(sd15.unet.attn_processors)
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=message):
        with pc.trace(sd15):
            sd15(["a red cat", "a dog"], latents=latents, num_images_per_prompt=per_prompt, guidance_scale=guidance,
                 output_type="latent", **FAST)
    assert dict(sd15.unet.attn_processors) == before


# ---- item 13: prompts past the token limit -------------------------------------------------------------------
def test_truncation_message_lists_each_word_once_and_tells_cut_from_partly_cut():
    from promptcontrol.heatmap import truncation_message

    # positions 1..2 "a cat", 3..74 the first 24 fillers, 75 the first token of "word34" (cut partly), then cut
    prompt = "a cat " + FILLER + " a dog cat giraffe giraffe"
    tokens = tokenize(clip_tokenizer(), prompt)
    message = truncation_message(tokens)
    assert "limit of 77 tokens" in message
    assert "the words cut off have no map: 'dog', 'giraffe';" in message  # 'giraffe' once
    assert "occurrences past the limit are not in the maps of 'a', 'cat' (their earlier ones are)" in message
    assert message.endswith("cut partly, mapped by their tokens before the limit only: 'word34'")
    assert [w.tokens for w in tokens.words if w.text == "word34"] == [(75,)]  # it keeps a map


def test_heatmaps_warning_keeps_a_partly_cut_word_out_of_the_no_map_list(sd15):
    prompt = "a cat " + FILLER + " zebra giraffe"  # "word34" keeps its first token (position 75)
    with pc.trace(sd15) as tr:
        sd15(prompt, output_type="latent", **FAST)
    with pytest.warns(UserWarning) as caught:
        maps = tr.heatmaps(0)
    message = next(str(w.message) for w in caught if "tokenizer's limit" in str(w.message))
    assert "no map: 'zebra', 'giraffe'" in message and "only: 'word34'" in message
    assert maps["word34"].positions == (75,)  # the partly cut word still has its map
    with pytest.raises(KeyError, match="cut off"):
        maps["zebra"]


def test_edit_whose_only_change_lies_past_the_token_limit_warns(sd15):
    source, edited = FILLER + " a red cat", FILLER + " a blue cat"
    with pytest.warns(UserWarning, match=r"edited prompt 1 .* differs from the source only past the tokenizer's "
                                         r"limit of 77 tokens.*changes nothing"):
        out = pc.edit(sd15, source, edited, seed=0, output_type="np", **FAST)
    np.testing.assert_array_equal(out.images[0], out.images[1])  # the warning is true: nothing changed


def test_edit_with_a_change_inside_the_limit_does_not_warn(sd15):
    source, edited = "a red cat " + FILLER, "a blue cat " + FILLER
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pc.edit(sd15, source, edited, seed=0, output_type="latent", **FAST)
    assert not [w for w in caught if "only past the tokenizer's limit" in str(w.message)]
