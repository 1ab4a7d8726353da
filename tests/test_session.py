"""pc.control: exact pass-through, fused transforms against explicit references, install/restore, step tracking."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import promptcontrol as pc
from promptcontrol.plan import AttentionPlan
from promptcontrol.processors.attention import ControlledAttnProcessor

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


def called_once(pipe):
    """``pipe`` after one call of its own: a pipeline's first call adds attributes (``_num_timesteps``, ...)
    that :func:`snapshot` would otherwise blame on the session."""
    if "_num_timesteps" not in vars(pipe):
        run(pipe, PROMPTS[:1], steps=1)
    return pipe


@pytest.fixture
def sd15(tiny_pipes):
    """The shared tiny SD 1.5 pipeline, called once already (snapshots then hold whichever test runs first)."""
    return called_once(tiny_pipes("sd15"))


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


class RestoreFault(Exception):
    """The error a faulty restore step raises in these tests."""


class Fault:
    """Wraps a function so that, once armed, it does its work and then raises (counting its calls)."""

    def __init__(self):
        self.armed, self.calls = False, 0

    def after(self, original):
        def faulty(*args, **kwargs):
            result = original(*args, **kwargs)
            if self.armed:
                self.calls += 1
                raise RestoreFault(f"fault {self.calls}")
            return result

        return faulty


class LogsUnbind(pc.Controller):
    """Acts everywhere, changes the latents (so the scheduler step is wrapped too) and logs its unbind."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def applies_to(self, site):
        return True

    def transform_latents(self, ctx, latents):
        return latents

    def unbind(self):
        self.log.append(self.name)


@pytest.fixture(scope="module")
def fault_pipe():
    """A pipeline of its own: a restore bug in these tests must not leak into the shared ones."""
    return called_once(pc.testing.tiny_pipeline("sd15"))


def inject(kind, fault, monkeypatch, pipe, controller):
    """Make every restore step of one kind do its work and then raise (once ``fault`` is armed)."""
    import promptcontrol.session as session_module
    from torch.utils.hooks import RemovableHandle

    if kind == "unbind":
        monkeypatch.setattr(controller, "unbind", fault.after(controller.unbind))
    elif kind == "processor":
        attention = type(next(m for m in pipe.unet.modules() if hasattr(m, "set_processor")))
        monkeypatch.setattr(attention, "set_processor", fault.after(attention.set_processor))
    elif kind == "hook":
        monkeypatch.setattr(RemovableHandle, "remove", fault.after(RemovableHandle.remove))
    elif kind == "attribute":
        monkeypatch.setattr(session_module, "_unshadow", fault.after(session_module._unshadow))
    elif kind == "session-marker":
        unet_class = type(pipe.unet)
        monkeypatch.setattr(unet_class, "__delattr__", fault.after(unet_class.__delattr__))
    elif kind == "binding-mark":
        monkeypatch.setattr(session_module, "release", fault.after(session_module.release))


@pytest.mark.parametrize(
    "kind", ["unbind", "processor", "hook", "attribute", "session-marker", "binding-mark"]
)
def test_every_restore_step_runs_when_one_raises(fault_pipe, monkeypatch, kind):
    """Issue 14.1: a raising restore step (e.g. a controller's unbind) must not stop the others; the first error
    propagates afterwards, the later ones are notes on it, and the UNet takes a new session."""
    pipe, log, fault = fault_pipe, [], Fault()
    controllers = [LogsUnbind("a", log), LogsUnbind("b", log)]
    before = snapshot(pipe)
    inject(kind, fault, monkeypatch, pipe, controllers[0])
    with pytest.raises(RestoreFault, match="fault 1") as raised:
        with pc.control(pipe, *controllers):
            run(pipe, PROMPTS[:1], steps=1)
            fault.armed = True
    fault.armed = False
    assert snapshot(pipe) == before
    assert sorted(log) == ["a", "b"]
    monkeypatch.undo()
    with pc.control(pipe, pc.PassThrough()):  # refused with "already active" before the fix
        pass
    assert snapshot(pipe) == before
    assert all(pc.controllers.base.bound_session(c) is None for c in controllers)
    notes = raised.value.__notes__
    assert fault.calls >= 1 and len(notes) == fault.calls  # one note on the first error, one per later error
    assert "every other restore step still ran" in notes[0]
    assert sum("also failed: RestoreFault" in note for note in notes) == fault.calls - 1


class FailsToUnbind(pc.Controller):
    def unbind(self):
        raise RuntimeError("unbind failed")


class FailsToBind(pc.Controller):
    def bind(self, session):
        raise ValueError("cannot bind")


def test_body_error_propagates_and_a_failing_unbind_is_noted(fault_pipe):
    before = snapshot(fault_pipe)
    with pytest.raises(KeyError, match="body") as raised:
        with pc.control(fault_pipe, FailsToUnbind(), pc.PassThrough()):
            raise KeyError("body")
    notes = "\n".join(raised.value.__notes__)
    assert "restoring afterwards also failed: RuntimeError: unbind failed" in notes
    assert "FailsToUnbind.unbind()" in notes
    assert snapshot(fault_pipe) == before
    with pc.control(fault_pipe):
        pass


def test_failed_install_with_a_failing_unbind_restores_and_keeps_the_install_error(fault_pipe):
    before = snapshot(fault_pipe)
    with pytest.raises(ValueError, match="cannot bind") as raised:
        with pc.control(fault_pipe, FailsToUnbind(), FailsToBind()):
            pass
    assert "restoring afterwards also failed: RuntimeError: unbind failed" in "\n".join(raised.value.__notes__)
    assert snapshot(fault_pipe) == before
    with pc.control(fault_pipe):
        pass


def test_a_processor_left_by_a_failed_restore_is_named(fault_pipe, monkeypatch):
    """If a processor cannot be put back, the next session says so (not "a custom processor, IP-Adapter?")."""
    unet = fault_pipe.unet
    originals = dict(unet.attn_processors)
    key = next(k for k in originals if "attn2" in k)
    module = dict(unet.named_modules())[key.removesuffix(".processor")]
    set_processor = module.set_processor

    def refuses_to_restore(processor):
        if not isinstance(processor, ControlledAttnProcessor):
            raise RestoreFault("stuck")
        set_processor(processor)

    monkeypatch.setattr(module, "set_processor", refuses_to_restore)
    try:
        with pytest.raises(RestoreFault, match="stuck"):
            with pc.control(fault_pipe, pc.PassThrough()):
                pass
        monkeypatch.undo()
        with pytest.raises(ValueError, match=f"{key} still runs a promptcontrol processor left by an earlier"):
            with pc.control(fault_pipe, pc.PassThrough()):
                pass
    finally:
        monkeypatch.undo()
        unet.set_attn_processor(dict(originals))
    assert {k: id(v) for k, v in unet.attn_processors.items()} == {k: id(v) for k, v in originals.items()}


def test_controller_in_two_sessions_at_once_is_refused(tiny_pipes):
    """Issue 14.2: the inner session is refused before it touches anything; the outer keeps working exactly."""
    outer_pipe, other_pipe = tiny_pipes("sd15"), tiny_pipes("sd21")
    stock = run(outer_pipe, PROMPTS[:1])
    with pc.control(outer_pipe, pc.Reweight({"red": 4.0})):
        reference = run(outer_pipe, PROMPTS[:1])
    assert (reference - stock).abs().max() > 1e-4  # the weight does something, so "keeps working" means something
    before_outer, before_other = snapshot(outer_pipe), snapshot(other_pipe)
    shared = pc.Reweight({"red": 4.0})
    with pc.control(outer_pipe, shared) as outer:
        inner = pc.control(other_pipe, pc.PassThrough(), shared)
        refused = r"already bound .*session on StableDiffusionPipeline.*Make a new controller"
        with pytest.raises(pc.SessionError, match=refused) as raised:
            with inner:
                raise AssertionError("the inner session must not start")
        assert f"{id(outer_pipe):#x}" in str(raised.value)  # names the session that holds it
        assert snapshot(other_pipe) == before_other
        with pytest.raises(pc.SessionError, match="already bound"):  # a bare UNet as well
            with pc.control(other_pipe.unet, shared, tokenizer=other_pipe.tokenizer):
                pass
        assert pc.controllers.base.bound_session(shared) is outer
        during = run(outer_pipe, PROMPTS[:1])  # failed with "weighting words needs a tokenizer" before the fix
    assert (during - reference).abs().max() <= 1e-6
    assert snapshot(outer_pipe) == before_outer and snapshot(other_pipe) == before_other
    assert pc.controllers.base.bound_session(shared) is None


def test_controller_reused_after_its_session_ended(tiny_pipes):
    """Sequential reuse is normal: the same controller in a later session acts as a new one would."""
    first_pipe, second_pipe = tiny_pipes("sd15"), tiny_pipes("sd21")
    with pc.control(second_pipe, pc.Reweight({"red": 4.0})):
        fresh = run(second_pipe, PROMPTS[:1])
    reused = pc.Reweight({"red": 4.0})
    with pc.control(first_pipe, reused):
        run(first_pipe, PROMPTS[:1], steps=1)
    before = snapshot(second_pipe)
    with pc.control(second_pipe, reused):
        again = run(second_pipe, PROMPTS[:1])
    assert (again - fresh).abs().max() <= 1e-6
    assert snapshot(second_pipe) == before


def test_same_controller_twice_in_one_session_is_refused(sd15):
    before = snapshot(sd15)
    store = pc.AttentionStore()
    with pytest.raises(ValueError, match="same AttentionStore object is given twice"):
        pc.control(sd15, store, pc.PassThrough(), store)
    assert snapshot(sd15) == before


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

        def record(self, site, ctx, probs, plan):
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
    """Each controller's plan receives the plan of the one before it, at every cross site, in the order given."""
    position = 2
    calls = []  # (site key, controller name, the value scale it received at `position` or None)

    class Scale(pc.Controller):
        def __init__(self, name, factor):
            self.name, self.factor = name, factor

        def plan(self, site, ctx, plan):
            scale = plan.terms[0].value_scale if plan.terms else None  # (B, 77) or None
            calls.append((site.key, self.name, None if scale is None else scale[:, position].tolist()))
            w = torch.ones(ctx.batch_size, 77)
            w[:, position] = self.factor
            return plan.scaled(w)

    with pc.control(sd15, Scale("a", 2.0), Scale("b", 3.0), Scale("last", 1.0)):
        run(sd15, PROMPTS[:1], steps=1)  # one UNet call, CFG batch of 2
    cross = sorted(s.key for s in pc.find_sites(sd15.unet) if s.is_cross)
    assert len(calls) == 3 * len(cross) > 0
    for index in range(0, len(calls), 3):  # per site call: a, then b with a's plan, then last with both
        (key_a, *a), (key_b, *b), (key_last, *last) = calls[index : index + 3]
        assert key_a == key_b == key_last
        assert (a, b, last) == (["a", None], ["b", [2.0, 2.0]], ["last", [6.0, 6.0]])
    assert sorted(key for key, name, _ in calls if name == "a") == cross


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
