"""pc.control: exact pass-through, fused transforms against explicit references, install/restore, step tracking."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import promptcontrol as pc
from promptcontrol.plan import AttentionPlan

PROMPTS = ["a red circle and a blue square", "a photorealistic cat", "two dogs, one cat"]


def run(pipe, prompts, *, guidance=7.5, size=(32, 32), steps=2, seed=0, **kwargs):
    g = torch.Generator().manual_seed(seed)
    out = pipe(
        prompts,
        height=size[0],
        width=size[1],
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=g,
        output_type="np",
        **kwargs,
    )
    return torch.from_numpy(out.images)


def snapshot(pipe):
    """Everything a session may touch, by identity."""
    unet = pipe.unet
    return (
        {k: id(v) for k, v in unet.attn_processors.items()},
        (dict(unet._forward_pre_hooks), dict(unet._forward_hooks), dict(unet._forward_pre_hooks_with_kwargs)),
        set(vars(pipe)),
        set(vars(pipe.scheduler)),
        {n for n in vars(unet) if n.startswith("_promptcontrol")},
    )


# ---- pass-through is exact -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd15", "sd21", "sdxl"])
@pytest.mark.parametrize("guidance", [1.0, 7.5])
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "batch3"])
@pytest.mark.parametrize("size", [(32, 32), (32, 48)], ids=["square", "nonsquare"])
def test_pass_through_equals_stock(tiny_pipes, kind, guidance, prompts, size):
    pipe = tiny_pipes(kind)
    stock = run(pipe, prompts, guidance=guidance, size=size)
    with pc.control(pipe, pc.PassThrough()):
        controlled = run(pipe, prompts, guidance=guidance, size=size)
    assert controlled.shape == (len(prompts), *size, 3)
    assert (controlled - stock).abs().max() <= 1e-5


class ScaleEveryCrossSite(pc.Controller):
    """Test controller: scale every cross-attention value of one token position (a fused V-scale)."""

    def __init__(self, position, weight, bias=False):
        self.position, self.weight, self.bias = position, weight, bias

    def plan(self, site, ctx, plan):
        w = torch.ones(ctx.batch_size, 77)
        w[:, self.position] = self.weight
        return plan.biased(w.log()) if self.bias else plan.scaled(w)


class ExplicitReweightProcessor:
    """Reference written here: classic explicit softmax attention with one token's probability scaled."""

    def __init__(self, position, weight, renormalise):
        self.position, self.weight, self.renormalise = position, weight, renormalise

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        b, n, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.to_q(hidden_states).view(b, n, attn.heads, -1).transpose(1, 2)
        k = attn.to_k(context).view(b, context.shape[1], attn.heads, -1).transpose(1, 2)
        v = attn.to_v(context).view(b, context.shape[1], attn.heads, -1).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        if encoder_hidden_states is not None:
            probs = probs.clone()
            probs[..., self.position] *= self.weight
            if self.renormalise:
                probs = probs / probs.sum(-1, keepdim=True)
        out = (probs @ v).transpose(1, 2).reshape(b, n, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@pytest.mark.parametrize("renormalise", [False, True], ids=["v-scale", "log-bias"])
@pytest.mark.parametrize("kind", ["sd15", "sd21"])
def test_fused_transforms_equal_explicit_reference(kind, renormalise):
    unet = pc.testing.tiny_unet(kind)
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 12, generator=g)
    text = torch.randn(2, 77, 32, generator=g)
    reference_processors = {
        key: ExplicitReweightProcessor(3, 2.5, renormalise) for key in unet.attn_processors
    }
    original = unet.attn_processors
    unet.set_attn_processor(dict(reference_processors))
    with torch.no_grad():
        expected = unet(sample, 10, text).sample
    unet.set_attn_processor(dict(original))
    with torch.no_grad():
        stock = unet(sample, 10, text).sample
        with pc.control(unet, ScaleEveryCrossSite(3, 2.5, bias=renormalise)):
            fused = unet(sample, 10, text).sample
    assert (fused - stock).abs().max() > 1e-4  # the transform does something
    assert (fused - expected).abs().max() <= 1e-5


# ---- install / restore -----------------------------------------------------------------------------------------
def test_everything_restored_after_normal_exit_and_after_error(sd15):
    before = snapshot(sd15)
    with pc.control(sd15, pc.PassThrough()) as session:
        assert snapshot(sd15) != before
        assert all(type(p).__name__ == "ControlledAttnProcessor" for p in sd15.unet.attn_processors.values())
        run(sd15, PROMPTS[:1])
    assert snapshot(sd15) == before
    assert session.context is None

    with pytest.raises(RuntimeError, match="boom"):
        with pc.control(sd15, pc.PassThrough()):
            run(sd15, PROMPTS[:1])
            raise RuntimeError("boom")
    assert snapshot(sd15) == before


def test_error_inside_pipeline_call_restores(sd15):
    class Exploding(pc.Controller):
        def begin_step(self, ctx):
            if ctx.index == 1:
                raise ValueError("bad step")

    before = snapshot(sd15)
    with pytest.raises(ValueError, match="bad step"):
        with pc.control(sd15, Exploding()):
            run(sd15, PROMPTS[:1], steps=3)
    assert snapshot(sd15) == before


def test_no_reference_to_session_left(sd15):
    controller = pc.PassThrough()
    with pc.control(sd15, controller) as session:
        run(sd15, PROMPTS[:1])
    ref = weakref.ref(session)
    del session
    gc.collect()
    assert ref() is None


def test_failed_install_installs_nothing(sd15):
    class FailsOnBind(pc.Controller):
        def bind(self, session):
            raise ValueError("cannot bind")

    before = snapshot(sd15)
    with pytest.raises(ValueError, match="cannot bind"):
        with pc.control(sd15, pc.PassThrough(), FailsOnBind()):
            pass
    assert snapshot(sd15) == before


def test_second_session_on_same_unet_is_refused(sd15):
    before = snapshot(sd15)
    with pc.control(sd15, pc.PassThrough()):
        inner = pc.control(sd15.unet)
        with pytest.raises(pc.SessionError, match="already active"):
            with inner:
                pass
    assert snapshot(sd15) == before
    with pc.control(sd15):  # usable again afterwards
        pass


@pytest.mark.parametrize(
    "target, error",
    [(object(), TypeError), ("runwayml/stable-diffusion-v1-5", TypeError), (torch.nn.Linear(2, 2), TypeError)],
)
def test_bad_targets(target, error):
    with pytest.raises(error, match="pipeline|UNet2DConditionModel"):
        pc.control(target)


def test_bad_controller_names_what_was_given(sd15):
    before = snapshot(sd15)
    with pytest.raises(TypeError, match="dict"):
        pc.control(sd15, {"red": 2.0})
    assert snapshot(sd15) == before


def test_unet_without_cross_attention_is_refused():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None,
        norm_num_groups=4,
        cross_attention_dim=8,
        layers_per_block=1,
    )
    with pytest.raises(ValueError, match="no cross-attention"):
        pc.control(unet)


def test_memory_saving_processors_warned_and_restored(tiny_pipes):
    pipe = pc.testing.tiny_pipeline("sd15")
    pipe.enable_attention_slicing(1)
    sliced = run(pipe, PROMPTS[:1])
    before = snapshot(pipe)
    with pytest.warns(UserWarning, match="SlicedAttnProcessor at 14 sites"):
        with pc.control(pipe, pc.PassThrough()):
            controlled = run(pipe, PROMPTS[:1])
    assert snapshot(pipe) == before
    assert (controlled - sliced).abs().max() <= 1e-5


def test_custom_processor_refused_and_nothing_installed():
    pipe = pc.testing.tiny_pipeline("sd15")

    class MyAdapterProcessor:
        def __call__(self, attn, hidden_states, *args, **kwargs):
            raise AssertionError("never called")

    key = next(k for k in pipe.unet.attn_processors if "attn2" in k)
    processors = dict(pipe.unet.attn_processors)
    processors[key] = MyAdapterProcessor()
    pipe.unet.set_attn_processor(dict(processors))
    before = snapshot(pipe)
    with pytest.raises(ValueError, match="MyAdapterProcessor"):
        with pc.control(pipe, pc.PassThrough()):
            pass
    assert snapshot(pipe) == before


def test_fused_qkv_projections_supported():
    pipe = pc.testing.tiny_pipeline("sd15")
    pipe.fuse_qkv_projections()
    stock = run(pipe, PROMPTS[:1])
    with pc.control(pipe, pc.PassThrough()):
        controlled = run(pipe, PROMPTS[:1])
    assert (controlled - stock).abs().max() <= 1e-5


# ---- sites -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd15", "sd21", "sdxl"])
def test_sites_describe_every_attention_layer(tiny_pipes, kind):
    pipe = tiny_pipes(kind)
    sites = pc.find_sites(pipe.unet)
    modules = dict(pipe.unet.named_modules())
    assert [s.key for s in sites] == list(pipe.unet.attn_processors)
    for site in sites:
        module = modules[site.module_path]
        assert site.heads == module.heads
        assert site.kind == ("cross" if site.module_path.endswith("attn2") else "self")
        assert site.place == {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}[site.key.split(".")[0]]
    levels = {(s.place, s.block): s.level for s in sites}
    assert levels[("down", 0)] == 0 and levels[("down", 1)] == 1 and levels[("mid", 0)] == 1
    assert levels[("up", 0)] == 1 and levels[("up", 1)] == 0
    if kind == "sdxl":
        assert max(s.layer for s in sites) == 1  # stacked transformer blocks are separate sites


@pytest.mark.parametrize("size", [(32, 48), (40, 24), (24, 56)])
def test_site_grids_come_from_the_latent(sd15, size):
    seen = {}

    class Grids(pc.Controller):
        def wants_probs(self, site, ctx):
            return True

        def record(self, site, ctx, probs):
            seen[site.key] = (pc.sites.grid_for(ctx.latent_hw, site.level), probs.shape[2])

    with pc.control(sd15, Grids()):
        run(sd15, PROMPTS[:1], size=size, steps=1)
    assert seen
    for (h, w), queries in seen.values():
        assert h * w == queries
    latent = (size[0] // 2, size[1] // 2)
    assert pc.sites.grid_from_length(latent, latent[0] * latent[1]) == latent


# ---- step tracking and batch layout ----------------------------------------------------------------------------
class StepLog(pc.Controller):
    def __init__(self):
        self.steps, self.layer_calls = [], 0

    def begin_step(self, ctx):
        self.steps.append(ctx)

    def plan(self, site, ctx, plan):
        self.layer_calls += 1
        return plan


def test_steps_are_counted_per_unet_call_and_reset_per_run(sd15):
    log = StepLog()
    with pc.control(sd15, log):
        run(sd15, PROMPTS[:1], steps=3)
        run(sd15, PROMPTS[:1], steps=4)
    assert [c.index for c in log.steps] == [0, 1, 2, 0, 1, 2, 3]
    assert [c.run_id for c in log.steps] == [1, 1, 1, 2, 2, 2, 2]
    assert [c.total for c in log.steps] == [3, 3, 3, 4, 4, 4, 4]
    timesteps = [c.timestep for c in log.steps[3:]]
    assert timesteps == sorted(timesteps, reverse=True)
    assert log.layer_calls == 7 * 7  # 7 cross sites per call: layers are not steps
    assert log.steps[1].fraction == pytest.approx(1 / 3)


@pytest.mark.parametrize("guidance, cfg", [(7.5, True), (1.0, False)])
def test_batch_layout_for_prompts_and_images(sd15, guidance, cfg):
    log = StepLog()
    with pc.control(sd15, log):
        run(sd15, PROMPTS, guidance=guidance, steps=1, num_images_per_prompt=2)
    layout = log.steps[0].layout
    assert log.steps[0].run.prompts == PROMPTS and log.steps[0].run.cfg is cfg
    if cfg:
        assert layout.uncond_rows == tuple(range(6)) and layout.cond_rows == tuple(range(6, 12))
        assert layout.prompt_of_row == (0, 0, 1, 1, 2, 2) * 2
        assert layout.image_of_row == tuple(range(6)) * 2
    else:
        assert layout.uncond_rows == () and layout.cond_rows == tuple(range(6))
        assert layout.prompt_of_row == (0, 0, 1, 1, 2, 2)


def test_bare_unet_rows_are_conditional_unless_told(tmp_path):
    unet = pc.testing.tiny_unet("sd15")
    log = StepLog()
    x, t, text = torch.randn(4, 4, 8, 8), 5, torch.randn(4, 77, 32)
    with torch.no_grad(), pc.control(unet, log) as session:
        unet(x, t, text)
        unet(x, t, text)
        session.reset_steps()
        unet(x, t, text)
    assert [c.index for c in log.steps] == [0, 1, 0]
    assert [c.run_id for c in log.steps] == [1, 1, 2]
    assert log.steps[0].layout.cond_rows == (0, 1, 2, 3) and log.steps[0].total is None
    log2 = StepLog()
    with torch.no_grad(), pc.control(unet, log2, cfg=True):
        unet(x, t, text)
    assert log2.steps[0].layout.uncond_rows == (0, 1)


def test_controllers_compose_in_order(sd15):
    calls = []

    class Tag(pc.Controller):
        def __init__(self, name):
            self.name = name

        def plan(self, site, ctx, plan):
            calls.append(self.name)
            return plan.scaled(torch.ones(ctx.batch_size, 77))

    seen_terms = []

    class Last(pc.Controller):
        def plan(self, site, ctx, plan):
            seen_terms.append(plan.terms[0].value_scale is not None)
            return plan

    with pc.control(sd15, Tag("a"), Tag("b"), Last()):
        run(sd15, PROMPTS[:1], steps=1)
    assert calls[:2] == ["a", "b"] and all(seen_terms)


def test_latent_controller_runs_after_each_scheduler_step(sd15):
    class ZeroLatents(pc.Controller):
        def __init__(self):
            self.calls = 0

        def transform_latents(self, ctx, latents):
            self.calls += 1
            return torch.zeros_like(latents)

    z = ZeroLatents()
    with pc.control(sd15, z):
        g = torch.Generator().manual_seed(0)
        latents = sd15(PROMPTS[0], height=32, width=32, num_inference_steps=3, generator=g, output_type="latent").images
    assert z.calls == 3
    assert latents.abs().max() == 0
    assert "step" not in vars(sd15.scheduler)


def test_compiled_unet_is_unwrapped(sd15):
    compiled = torch.compile(sd15.unet, backend="eager")
    before = snapshot(sd15)
    with pc.control(compiled, pc.PassThrough()) as session:
        assert session.unet is sd15.unet
        assert all(type(p).__name__ == "ControlledAttnProcessor" for p in sd15.unet.attn_processors.values())
    assert snapshot(sd15) == before


def test_negative_prompt_is_captured(sd15):
    log = StepLog()
    with pc.control(sd15, log):
        run(sd15, PROMPTS[:2], steps=1, negative_prompt=["blurry", "dark"])
    assert log.steps[0].run.negative_prompts == ["blurry", "dark"]
