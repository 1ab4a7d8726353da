"""PixArt-Σ and Sana: cross-attention to T5 / Gemma tokens with an encoder attention mask (issue 17, part 2).

Every number is checked against stock diffusers or an explicit-softmax reference written here: pass-through equals
the stock processors (AttnProcessor2_0 on PixArt, SanaAttnProcessor2_0 on Sana's cross-attention), recorded maps
equal softmax(q·kᵀ/√d + mask) of the cross-attention inputs, weights and edits equal explicit processors.
"""

from __future__ import annotations

import functools
import inspect

import json
import math
import warnings

import pytest
import torch

import promptcontrol as pc
from promptcontrol.controllers.base import PassThrough
from promptcontrol.testing_dit import (
    GEMMA_TOKENIZER_DIR,
    T5_TOKENIZER_DIR,
    gemma_tokenizer,
    t5_tokenizer,
    tiny_pixart,
    tiny_sana,
)
from promptcontrol.tokens import tokenize

PIXART_SIZE = dict(height=24, width=32)  # latent 12×16, patch 2: a 6×8 token grid
SANA_SIZE = dict(height=32, width=64)  # latent 16×32, patch 1 (Sana needs multiples of 32)
COMMON = dict(use_resolution_binning=False, clean_caption=False, output_type="latent")


@pytest.fixture(scope="module")
def pixart():
    return tiny_pixart()


@pytest.fixture(scope="module")
def sana():
    return tiny_sana()


def _kwargs(pipe, steps=3, **extra):
    size = SANA_SIZE if type(pipe).__name__ == "SanaPipeline" else PIXART_SIZE
    out = dict(COMMON, num_inference_steps=steps, **size, **extra)
    if type(pipe).__name__ == "SanaPipeline":
        out["complex_human_instruction"] = None
    return out


def _latents(pipe, prompt, seed=0, **extra):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **_kwargs(pipe, **extra)).images


class CrossPassThrough(PassThrough):
    """Acts at every site attending the text and changes nothing."""

    def applies_to(self, site):
        return site.attends_text


class SoftmaxPassThrough(PassThrough):
    """Acts at every site whose processor is AttnProcessor2_0 (PixArt: all; Sana: cross only)."""

    def bind(self, session):
        modules = dict(session.unet.named_modules())
        self._keys = {
            s.key for s in session.sites
            if type(modules[s.module_path].processor).__name__ in ("AttnProcessor2_0", "SanaAttnProcessor2_0")
        }

    def applies_to(self, site):
        return site.key in self._keys


# ---- explicit references ----------------------------------------------------------------------------------------
class Explicit:
    """An explicit-softmax attention processor: probs = softmax(q·kᵀ/√d + mask) per head, then ``change``.

    ``change(name, step, probs (B, h, Q, K), q, k, logits) -> probs`` may rewrite the probabilities; ``step`` is
    read from the shared ``clock`` (one tick per denoiser call)."""

    def __init__(self, name, clock, change=None, qk_rows=None):
        self.name, self.clock, self.change, self.qk_rows = name, clock, change, qk_rows

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        batch = hidden_states.shape[0]
        text = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(text), attn.to_v(text)
        heads = attn.heads
        d = q.shape[-1] // heads
        q, k, v = (t.view(batch, -1, heads, d).transpose(1, 2) for t in (q, k, v))  # (B, h, T, d)
        if self.qk_rows is not None:
            rows = self.qk_rows(self.clock["step"])
            if rows is not None:
                q, k = q[rows], k[rows]
        logits = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, h, Q, K)
        if attention_mask is not None:
            logits = logits + attention_mask.reshape(batch, 1, 1, -1)  # the (B, 1, K) bias of the transformer
        probs = logits.softmax(-1)
        if self.change is not None:
            probs = self.change(self.name, self.clock["step"], probs, logits)
        out = (probs @ v).transpose(1, 2).reshape(batch, -1, heads * d)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def _with_processors(pipe, make, run):
    """Run ``run()`` with ``make(key) -> processor or None`` installed at each site; originals restored."""
    model = pipe.transformer
    originals = dict(model.attn_processors)
    clock = {"step": -1}

    def tick(module, args, kwargs):
        clock["step"] += 1

    handle = model.register_forward_pre_hook(tick, with_kwargs=True)
    try:
        model.set_attn_processor({k: make(k, clock) or p for k, p in originals.items()})
        return run()
    finally:
        handle.remove()
        model.set_attn_processor(dict(originals))


def assert_matches_reference(ours, expected):
    """Equal to an explicit-softmax reference up to float32 rounding: the random tiny models' latents grow to
    ~100 over the steps, so the bound is relative to their size (≤ 1e-6 of the largest value, and ≤ 1e-5)."""
    bound = max(1e-5, 1e-6 * float(expected.abs().max()))
    assert float((ours - expected).abs().max()) <= bound


def _is_cross(key):
    return key.endswith("attn2.processor")


# ---- 1. tokenizers -----------------------------------------------------------------------------------------------
def test_tokenizer_assets_are_small_and_rebuilt_identically():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_t5_tokenizer.py"
    spec = importlib.util.spec_from_file_location("make_t5_tokenizer", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for build, folder, load in ((module.build_t5, T5_TOKENIZER_DIR, t5_tokenizer), (module.build_gemma, GEMMA_TOKENIZER_DIR, gemma_tokenizer)):
        assert sum(p.stat().st_size for p in folder.iterdir()) < 100_000
        rebuilt = json.loads(build().backend_tokenizer.to_str())
        shipped = json.loads(load().backend_tokenizer.to_str())
        assert rebuilt["model"] == shipped["model"] and rebuilt["post_processor"] == shipped["post_processor"]


def test_t5_format_no_start_token_end_token_and_mask():
    tok = t5_tokenizer()
    assert type(tok).__name__ in ("T5TokenizerFast", "T5Tokenizer") and tok.model_max_length == 300
    enc = tok("a red circle", padding="max_length", max_length=8)
    assert enc["input_ids"][-5:] == [1, 0, 0, 0, 0] and enc["attention_mask"] == [1, 1, 1, 1, 0, 0, 0, 0]
    assert tok.convert_ids_to_tokens(enc["input_ids"][:3]) == ["▁a", "▁red", "▁circle"]
    assert len(tok("photorealistic")["input_ids"]) > 3  # unknown words split into pieces, like SentencePiece


def test_gemma_format_start_token_no_end_token():
    tok = gemma_tokenizer()
    enc = tok("a red circle", padding="max_length", max_length=6)
    assert tok.convert_ids_to_tokens(enc["input_ids"][:4]) == ["<bos>", "a", "▁red", "▁circle"]
    assert enc["input_ids"][4:] == [tok.pad_token_id] * 2 and enc["attention_mask"] == [1, 1, 1, 1, 0, 0]


def test_words_on_t5_start_at_position_zero():
    tokens = tokenize(t5_tokenizer(), "a red circle, photorealistic")
    assert [w.tokens for w in tokens.words][:3] == [(0,), (1,), (2,)]
    assert tokens.prompt_start == 0 and tokens.end_position == len(tokens.input_ids) - 1  # the </s>
    assert len(tokens.find("photorealistic")[0].tokens) > 1


def test_words_on_gemma_end_position_is_first_padding():
    tokens = tokenize(gemma_tokenizer(), "a red circle")
    assert [w.tokens for w in tokens.words] == [(1,), (2,), (3,)]
    assert tokens.end_position == 4 and tokens.padding_positions[0] == 4  # no end token: padding follows


@pytest.mark.parametrize("make", [t5_tokenizer, gemma_tokenizer])
def test_word_past_the_sequence_limit_is_reported(make):
    prompt = " ".join(["red"] * 310) + " circle"
    tokens = tokenize(make(), prompt)
    assert tokens.truncated and tokens.truncated[-1].text == "circle" and tokens.find("circle")[0].tokens == ()
    last = tokens.find("red")[-1]
    assert last.tokens == () and all(p <= 299 for w in tokens.words for p in w.tokens)
    assert len(tokens.input_ids) == 300  # what the pipelines' truncation keeps


# ---- 2/3. pipelines and pass-through ------------------------------------------------------------------------------
def test_sites_of_both_transformers(pixart, sana):
    for pipe, patch in ((pixart, 2), (sana, 1)):
        sites = pc.find_sites(pipe.transformer)
        assert [s.kind for s in sites] == ["self", "cross"] * 2 and all(s.patch == patch for s in sites)
        assert all(s.level == 0 and s.place == "transformer" for s in sites)


@pytest.mark.parametrize("which", ["pixart", "sana"])
@pytest.mark.parametrize("controller", [CrossPassThrough, SoftmaxPassThrough])
@pytest.mark.parametrize("guidance,prompts", [(4.5, "a red circle"), (1.0, ["a red circle", "a blue square and a green triangle", "red"])])
def test_pass_through_equals_stock(request, which, controller, guidance, prompts):
    pipe = request.getfixturevalue(which)
    stock = _latents(pipe, prompts, guidance_scale=guidance)
    before = dict(pipe.transformer.attn_processors)
    with pc.control(pipe, controller()):
        ours = _latents(pipe, prompts, guidance_scale=guidance)
    assert dict(pipe.transformer.attn_processors) == before
    assert stock.shape[0] == (1 if isinstance(prompts, str) else 3)
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["pixart", "sana"])
def test_encoder_mask_reaches_cross_attention_as_stock(request, which):
    """Padding matters (without the mask the output changes) and ours applies it exactly as stock."""
    pipe = request.getfixturevalue(which)
    seen = []

    def capture(key, clock):
        if not _is_cross(key):
            return None
        stock = type(pipe.transformer.attn_processors[key])()

        def proc(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
            seen.append(attention_mask)
            return stock(attn, hidden_states, encoder_hidden_states, attention_mask)

        return proc

    stock = _with_processors(pipe, capture, lambda: _latents(pipe, "a red circle", guidance_scale=4.5))
    mask = seen[0]  # (B, 1, K) bias: 0 on the tokens, -10000 on padding; rows [uncond "" | cond]
    length = {"pixart": (1, 4), "sana": (1, 4)}[which]  # T5: "" -> </s>; Gemma: "" -> <bos>
    assert mask.shape == (2, 1, 300)
    for row, n in enumerate(length):
        assert (mask[row, 0, :n] == 0).all() and (mask[row, 0, n:] == -10000).all()

    def unmasked(key, clock):
        if not _is_cross(key):
            return None
        stock_proc = type(pipe.transformer.attn_processors[key])()
        return lambda attn, h, e=None, attention_mask=None, **kw: stock_proc(attn, h, e, None)

    without = _with_processors(pipe, unmasked, lambda: _latents(pipe, "a red circle", guidance_scale=4.5))
    assert (without - stock).abs().max() > 1e-3
    with pc.control(pipe, CrossPassThrough()):
        ours = _latents(pipe, "a red circle", guidance_scale=4.5)
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=0)


def test_sana_qk_norm_across_heads_is_not_mirrored():
    """Sana 1.5's cross-attention normalises q/k across heads before the head split, which AttnProcessor2_0
    (and so promptcontrol's mirror) does not: refused by name at install, nothing installed."""
    pipe = tiny_sana(qk_norm="rms_norm_across_heads")
    with pytest.raises(NotImplementedError, match="across all heads.*rms_norm_across_heads"):
        with pc.control(pipe, CrossPassThrough()):
            _latents(pipe, "a red circle", steps=1)
    assert all(type(p).__name__.startswith("Sana") for p in pipe.transformer.attn_processors.values())


# ---- 4. maps ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which,grid", [("pixart", (6, 8)), ("sana", (16, 32))])
def test_recorded_maps_equal_explicit_softmax(request, which, grid):
    pipe = request.getfixturevalue(which)
    prompt = "a red circle and a blue square"
    reference = {}

    def keep(name, step, probs, logits):
        cond = probs[1:].mean(dim=1)[0]  # guidance on: rows [uncond | cond]; head mean (Q, K)
        reference[name] = reference.get(name, 0) + cond
        return probs

    def make(key, clock):
        return Explicit(key, clock, keep) if _is_cross(key) else None

    stock = _with_processors(pipe, make, lambda: _latents(pipe, prompt, guidance_scale=4.5))
    with pc.trace(pipe, dtype=torch.float32, max_side=None) as tr:
        ours = _latents(pipe, prompt, guidance_scale=4.5)
    assert_matches_reference(ours, stock)  # explicit softmax on both sides
    rec = tr.store.recording(0)
    tokens = rec.prompt_tokens()
    assert rec.latent_hw == (grid[0] * (2 if which == "pixart" else 1), grid[1] * (2 if which == "pixart" else 1))
    for site in rec.sites:
        assert rec.grids[site.key] == grid
        mean = rec.sums[site.key].float() / rec.counts[site.key]  # (Q, K): mean over steps and heads
        torch.testing.assert_close(mean, reference[site.key] / len(rec.steps), atol=1e-6, rtol=1e-4)
        pad = list(tokens.padding_positions)
        assert float(mean[:, pad].abs().max()) == 0.0  # padded keys: zero mass
    maps = tr.heatmaps()
    circle = maps["circle"]
    assert tuple(circle.shape) == tuple((PIXART_SIZE if which == "pixart" else SANA_SIZE).values())
    first = 0 if which == "pixart" else 1  # T5: no start token; Gemma: <bos> at 0
    assert [w.tokens for w in maps.tokens.words] == [(first + i,) for i in range(7)]  # the last word too
    assert circle.positions == (first + 2,)
    missing = "start" if which == "pixart" else "end"  # T5 has no start token, Gemma no end token
    with pytest.raises(KeyError, match=f"no {missing} token"):
        maps.special(missing)
    assert maps.special("padding").positions[0] == tokens.end_position + (1 if which == "pixart" else 0)
    torch.testing.assert_close(maps.token(first + 2).tensor, circle.tensor)


# ---- 5. weights and edits -----------------------------------------------------------------------------------------
RED = {"pixart": 1, "sana": 2}  # position of "red" in "a red car": T5 has no start token, Gemma has <bos>


@pytest.mark.parametrize("which", ["pixart", "sana"])
@pytest.mark.parametrize("mode", ["attention", "softmax"])
def test_weights_equal_explicit_reference(request, which, mode):
    pipe = request.getfixturevalue(which)
    red, w = RED[which], 1.6

    def weigh(name, step, probs, logits):
        probs = probs.clone()
        if mode == "attention":  # the equalizer: the word's probabilities × w, not renormalised
            probs[1:, :, :, red] *= w
        else:  # renormalised: logit bias log w
            biased = logits[1:].clone()
            biased[..., red] += math.log(w)
            probs[1:] = biased.softmax(-1)
        return probs  # row 0 (unconditional) untouched

    expected = _with_processors(
        pipe, lambda k, c: Explicit(k, c, weigh) if _is_cross(k) else None,
        lambda: _latents(pipe, "a red car", guidance_scale=4.5),
    )
    plain = _latents(pipe, "a red car", guidance_scale=4.5)
    ours = pc.generate(pipe, "a (red:1.6) car", mode=mode, seed=0, guidance_scale=4.5, negative_prompt="", **_kwargs(pipe))
    assert (expected - plain).abs().max() > 1e-4  # the weight changes the result
    assert_matches_reference(ours, expected)


@pytest.mark.parametrize("which", ["pixart", "sana"])
def test_embedding_mode_weights_the_text_features(request, which):
    """A1111 emphasis on T5 / Gemma features: the word's feature row × w, then the row mean restored (the
    padded rows count in the mean, as on CLIP, where the pipeline's features include them)."""
    pipe = request.getfixturevalue(which)
    red, w = RED[which], 1.6
    captured = {}

    def hook(module, args):  # the text features as the transformer receives them, before its caption projection
        captured.setdefault("text", args[0].clone())

    handle = pipe.transformer.caption_projection.register_forward_pre_hook(hook)
    try:
        ours = pc.generate(pipe, "a (red:1.6) car", mode="embedding", seed=0, guidance_scale=4.5, negative_prompt="",
                           **_kwargs(pipe))
    finally:
        handle.remove()
    extra = {"complex_human_instruction": None} if which == "sana" else {"clean_caption": False}
    text = pipe.encode_prompt("a red car", do_classifier_free_guidance=True, num_images_per_prompt=1,
                              device="cpu", max_sequence_length=300, **extra)
    cond = text[0][0]  # (K, C)
    weighted = cond.clone()
    weighted[red] *= w
    if cond.mean().abs() > 1e-4 * cond.abs().mean():  # the mean is restored unless ~0
        weighted *= cond.mean() / weighted.mean()
    assert (weighted - cond).abs().max() > 1e-3
    torch.testing.assert_close(captured["text"][1], weighted, atol=1e-5, rtol=1e-5)
    assert ours.shape[0] == 1


@pytest.mark.parametrize("which", ["pixart", "sana"])
def test_edit_equals_explicit_prompt_to_prompt(request, which):
    """pc.edit: cross-attention of the edited row = the source row's map (Replace, same word count, one token
    each: the identity alignment) on the first 80% of steps; on PixArt its self-attention (attn1, every block:
    a transformer's sites are all level 0) = softmax(q_src·k_srcᵀ) @ v_edit on the first 40% (Sana's linear
    self-attention is not injected: self_steps=0 there)."""
    pipe = request.getfixturevalue(which)
    steps = 5  # cross on steps 0..3, self on 0..1
    self_steps = 0.4 if which == "pixart" else 0
    latent_hw = (12, 16) if which == "pixart" else (16, 32)
    latents = torch.randn(1, 4, *latent_hw, generator=torch.Generator().manual_seed(3))

    def swap_cross(name, step, probs, logits):
        if step >= 4:
            return probs
        probs = probs.clone()
        probs[3] = probs[2]  # rows [uncond src, uncond edit, cond src, cond edit]
        return probs

    def self_rows(step):
        return torch.tensor([0, 1, 2, 2]) if step < 2 else None

    def make(key, clock):
        if _is_cross(key):
            return Explicit(key, clock, swap_cross)
        return Explicit(key, clock, qk_rows=self_rows) if self_steps else None

    kwargs = _kwargs(pipe, steps=steps, guidance_scale=4.5)
    expected = _with_processors(
        pipe, make, lambda: pipe(["a red car", "a blue car"], latents=latents.repeat(2, 1, 1, 1), **kwargs).images
    )
    before = dict(pipe.transformer.attn_processors)
    out = pc.edit(pipe, "a red car", "a blue car", cross_steps=0.8, self_steps=self_steps, latents=latents, **kwargs)
    assert dict(pipe.transformer.attn_processors) == before
    ours = torch.stack([torch.as_tensor(out.source), torch.as_tensor(out.edited[0] if isinstance(out.edited, list) else out.edited)])
    assert_matches_reference(ours, expected)
    plain = pipe("a blue car", latents=latents, **kwargs).images
    assert (expected[1] - plain[0]).abs().max() > 1e-4  # the edit changes the edited image


def test_edit_on_sana_skips_linear_self_attention_with_a_warning(sana):
    latents = torch.randn(1, 4, 16, 32, generator=torch.Generator().manual_seed(3))
    kwargs = _kwargs(sana, steps=2, guidance_scale=4.5)
    with pytest.warns(UserWarning, match="SanaLinearAttnProcessor2_0"):
        pc.edit(sana, "a red car", "a blue car", cross_steps=0.8, self_steps=0.4, latents=latents, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pc.edit(sana, "a red car", "a blue car", cross_steps=0.8, self_steps=0, latents=latents, **kwargs)


# ---- 6. bad input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["pixart", "sana"])
def test_word_past_max_sequence_length_is_named(request, which):
    pipe = request.getfixturevalue(which)
    prompt = " ".join(["red"] * 305) + " circle"
    with pc.trace(pipe) as tr:
        _latents(pipe, prompt, steps=1, guidance_scale=1.0)
    with pytest.warns(UserWarning, match="circle"):
        maps = tr.heatmaps()
    with pytest.raises(KeyError, match="cut off"):
        maps["circle"]
    with pytest.warns(UserWarning, match="circle' fall past the 300-token limit"):
        pc.generate(pipe, " ".join(["red"] * 305) + " (circle:1.5) car", seed=0, negative_prompt="", **_kwargs(pipe, steps=1))


def test_weight_on_the_last_word_on_gemma():
    from promptcontrol.prompt_syntax import parse_prompt

    assert parse_prompt("a red (car:1.6)").token_weights(gemma_tokenizer()) == {3: 1.6}


def test_sana_complex_human_instruction_is_refused_clearly(sana):
    kwargs = _kwargs(sana, steps=1)
    del kwargs["complex_human_instruction"]  # the pipeline's default: a long instruction before the prompt
    before = dict(sana.transformer.attn_processors)
    with pytest.raises(ValueError, match="complex_human_instruction=None"):
        with pc.trace(sana):
            sana("a red circle", **kwargs)
    assert dict(sana.transformer.attn_processors) == before and "encode_prompt" not in vars(sana)


@pytest.mark.parametrize("which", ["pixart", "sana"])
def test_shorter_max_sequence_length_is_followed(request, which):
    """The text length the cross-attention saw (max_sequence_length=12 here) sets the token limit, not the
    tokenizer's 300: the word past it is named, and no "pads to 300 tokens" warning."""
    pipe = request.getfixturevalue(which)
    prompt = "a red circle and a blue square and a green triangle on the left of a yellow square"
    with pc.trace(pipe) as tr:
        _latents(pipe, prompt, steps=1, guidance_scale=1.0, max_sequence_length=12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maps = tr.heatmaps()
    messages = " ".join(str(w.message) for w in caught)
    assert "yellow" in messages and "pads to" not in messages
    assert maps.tokens.max_length == 12 and maps["green"].positions
    with pytest.raises(KeyError, match="cut off"):
        maps["yellow"]


@pytest.mark.parametrize("which", ["pixart", "sana"])
def test_prompt_editing_swaps_the_text_features_and_their_attention_mask(request, which):
    """pc.generate "a [red:light blue:0.5] circle" (4 steps): from step 2 on the conditional row's text features
    AND its encoder attention mask are those of "a light blue circle" by the pipeline's own encode_prompt (one
    token longer than "a red circle": the old mask would hide its last word)."""
    pipe = request.getfixturevalue(which)
    run = _kwargs(pipe, steps=4, max_sequence_length=16)
    extra = {"complex_human_instruction": None} if which == "sana" else {"clean_caption": False}
    new, new_mask, _, _ = pipe.encode_prompt("a light blue circle", do_classifier_free_guidance=False,
                                             max_sequence_length=16, **extra)
    old_mask = pipe.encode_prompt("a red circle", do_classifier_free_guidance=False, max_sequence_length=16,
                                  **extra)[1]
    assert not torch.equal(new_mask, old_mask)
    seen = []
    forward = pipe.transformer.forward

    @functools.wraps(forward)  # the session binds the inputs by this signature
    def grab(*args, **kwargs):  # runs after every forward pre-hook: the inputs the transformer gets
        named = inspect.signature(forward).bind(*args, **kwargs).arguments
        seen.append((named["encoder_hidden_states"][-1].clone(), named["encoder_attention_mask"][-1].clone()))
        return forward(*args, **kwargs)

    pipe.transformer.forward = grab
    try:
        pc.generate(pipe, "a [red:light blue:0.5] circle", seed=0, **run)
    finally:
        del pipe.transformer.forward
    assert len(seen) == 4
    for step, (text, mask) in enumerate(seen):
        expected_mask = new_mask[0] if step >= 2 else old_mask[0]
        assert torch.equal(mask.to(expected_mask.dtype), expected_mask), step
    torch.testing.assert_close(seen[3][0], new[0].to(seen[3][0].dtype))
