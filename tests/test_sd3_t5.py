"""SD3 with its T5 encoder loaded (issue 17): text keys [CLIP 77 | T5 max_sequence_length]; a word's tokens in both
segments for heat maps and weights; the clear error without T5; pass-through still stock."""

from __future__ import annotations

import contextlib

import pytest
import torch

import promptcontrol as pc
from promptcontrol.prompt_syntax import parse_prompt
from promptcontrol.testing_sd3 import tiny_sd3
from promptcontrol.tokens import SegmentedTokenizer, SegmentedTokens, text_key_weights, tokenize, word_tokenizer

T5_LENGTH = 8
RUN = dict(height=32, width=48, num_inference_steps=2, max_sequence_length=T5_LENGTH, output_type="latent")
GRID = (8, 12)  # 32×48 pixels / vae factor 2 / patch 2
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def sd3_t5():
    return tiny_sd3(dual=(0,), t5=True)


@pytest.fixture(scope="module")
def sd3_plain():
    return tiny_sd3(dual=(0,))


def _generator():
    return torch.Generator().manual_seed(0)


# ---- independent references: token ids of each tokenizer, found by their token strings ------------------------
def _clip_positions(pipe, word, prompt=PROMPT):
    ids = pipe.tokenizer(prompt).input_ids
    return [i for i, t in enumerate(ids) if t == pipe.tokenizer.convert_tokens_to_ids(f"{word}</w>")]


def _t5_positions(pipe, word, prompt=PROMPT):
    ids = pipe.tokenizer_3(prompt).input_ids  # T5: no start token, the prompt starts at key 77
    return [77 + i for i, t in enumerate(ids) if t == pipe.tokenizer_3.convert_tokens_to_ids(f"▁{word}")]


# ---- 1. the token layout ------------------------------------------------------------------------------------
def test_a_word_holds_its_clip_positions_and_its_t5_positions_offset_by_77(sd3_t5):
    tokenizer = word_tokenizer(sd3_t5)
    assert isinstance(tokenizer, SegmentedTokenizer)
    tokens = tokenizer.tokenize(PROMPT, 77 + T5_LENGTH)
    assert isinstance(tokens, SegmentedTokens) and tokens.max_length == 77 + T5_LENGTH
    for word in ("red", "circle"):
        expected = _clip_positions(sd3_t5, word) + _t5_positions(sd3_t5, word)
        assert len(expected) == 2 and tokens.positions(word) == expected
    # padding of either segment and both end tokens are no word
    clip_end, t5_end = len(sd3_t5.tokenizer(PROMPT).input_ids) - 1, 77 + len(sd3_t5.tokenizer_3(PROMPT).input_ids) - 1
    word_positions = {p for w in tokens.words for p in w.tokens}
    assert tokens.end_position == clip_end
    assert set(tokens.padding_positions) == set(range(clip_end + 1, 77)) | set(range(t5_end + 1, 77 + T5_LENGTH))
    assert not word_positions & ({0, clip_end, t5_end} | set(tokens.padding_positions))
    # every user of one tokenizer still sees CLIP (edits, the weight syntax)
    assert tokenize(tokenizer, PROMPT) == tokenize(sd3_t5.tokenizer, PROMPT)


def test_the_t5_segment_is_cut_at_the_calls_max_sequence_length(sd3_t5):
    tokens = word_tokenizer(sd3_t5).tokenize("a red circle and a blue square", 77 + 4)  # T5 keeps 3 words + </s>
    assert tokens.positions("red") == _clip_positions(sd3_t5, "red") + [78]
    assert tokens.positions("square") == _clip_positions(sd3_t5, "square", "a red circle and a blue square")
    assert [w.text for w in tokens.truncated] == ["and", "a", "blue", "square"]
    assert tokens.only("t5").positions("square") == []


# ---- 2. heat maps -----------------------------------------------------------------------------------------------
def _mean_site_maps(recording):
    """(K, h, w): the mean over the recorded sites of sums / counts, from the recording's raw tensors."""
    maps = [
        (recording.sums[s.key] / recording.counts[s.key]).T.reshape(-1, *recording.grids[s.key])  # (Q, K) -> (K, h, w)
        for s in recording.sites
    ]
    return torch.stack(maps).mean(0)


@pytest.fixture(scope="module")
def traced(sd3_t5):
    with pc.trace(sd3_t5) as tr:
        sd3_t5(PROMPT, generator=_generator(), **RUN)
    return tr


def test_recorded_word_maps_sum_the_clip_and_t5_columns(sd3_t5, traced):
    recording = traced.store.recording(0)
    assert recording.num_tokens == 77 + T5_LENGTH and {s.level for s in recording.sites} == {0}
    reference = _mean_site_maps(recording)  # (K, 8, 12)
    clip, t5 = _clip_positions(sd3_t5, "red"), _t5_positions(sd3_t5, "red")
    default = traced.heatmaps(size=GRID, normalize=None)
    cases = {"both": clip + t5, "clip": clip, "t5": t5}
    for segment, columns in cases.items():
        maps = traced.heatmaps(size=GRID, normalize=None, segment=segment)
        assert maps.words == ["a", "red", "circle"]
        torch.testing.assert_close(maps["red"].to_tensor(), reference[columns].sum(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(default["red"].to_tensor(), reference[clip + t5].sum(0), atol=1e-6, rtol=1e-5)
    assert float(reference[t5].sum()) > 1e-3  # the T5 columns carry mass: "both" differs from "clip"


def test_segment_views_keep_their_own_special_tokens(traced):
    t5 = traced.heatmaps(segment="t5")
    with pytest.raises(KeyError, match="no start token"):
        t5.special("start")
    end = 77 + len(t5.tokens.segments[0].tokens.input_ids) - 1
    assert t5.special("end").positions == (end,)
    assert t5.special("padding").positions == tuple(range(end + 1, 77 + T5_LENGTH))
    with pytest.raises(ValueError, match="segment must be one of"):
        traced.heatmaps(segment="T5")


def test_a_t5_segment_without_a_t5_encoder_is_a_clear_error(sd3_plain):
    with pc.trace(sd3_plain) as tr:
        sd3_plain(PROMPT, generator=_generator(), **RUN)
    for segment in ("t5", "both"):
        with pytest.raises(ValueError, match="no T5 encoder is loaded.*segment='clip'"):
            tr.heatmaps(segment=segment)
    clip = tr.heatmaps(segment="clip", size=GRID, normalize=None)
    torch.testing.assert_close(clip["red"].to_tensor(), tr.heatmaps(size=GRID, normalize=None)["red"].to_tensor())
    with pc.control(sd3_plain, pc.Reweight({80: 2.0})), pytest.raises(ValueError, match="T5 segment.*no T5 encoder"):
        sd3_plain(PROMPT, generator=_generator(), **RUN)


# ---- 3. weights -------------------------------------------------------------------------------------------------
def _split(x, heads):
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)  # (B, heads, n, d)


def _merge(x):
    return x.transpose(1, 2).reshape(x.shape[0], -1, x.shape[1] * x.shape[-1])  # (B, n, heads·d)


@contextlib.contextmanager
def _joint_calls(model):
    """(module, hidden, context, output) of every joint-attention call (modules ending in ``.attn``)."""
    calls, handles = [], []
    for name, module in model.named_modules():
        if name.endswith(".attn"):
            def hook(mod, args, kwargs, out):
                calls.append((mod, kwargs["hidden_states"], kwargs["encoder_hidden_states"], out))

            handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _equalizer_reference(attn, hidden, context, weights):
    """The image output of P2P's equalizer on the joint softmax, explicitly: probabilities (B, heads, Q, N + K),
    the text keys' part times ``weights`` (B, K), not renormalised."""
    h = attn.heads
    q, k, v = (_split(f(hidden), h) for f in (attn.to_q, attn.to_k, attn.to_v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    kt, vt = (_split(f(context), h) for f in (attn.add_k_proj, attn.add_v_proj))
    kt = attn.norm_added_k(kt)
    logits = torch.cat([q @ k.transpose(-1, -2), q @ kt.transpose(-1, -2)], -1) * q.shape[-1] ** -0.5
    p = torch.softmax(logits.double(), -1).float()
    n = k.shape[2]
    img = p[..., :n] @ v + (p[..., n:] * weights[:, None, None, :]) @ vt
    return attn.to_out[1](attn.to_out[0](_merge(img)))


def test_a_word_weight_scales_its_columns_in_both_segments(sd3_t5):
    w = 1.6
    columns = _clip_positions(sd3_t5, "red") + _t5_positions(sd3_t5, "red")
    with _joint_calls(sd3_t5.transformer) as calls, pc.control(sd3_t5, pc.Reweight({"red": w})):
        sd3_t5(PROMPT, guidance_scale=4.0, generator=_generator(), **RUN)
    assert len(calls) == 3 * RUN["num_inference_steps"]
    for attn, hidden, context, out in calls:
        weights = torch.ones(hidden.shape[0], context.shape[1])
        weights[1, columns] = w  # row 1: the conditional row of [uncond | cond]
        with torch.no_grad():
            expected = _equalizer_reference(attn, hidden, context, weights)
        torch.testing.assert_close(out[0], expected, atol=2e-5, rtol=1e-4)


def test_weight_syntax_positions_cover_both_segments(sd3_t5):
    tokenizer = word_tokenizer(sd3_t5)
    parsed = parse_prompt("a (red:1.6) circle")
    weights = text_key_weights(tokenizer, parsed.token_weights, T5_LENGTH)
    expected = _clip_positions(sd3_t5, "red") + _t5_positions(sd3_t5, "red")
    assert weights == {p: 1.6 for p in expected}
    assert text_key_weights(sd3_t5.tokenizer, parsed.token_weights) == {_clip_positions(sd3_t5, "red")[0]: 1.6}
    cut = parse_prompt("a red circle and a (blue:2) square")  # T5 keeps 3 words at max_sequence_length 4
    assert all(p < 77 for p in text_key_weights(tokenizer, cut.token_weights, 4))


# ---- pass-through --------------------------------------------------------------------------------------------
def test_pass_through_with_t5_equals_stock(sd3_t5):
    stock = sd3_t5(PROMPT, guidance_scale=4.0, generator=_generator(), **RUN).images
    with pc.control(sd3_t5, pc.PassThrough()):
        controlled = sd3_t5(PROMPT, guidance_scale=4.0, generator=_generator(), **RUN).images
    torch.testing.assert_close(controlled, stock, atol=1e-5, rtol=0)
    assert sd3_t5.text_encoder_3 is not None  # the T5 segment is T5's features, not zeros


def test_generate_weight_syntax_weights_the_word_in_both_segments(sd3_t5):
    """pc.generate "(red:1.6)" = pc.Reweight({"red": 1.6}) (which finds the word's CLIP and T5 tokens) on the plain
    prompt, and differs from weighting the CLIP segment alone (positions < 77)."""
    weighted = pc.generate(sd3_t5, "a (red:1.6) circle", seed=0, **RUN)
    with pc.control(sd3_t5, pc.Reweight({"red": 1.6})):
        expected = sd3_t5(PROMPT, generator=_generator(), **RUN).images
    torch.testing.assert_close(torch.as_tensor(weighted), expected, atol=1e-6, rtol=0)
    clip_only = {p: 1.6 for p in _clip_positions(sd3_t5, "red")}
    with pc.control(sd3_t5, pc.Reweight(clip_only)):
        clip_image = sd3_t5(PROMPT, generator=_generator(), **RUN).images
    assert not torch.allclose(torch.as_tensor(weighted), clip_image, atol=1e-6)


def test_a_different_prompt_3_is_named_when_maps_are_read(sd3_t5):
    """SD3 encodes T5 from prompt_3: when it differs from prompt, the T5 segment's word positions (read from prompt)
    may be wrong, and reading the maps says so; the same prompt_3 says nothing."""
    import warnings

    with pc.trace(sd3_t5) as tr:
        sd3_t5(PROMPT, prompt_3="a blue square", generator=_generator(), **RUN)
        sd3_t5(PROMPT, prompt_3=PROMPT, generator=_generator(), **RUN)
    with pytest.warns(UserWarning, match=r"different prompt_3 \('a blue square'\).*segment='clip'"):
        tr.heatmaps(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr.heatmaps(1)
