"""AttentionStore records the conditional rows' cross-attention, per image, equal to an explicit softmax written
out here; bookkeeping for several prompts × images with guidance on and off; options restrict the work."""

from __future__ import annotations

import pytest
import torch

import promptcontrol as pc
from promptcontrol.sites import attention_modules

STEPS = 3


def cross_site(pipe, place, level):
    return next(s for s in pc.find_sites(pipe.unet) if s.is_cross and s.place == place and s.level == level)


class Inputs:
    """Inputs of one Attention module at every call (one call per denoising step)."""

    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        self.calls.append((hidden.detach().clone(), ehs.detach().clone()))

    def remove(self):
        self.handle.remove()


def reference_probs(attn, hidden, ehs):
    """Explicit softmax attention (B, heads, Q, K): exp(q·k/√d − max) / Σ exp, from the module's own projections."""
    with torch.no_grad():
        q, k = attn.to_q(hidden), attn.to_k(ehs)
    b, n_q, inner = q.shape
    d = inner // attn.heads
    q = q.view(b, n_q, attn.heads, d).permute(0, 2, 1, 3)
    k = k.view(b, k.shape[1], attn.heads, d).permute(0, 2, 1, 3)
    logits = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) / d**0.5
    e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    return (e / e.sum(dim=-1, keepdim=True)).float()


def as_rows(site_map):
    """(K, h, w) → (Q, K) in row-major spatial order, as the processor sees queries."""
    return site_map.flatten(1).T


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_recorded_maps_equal_explicit_softmax_of_conditional_rows(sd15, guidance):
    site = cross_site(sd15, "up", 0)
    module = attention_modules(sd15.unet, [site])[site.key]
    per_step = pc.AttentionStore(per_step=True, dtype=torch.float32, max_side=None)
    one_step = pc.AttentionStore(steps=[1])
    spy = Inputs(module)
    try:
        with pc.trace(sd15, per_step, one_step) as tr:
            sd15(["a red circle", "a blue square"], num_inference_steps=STEPS, guidance_scale=guidance,
                 generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        spy.remove()
    assert len(spy.calls) == STEPS
    refs = []
    for hidden, ehs in spy.calls:
        probs = reference_probs(module, hidden, ehs)  # (B, heads, Q, K)
        cond = probs[probs.shape[0] // 2:] if guidance > 1 else probs  # diffusers batches [uncond | cond]
        refs.append(cond.mean(dim=1))  # (2, Q, K): mean over heads
    for image in range(2):
        for step in range(STEPS):
            got = as_rows(per_step.site_map(image, site, steps=[step]))
            torch.testing.assert_close(got, refs[step][image], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(as_rows(one_step.site_map(image, site)), refs[1][image], atol=1e-5, rtol=1e-4)
        mean_all = torch.stack([r[image] for r in refs]).mean(dim=0)
        torch.testing.assert_close(as_rows(tr.store.site_map(image, site)), mean_all, atol=1e-5, rtol=1e-4)
    assert one_step.steps(0) == [1] and per_step.steps(0) == list(range(STEPS))


def test_rows_sum_to_one_over_tokens_at_every_site(sd15):
    with pc.trace(sd15) as tr:
        sd15("a photorealistic cat", num_inference_steps=2, output_type="latent")
    sites = tr.store.recorded_sites(0)
    assert {s.key for s in sites} == {s.key for s in pc.find_sites(sd15.unet) if s.is_cross}
    for site in sites:
        m = tr.store.site_map(0, site)
        torch.testing.assert_close(m.sum(dim=0), torch.ones(m.shape[1:]), atol=1e-5, rtol=0)


def run_batch(pipe, prompts, latents, guidance, steps=(0,)):
    with pc.trace(pipe, steps=list(steps)) as tr:
        pipe(prompts, num_images_per_prompt=latents.shape[0] // len(prompts), latents=latents.clone(),
             num_inference_steps=STEPS, guidance_scale=guidance, output_type="latent")
    return tr.store


def test_bookkeeping_three_prompts_two_images_each_guidance_on_and_off(sd15):
    prompts = ["a red circle", "a blue dog", "a red circle"]
    torch.manual_seed(1)
    shared = torch.randn(1, 4, 16, 16).repeat(6, 1, 1, 1)
    site = cross_site(sd15, "down", 0)
    on = run_batch(sd15, prompts, shared, 7.5)
    off = run_batch(sd15, prompts, shared, 1.0)
    for store in (on, off):
        assert store.num_images == 6
        assert [store.image(i).prompt for i in range(6)] == [p for p in prompts for _ in range(2)]
        maps = [store.site_map(i, site) for i in range(6)]
        for i in (1, 4, 5):  # same prompt, same latent → same map
            torch.testing.assert_close(maps[i], maps[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(maps[3], maps[2], atol=1e-6, rtol=0)
        assert (maps[2] - maps[0]).abs().max() > 1e-3  # a different prompt attends differently
    for i in range(6):  # at step 0 the conditional rows see the same input with and without guidance
        torch.testing.assert_close(on.site_map(i, site), off.site_map(i, site), atol=1e-5, rtol=0)


def test_each_image_gets_its_own_prompt_and_latent(sd15):
    prompts = ["a red circle", "a blue dog", "two green trees"]
    torch.manual_seed(2)
    latents = torch.randn(6, 4, 16, 16)
    site = cross_site(sd15, "up", 0)
    batch = run_batch(sd15, prompts, latents, 7.5)
    for i in range(6):
        alone = run_batch(sd15, [prompts[i // 2]], latents[i : i + 1], 7.5)
        assert alone.image(0).prompt == batch.image(i).prompt == prompts[i // 2]
        torch.testing.assert_close(batch.site_map(i, site), alone.site_map(0, site), atol=1e-5, rtol=1e-4)


def test_runs_append_images_in_generation_order(sd15):
    with pc.trace(sd15) as tr:
        sd15("a cat", num_inference_steps=2, output_type="latent")
        sd15(["a dog", "a bird"], num_inference_steps=2, output_type="latent")
    assert tr.num_images == 3
    assert [tr.store.image(i).prompt for i in range(3)] == ["a cat", "a dog", "a bird"]
    assert tr.store.heatmaps(2).words == ["a", "bird"]
    assert tr.store.steps(0) == [0, 1] and tr.store.steps(2) == [0, 1]


def test_only_selected_sites_and_steps_materialise_probabilities(sd15):
    store = pc.AttentionStore(steps=[1, 2], sites={"places": ["up"], "levels": [0]})
    seen = []
    original = store.record
    store.record = lambda site, ctx, probs, plan: (seen.append((site.key, ctx.index)), original(site, ctx, probs, plan))
    with pc.control(sd15, store) as session:
        installed = {k for k, p in sd15.unet.attn_processors.items() if type(p).__name__ == "ControlledAttnProcessor"}
        expected = {s.key for s in session.sites if s.is_cross and s.place == "up" and s.level == 0}
        assert installed == expected  # nothing else left fused SDPA
        sd15("a cat", num_inference_steps=4, output_type="latent")
    assert sorted(seen) == sorted((key, step) for key in expected for step in (1, 2))
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in sd15.unet.attn_processors.values())


def test_default_memory_is_running_sums_only(sd15):
    with pc.trace(sd15) as tr:
        sd15(["a cat", "a dog"], num_inference_steps=4, output_type="latent")
    store = tr.store
    positions = sum(16 * 16 if s.level == 0 else 8 * 8 for s in store.recorded_sites(0))
    assert store.memory_bytes() == 2 * positions * 77 * 4  # images × Σ h·w × tokens × float32, whatever the steps
    run = store.image(0).run
    assert not run.step_maps and not run.head_sums
    with pytest.raises(ValueError, match="per_step=True"):
        store.site_map(0, store.recorded_sites(0)[0], steps=[0])
    with pytest.raises(ValueError, match="per_head=True"):
        store.site_map(0, store.recorded_sites(0)[0], heads=[0])


def test_per_step_and_per_head_maps_on_cpu_at_dtype_and_capped(sd15):
    with pc.trace(sd15, per_step=True, per_head=True, max_side=8) as tr:
        sd15("a cat", num_inference_steps=2, output_type="latent")
    store = tr.store
    run = store.image(0).run
    level0 = cross_site(sd15, "up", 0)
    step_map = run.step_maps[1][level0.key]
    assert step_map.device.type == "cpu" and step_map.dtype == torch.float16
    assert tuple(step_map.shape) == (1, 77, 8, 8)  # 16×16 average-pooled to the 8×8 cap
    heads = run.head_sums[level0.key]
    assert heads.device.type == "cpu" and tuple(heads.shape) == (1, level0.heads, 77, 8, 8)
    full = store.site_map(0, level0)  # (77, 16, 16) full resolution
    pooled = full.reshape(77, 8, 2, 8, 2).mean(dim=(2, 4))
    both_steps = store.site_map(0, level0, steps=[0, 1])
    torch.testing.assert_close(both_steps, pooled, atol=2e-3, rtol=0)  # float16 storage
    all_heads = store.site_map(0, level0, heads=range(level0.heads))
    torch.testing.assert_close(all_heads, pooled, atol=1e-5, rtol=0)


def test_non_square_images_give_non_square_site_maps(sd15):
    with pc.trace(sd15) as tr:
        sd15("a cat", height=32, width=48, num_inference_steps=2, output_type="latent")
    for site in tr.store.recorded_sites(0):
        expected = (16, 24) if site.level == 0 else (8, 12)
        assert tuple(tr.store.site_map(0, site).shape) == (77, *expected)


def test_sdxl_records_every_cross_site(tiny_pipes):
    pipe = tiny_pipes("sdxl")
    with pc.trace(pipe) as tr:
        pipe(["a red circle", "a dog"], num_inference_steps=2, output_type="latent")
    sites = tr.store.recorded_sites(1)
    assert len(sites) == sum(s.is_cross for s in pc.find_sites(pipe.unet))
    assert tr.store.image(1).prompt == "a dog"
    for site in sites:
        m = tr.store.site_map(1, site)
        torch.testing.assert_close(m.sum(dim=0), torch.ones(m.shape[1:]), atol=1e-5, rtol=0)


def test_clear_errors(sd15):
    store = pc.AttentionStore()
    with pytest.raises(RuntimeError, match="nothing was recorded"):
        store.image(0)
    with pc.control(sd15, store):
        sd15("a cat", num_inference_steps=2, output_type="latent")
    with pytest.raises(IndexError, match="holds 1 image"):
        store.image(3)
    with pytest.raises(ValueError, match="unknown place"):  # the one sites= vocabulary's message
        pc.AttentionStore(sites={"places": ["middle"]})
    with pytest.raises(ValueError, match="ints >= 0"):  # the one steps= vocabulary's message
        pc.AttentionStore(steps=[-1])
    before = dict(sd15.unet.attn_processors)
    with pytest.raises(ValueError, match="names no cross-attention site"):
        with pc.control(sd15, pc.AttentionStore(sites=["down_blocks.9.attn2"])):
            pass
    assert sd15.unet.attn_processors == before  # nothing stays installed after the error


def test_sites_option_accepts_module_paths(sd15):
    site = cross_site(sd15, "mid", 1)
    with pc.trace(sd15, sites=[site.module_path]) as tr:
        sd15("a cat", num_inference_steps=2, output_type="latent")
    assert [s.key for s in tr.store.recorded_sites(0)] == [site.key]


def test_memory_estimate_from_shapes_matches_the_store(sd15):
    from promptcontrol.controllers.store import estimate_bytes

    with pc.trace(sd15, per_step=True, per_head=True, max_side=8) as tr:
        sd15(["a cat", "a dog"], height=32, width=48, num_inference_steps=3, output_type="latent")
    sites = tr.store.recorded_sites(0)
    est = estimate_bytes(sites, (16, 24), steps=3, images=2, per_step=True, per_head=True, max_side=8)
    assert est["total"] == tr.store.memory_bytes()
    assert est["sums"] == 2 * sum(16 * 24 if s.level == 0 else 8 * 12 for s in sites) * 77 * 4


def test_per_step_by_level_keeps_one_map_per_level_and_step(tiny_pipes):
    from promptcontrol.controllers.store import estimate_bytes

    pipe = tiny_pipes("sdxl")
    with pc.trace(pipe, per_step="level", dtype=torch.float32, max_side=None) as site_level:
        pipe("a red circle", num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0))
    with pc.trace(pipe, per_step=True, dtype=torch.float32, max_side=None) as per_site:
        pipe("a red circle", num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0))
    run = site_level.store.image(0).run
    sites = site_level.store.recorded_sites(0)
    assert sorted(run.level_steps[1]) == [0, 1] and not run.step_maps
    assert run.level_sites == {0: 3, 1: 8}
    for level in (0, 1):  # the stored level map is the mean of that level's per-site maps at that step
        ref = torch.stack([per_site.store.site_map(0, s, steps=[1]) for s in sites if s.level == level]).mean(0)
        torch.testing.assert_close(site_level.store.level_map(0, level, [1]), ref, atol=1e-5, rtol=1e-4)
    est = estimate_bytes(sites, (16, 16), steps=2, per_step="level", dtype=torch.float32, max_side=None)
    assert est["total"] == site_level.store.memory_bytes()
    with pytest.raises(ValueError, match="per level"):
        site_level.store.site_map(0, sites[0], steps=[0])


def test_conditional_rows_are_picked_in_image_order():
    store = pc.AttentionStore()
    probs = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 3, 5)
    store._rows = (2, 3)  # contiguous: a view
    assert store._cond(probs)[:, 0, 0, 0].tolist() == [2.0, 3.0]
    store._rows, store._row_index = (3, 1), {}  # any other order: gathered
    assert store._cond(probs)[:, 0, 0, 0].tolist() == [3.0, 1.0]
