"""``pc.edit`` end to end on a tiny pipeline: same noise, source untouched, identity edits, blend, reweight, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import promptcontrol as pc
from promptcontrol.sites import attention_modules

STEPS = 3
SRC = "a red circle and a blue square"
EDIT = "a green circle and a blue square"


def alone(pipe, prompt, seed=0, **kwargs):
    """The prompt generated on its own from the same starting noise as pc.edit(seed=seed)."""
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    return pipe(prompt, latents=latents, num_inference_steps=STEPS, output_type="np", **kwargs).images[0]


def processors(pipe):
    return {k: type(v) for k, v in pipe.unet.attn_processors.items()}


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_zero_steps_gives_each_prompt_as_generated_alone(sd15, guidance):
    out = pc.edit(
        sd15, SRC, [EDIT, "a red circle on grass"], cross_steps=0, self_steps=0, seed=0,
        num_inference_steps=STEPS, output_type="np", guidance_scale=guidance,
    )
    for prompt, image in zip(out.prompts, out.images):
        np.testing.assert_allclose(image, alone(sd15, prompt, guidance_scale=guidance), atol=1e-5)


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_edit_never_changes_the_source_row(sd15, guidance):
    before = processors(sd15)
    out = pc.edit(
        sd15, SRC, [EDIT, "a red circle and a big blue square"], cross_steps=1.0, self_steps=1.0, blend=["circle"],
        reweight=[{"green": 2.0}, {"big": 0.5}], seed=0, num_inference_steps=STEPS, output_type="np",
        guidance_scale=guidance,
    )
    np.testing.assert_allclose(out.source, alone(sd15, SRC, guidance_scale=guidance), atol=1e-5)
    assert not np.allclose(out.edited[0], out.source, atol=1e-3)  # the edit did change its own image
    assert processors(sd15) == before


def test_editing_a_prompt_into_itself_gives_the_source(sd15):
    """Sanity check, not evidence that editing works (it also holds with editing disabled): an identity edit
    leaves the image as it is. test_whole_edit_equals_explicit_prompt_to_prompt checks the edit itself."""
    out = pc.edit(sd15, SRC, [SRC, SRC], cross_steps=1.0, self_steps=1.0, seed=3, num_inference_steps=STEPS, output_type="np")
    for image in out.edited:
        np.testing.assert_allclose(image, out.source, atol=1e-5)


def test_edit_differs_from_generating_the_edit_alone(sd15):
    """With the maps injected the edit keeps the source layout: it moves away from the edit prompt's own image."""
    injected = pc.edit(sd15, SRC, EDIT, cross_steps=1.0, self_steps=1.0, seed=0, num_inference_steps=STEPS, output_type="np")
    own = alone(sd15, EDIT)
    assert not np.allclose(injected.edited[0], own, atol=1e-4)


def test_reweight_inside_an_edit_scales_the_replaced_map(sd15):
    """Reweight after Replace: edited row map = (P_source @ M) * w, written out with explicit softmax."""
    from promptcontrol.controllers.reweight import Reweight

    site = [s for s in pc.find_sites(sd15.unet) if s.kind == "cross" and s.level == 1 and s.place == "up"][0]
    module = attention_modules(sd15.unet, [site])[site.key]
    seen = []
    handle = module.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((args[0], kwargs["encoder_hidden_states"], out)), with_kwargs=True
    )
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)).repeat(2, 1, 1, 1)
    try:
        with torch.no_grad(), pc.control(sd15, pc.Replace(1.0), Reweight([{}, {"green": 2.0}])):
            sd15(["a red circle", "a green circle"], latents=latents, num_inference_steps=STEPS, output_type="latent")
    finally:
        handle.remove()
    hidden, ehs, out = seen[1]
    with torch.no_grad():
        heads = module.heads
        q, k, v = module.to_q(hidden), module.to_k(ehs), module.to_v(ehs)
        b, d = q.shape[0], q.shape[-1] // heads
        q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        logits = q @ k.transpose(-1, -2) * d**-0.5
        p = torch.exp(logits - logits.amax(-1, keepdim=True))
        p = p / p.sum(-1, keepdim=True)
        eq = torch.ones(p.shape[-1])
        eq[2] = 2.0  # "green" is token 2 of "a green circle"
        heads_out = p @ v
        heads_out[3] = (p[2] * eq) @ v[3]
        expected = module.to_out[0](heads_out.transpose(1, 2).reshape(b, -1, heads * d))
    assert torch.allclose(out, expected, atol=1e-5)


class BlendReference:
    """Prompt-to-prompt's LocalBlend mask written out: explicit softmax of the inputs captured at the blend sites
    during the very run that blends (own maps: use with cross_steps=0)."""

    def __init__(self, pipe):
        from promptcontrol.controllers.blend import default_blend_levels

        sites = pc.find_sites(pipe.unet)
        level = default_blend_levels(sites)[0]
        chosen = [s for s in sites if s.kind == "cross" and s.level == level and s.place in ("down", "up")]
        self.pipe, self.calls = pipe, []
        self.handles = [
            m.register_forward_hook(
                lambda m, a, kw, o: self.calls.append((m, a[0].clone(), kw["encoder_hidden_states"].clone())),
                with_kwargs=True,
            )
            for m in attention_modules(pipe.unet, chosen).values()
        ]

    def close(self):
        for h in self.handles:
            h.remove()

    def mask(self, prompts, words_per_prompt, threshold, latent_hw):
        tok = self.pipe.tokenizer
        alphas = torch.zeros(len(prompts), 77)
        for i, (prompt, words) in enumerate(zip(prompts, words_per_prompt)):
            ids = tok(prompt)["input_ids"]
            for word in words:
                wid = tok(word)["input_ids"][1:-1]
                for pos in range(len(ids)):
                    if ids[pos : pos + len(wid)] == wid:
                        alphas[i, pos : pos + len(wid)] = 1
        total, count, n = 0, 0, len(prompts)
        with torch.no_grad():
            for m, hidden, ehs in self.calls:
                q, k = m.to_q(hidden), m.to_k(ehs)
                b, heads = q.shape[0], m.heads
                d = q.shape[-1] // heads
                q, k = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k))
                logits = q @ k.transpose(-1, -2) * d**-0.5
                p = torch.exp(logits - logits.amax(-1, keepdim=True))
                p = (p / p.sum(-1, keepdim=True))[n:]  # conditional rows
                total = total + (p * alphas[:, None, None, :]).sum(-1).sum(1)  # (n, Q)
                count += heads
        side = int(round(total.shape[-1] ** 0.5))
        maps = (total / count).reshape(n, 1, side, side)
        maps = F.max_pool2d(maps, 3, 1, 1)
        maps = F.interpolate(maps, size=latent_hw)
        maps = maps / maps.amax(dim=(2, 3), keepdim=True)
        mask = maps > threshold
        return mask[:1] | mask[1:]


def test_local_blend_mask_matches_reference_and_keeps_source_outside(sd15):
    prompts = [SRC, "a red circle and a blue star"]
    words = [["square"], ["star"]]
    blend = pc.LocalBlend(words, threshold=0.95, start=0.0)  # tiny random maps are nearly flat
    reference = BlendReference(sd15)
    try:
        out = pc.edit(sd15, prompts[0], prompts[1], cross_steps=0, self_steps=0, blend=blend, seed=0,
                      num_inference_steps=STEPS, output_type="latent")
    finally:
        reference.close()
    union = reference.mask(prompts, words, 0.95, (16, 16))
    got = blend.last_mask[0] | blend.last_mask[1]
    assert torch.equal(got, union[0])
    assert 0 < int(got.sum()) < got.numel()  # a real region, not all or nothing
    source, edited = out.images[0], out.images[1]
    outside = ~got.expand_as(edited)
    assert torch.equal(edited[outside], source[outside])
    assert not torch.allclose(edited[~outside], source[~outside])


def blend_masks(pipe, cross_steps, threshold=0.9):
    """LocalBlend's last masks (source, edit) of "red" → "green" and its mean word maps (2, h, w)."""
    blend = pc.LocalBlend([["red"], ["green"]], threshold=threshold, start=0.0)
    pc.edit(pipe, SRC, EDIT, cross_steps=cross_steps, self_steps=0, blend=blend, seed=0, num_inference_steps=STEPS,
            output_type="latent")
    return blend.last_mask[0], blend.last_mask[1], blend.mean_maps()


def test_local_blend_uses_the_maps_the_rows_used(sd15):
    """Inside a full replace window the edited word's map is the source word's map, so both masks agree; with each
    row's own maps (no replace) they differ at this threshold, so the agreement is the replace's doing."""
    source, edited, maps = blend_masks(sd15, cross_steps=1.0)
    assert 0 < int(source.sum()) < source.numel()  # a partial mask (0.3 keeps all of a tiny model's flat maps)
    torch.testing.assert_close(maps[1], maps[0])  # the edited row summed the source row's map of "red"
    assert torch.equal(edited, source)
    own_source, own_edited, _ = blend_masks(sd15, cross_steps=0)
    assert torch.equal(own_source, source)  # the source row is the same run
    assert int((own_source ^ own_edited).sum()) > 0  # "green"'s own map gives another mask


def test_grid_labels_source_and_edits(sd15):
    out = pc.edit(sd15, SRC, [EDIT, SRC], seed=0, num_inference_steps=2)
    grid = out.grid()
    cell = out.source.size[0] * max(1, -(-160 // out.source.size[0]))
    assert grid.size[0] == 3 * cell and grid.size[1] > cell


def test_blend_word_missing_lists_the_words_and_restores(sd15):
    before = processors(sd15)
    with pytest.raises(KeyError, match="its words are: a, green, circle"):
        pc.edit(sd15, "a red circle", "a green circle", blend=["red"], seed=0, num_inference_steps=2, output_type="latent")
    assert processors(sd15) == before
    assert "encode_prompt" not in sd15.__dict__ and "step" not in sd15.scheduler.__dict__


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cross_steps=1.5), "outside \\[0, 1\\]"),
        (dict(self_steps=-0.1), "outside \\[0, 1\\]"),
        (dict(cross_steps=(0.6, 0.2)), "start is after end"),
        (dict(cross_steps={"green": (0.9, 0.1)}), "start is after end"),
        (dict(blend_threshold=2.0), "outside \\[0, 1\\]"),
    ],
)
def test_bad_fractions_are_refused_before_anything_runs(sd15, kwargs, message):
    before = processors(sd15)
    with pytest.raises(ValueError, match=message):
        pc.edit(sd15, "a red circle", "a green circle", blend=["circle"], seed=0, num_inference_steps=2, **kwargs)
    assert processors(sd15) == before


def test_replace_mode_with_different_word_counts_suggests_refine(sd15):
    with pytest.raises(ValueError, match="use pc.Refine"):
        pc.edit(sd15, "a red circle", "a big red circle", mode="replace", seed=0, num_inference_steps=2, output_type="latent")
    out = pc.edit(sd15, "a red circle", "a big red circle", seed=0, num_inference_steps=2, output_type="latent")
    assert out.images.__len__() == 2


def test_sdxl_non_square_edit_keeps_the_source(tiny_pipes):
    pipe = tiny_pipes("sdxl")
    out = pc.edit(pipe, "a red circle", ["a green circle", "a big red circle"], blend=["circle"], seed=0,
                  cross_steps={"green": (0, 0.5)}, num_inference_steps=STEPS, height=48, width=32, output_type="np")
    factor = pipe.vae_scale_factor
    latents = torch.randn(1, 4, 48 // factor, 32 // factor, generator=torch.Generator().manual_seed(0))
    alone_image = pipe("a red circle", latents=latents, num_inference_steps=STEPS, height=48, width=32, output_type="np").images[0]
    np.testing.assert_allclose(out.source, alone_image, atol=1e-5)
    assert out.controllers[-1].last_mask.shape == (3, 1, 48 // factor, 32 // factor)


def test_the_issue_example_runs(sd15):
    """reweight={"green": 1.5} applies to the edit that has "green"; blend=["circle"] is in every prompt."""
    out = pc.edit(sd15, "a red circle and a blue square",
                  ["a green circle and a blue square", "a red circle and a blue square on grass"],
                  cross_steps=0.8, self_steps=0.4, blend=["circle"], reweight={"green": 1.5}, seed=0,
                  num_inference_steps=STEPS)
    assert len(out.edited) == 2 and out.source.size == out.edited[1].size
    reweight = out.controllers[2]
    assert reweight.weights == [{}, {"green": 1.5}, {}]
    with pytest.raises(KeyError, match="'purple', which is in no edited prompt"):
        pc.edit(sd15, "a red circle", "a green circle", reweight={"purple": 2.0}, num_inference_steps=2)


def test_recording_for_the_blend_does_not_change_the_edit(sd15):
    """Where LocalBlend records, the site runs the edit plan on explicit probabilities; with a mask that keeps
    everything (threshold 0) the images equal the fused run without blending."""
    kwargs = dict(cross_steps={"default": 1.0, "green": (0.5, 1.0)}, self_steps=0.5, seed=0, reweight={"green": 2.0},
                  num_inference_steps=STEPS, output_type="np")
    fused = pc.edit(sd15, SRC, EDIT, **kwargs)
    blend = pc.LocalBlend(["circle"], threshold=0.0, start=0.0)
    recorded = pc.edit(sd15, SRC, EDIT, blend=blend, **kwargs)
    assert bool(blend.last_mask.all())
    np.testing.assert_allclose(recorded.edited[0], fused.edited[0], atol=1e-5)
    np.testing.assert_allclose(recorded.source, fused.source, atol=1e-5)


class ExplicitP2P:
    """Prompt-to-prompt written out for the test: explicit softmax at every layer, maps edited in memory
    (cross: per-token window blend of the source map, identity mapper; self: the source map at the layers whose
    number of queries is in ``self_queries``), for each (source row, edited row) of ``pairs``."""

    def __init__(self, site, state):
        self.site, self.state = site, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        b, heads = q.shape[0], attn.heads
        d = q.shape[-1] // heads
        q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        logits = q @ k.transpose(-1, -2) * d**-0.5
        p = torch.exp(logits - logits.amax(-1, keepdim=True))
        p = p / p.sum(-1, keepdim=True)
        step = self.state["step"]
        inject_self = step in self.state["self_steps"] and hidden_states.shape[1] in self.state["self_queries"]
        for src, edit in self.state["pairs"]:
            if self.site.kind == "cross":
                w = self.state["cross"][step]  # (K,) 1 where the token takes the source map at this step
                p[edit] = p[src] * w + p[edit] * (1 - w)
            elif inject_self:
                p[edit] = p[src]
        out = (p @ v).transpose(1, 2).reshape(b, -1, heads * d)
        return attn.to_out[0](out)


def explicit_p2p_images(pipe, prompts, latents, state, **kwargs):
    """Images of ``pipe(prompts)`` with :class:`ExplicitP2P` at every site (``state["step"]`` counts UNet calls)."""
    saved = dict(pipe.unet.attn_processors)
    pipe.unet.set_attn_processor({s.key: ExplicitP2P(s, state) for s in pc.find_sites(pipe.unet)})
    hook = pipe.unet.register_forward_pre_hook(lambda *a: state.__setitem__("step", state["step"] + 1))
    try:
        with torch.no_grad():
            return pipe(prompts, latents=latents, output_type="np", **kwargs).images
    finally:
        hook.remove()
        pipe.unet.set_attn_processor(dict(saved))


@pytest.mark.parametrize("kind", ["sd15", "sd15-deep"])
def test_whole_edit_equals_explicit_prompt_to_prompt(tiny_pipes, injected_self_queries, kind):
    """Every step, every layer: pc.edit's fused run gives the images of an explicit-softmax P2P run (on SD 1.5's
    four-level layout the self maps are injected at the two coarsest levels only); disabling the edit fails it."""
    pipe = tiny_pipes(kind)
    steps, green = 3, 2  # "green" is token 2 of EDIT
    cross = torch.zeros(steps, 77)
    cross[:2] = 1.0  # default (0, 0.67): steps 0 and 1
    cross[:, green] = torch.tensor([0.0, 1.0, 1.0])  # green (0.34, 1.0): steps 1 and 2
    state = {"step": -1, "pairs": [(2, 3)], "cross": cross, "self_steps": {0},
             "self_queries": injected_self_queries(pipe.unet, (16, 16))}
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)).repeat(2, 1, 1, 1)
    expected = explicit_p2p_images(pipe, [SRC, EDIT], latents, state, num_inference_steps=steps)
    out = pc.edit(pipe, SRC, EDIT, cross_steps={"default": 0.67, "green": (0.34, 1.0)}, self_steps=0.34, seed=0,
                  num_inference_steps=steps, output_type="np")
    np.testing.assert_allclose(out.source, expected[0], atol=1e-5)
    np.testing.assert_allclose(out.edited[0], expected[1], atol=1e-5)
    assert not np.allclose(expected[1], alone(pipe, EDIT), atol=1e-3)  # the edit did act


def test_several_images_per_prompt_pair_kth_with_kth(sd15):
    """Sanity check of the batch order (an identity edit, so it also holds with editing disabled): with
    num_images_per_prompt=2 the images are [s0, s1, e0, e1]; an edit into the same prompt reproduces s0 and s1 in
    order (pairing e1 with s0 would not), and the source images are the prompt's own. The next test checks a real
    edit of each draw against explicit P2P."""
    out = pc.edit(sd15, SRC, SRC, cross_steps=1.0, self_steps=1.0, seed=1, num_images_per_prompt=2,
                  num_inference_steps=STEPS, output_type="np")
    assert len(out.images) == 4
    np.testing.assert_allclose(out.images[2], out.images[0], atol=1e-5)
    np.testing.assert_allclose(out.images[3], out.images[1], atol=1e-5)
    assert not np.allclose(out.images[0], out.images[1], atol=1e-3)  # two different draws
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    own = sd15(SRC, latents=latents, num_images_per_prompt=2, num_inference_steps=STEPS, output_type="np").images
    np.testing.assert_allclose(np.stack(out.images[:2]), own, atol=1e-5)


def test_several_images_per_prompt_edit_each_draw_from_its_own_source(sd15, injected_self_queries):
    """num_images_per_prompt=2 with a real edit: conditional rows [s0, s1, e0, e1] (4..7); e_k takes s_k's maps
    (explicit P2P with pairs (4, 6), (5, 7)); a wrong pairing or no edit at all fails it."""
    state = {"step": -1, "pairs": [(4, 6), (5, 7)], "cross": torch.ones(STEPS, 77), "self_steps": set(range(STEPS)),
             "self_queries": injected_self_queries(sd15.unet, (16, 16))}
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1)).repeat(2, 1, 1, 1)
    expected = explicit_p2p_images(sd15, [SRC, EDIT], latents, state, num_images_per_prompt=2,
                                   num_inference_steps=STEPS)
    out = pc.edit(sd15, SRC, EDIT, cross_steps=1.0, self_steps=1.0, seed=1, num_images_per_prompt=2,
                  num_inference_steps=STEPS, output_type="np")
    np.testing.assert_allclose(np.stack(out.images), expected, atol=1e-5)
    plain = sd15([SRC, EDIT], latents=latents, num_images_per_prompt=2, num_inference_steps=STEPS, output_type="np")
    assert not np.allclose(expected[2:], plain.images[2:], atol=1e-3)  # the edit did act on both draws
