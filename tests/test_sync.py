"""No host–device synchronisation inside a denoising step, in any mode (checked structurally on the CPU).

On a GPU, reading a tensor's value on the host (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``) or copying
it to the CPU with a blocking copy waits for every kernel queued so far: the host stops launching and the GPU
idles. Here, a :class:`SyncGuard` is active inside each UNet call — from before the session's pre-hook (which
builds the step context and calls every ``begin_step``) to after its post-hook (``end_step``). It marks as
"device data" the UNet's parameters, the tensors the UNet call receives and everything computed from them, and
fails on any value read or blocking CPU copy of device data. Tensors a controller builds on the host (token
maps, weights) are not device data: building them, and moving them to the device, is allowed.
"""

from __future__ import annotations

import traceback
import weakref

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

import promptcontrol as pc
from promptcontrol.controllers.inject import InjectSelf

aten = torch.ops.aten
READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default, aten.item.default}
HOST_METHODS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"}


class _Taint(TorchDispatchMode):
    """Marks every output computed from device data; fails on a value read of device data."""

    def __init__(self, guard: "SyncGuard"):
        super().__init__()
        self.guard = guard

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        tainted = any(self.guard.is_device_data(t) for t in inputs)
        if tainted and func in READS:
            self.guard.fail(f"{func} (a host read of a device value)")
        out = func(*args, **kwargs)
        if tainted:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.guard.mark(t)
        return out


class _HostCalls(TorchFunctionMode):
    """Fails on Python-level reads / blocking CPU copies of device data (``.cpu()``, ``.to("cpu")``, ...)."""

    def __init__(self, guard: "SyncGuard"):
        super().__init__()
        self.guard = guard

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if args and isinstance(args[0], torch.Tensor) and self.guard.is_device_data(args[0]):
            if name in HOST_METHODS:
                self.guard.fail(f"Tensor.{name}() of device data")
            if name == "to" and _to_cpu(args, kwargs) and not kwargs.get("non_blocking", False) and _ours():
                self.guard.fail("a blocking Tensor.to('cpu') of device data (use non_blocking into pinned memory)")
        return func(*args, **kwargs)


def _to_cpu(args, kwargs) -> bool:
    targets = [*args[1:], kwargs.get("device")]
    return any(
        (isinstance(t, str) and t.startswith("cpu")) or (isinstance(t, torch.device) and t.type == "cpu")
        for t in targets
    )


def _outside_torch():
    for frame in reversed(traceback.extract_stack()):
        if "/torch/" not in frame.filename and not frame.filename.endswith("test_sync.py"):
            return frame
    return None


def _ours() -> bool:
    """Whether promptcontrol asked: on the CPU every device is the CPU, so diffusers' own ``.to(sample.device)``
    (a no-op on the GPU too) cannot be told from a CPU copy; promptcontrol's are what this test is about."""
    frame = _outside_torch()
    return frame is not None and "/promptcontrol/" in frame.filename


def _caller() -> str:
    """The innermost frame outside torch and this file: where the sync was asked for."""
    frame = _outside_torch()
    if frame is None:
        return "?"
    return f"{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} ({frame.name})"


class SyncGuard:
    """Active inside each UNet call of ``unet`` (install before the session, ``arm_post`` after entering it)."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self.device_data: dict[int, weakref.ref] = {}  # id -> weak reference (tensors compare elementwise)
        self.failures: list[str] = []
        self.calls = 0
        self._modes: tuple | None = None
        self._handles = [unet.register_forward_pre_hook(self._enter, with_kwargs=True)]

    def arm_post(self) -> None:
        """Registered after the session's post-hook, so that its ``end_step`` runs inside the guard."""
        self._handles.append(self.unet.register_forward_hook(self._exit))

    def is_device_data(self, t: torch.Tensor) -> bool:
        ref = self.device_data.get(id(t))
        return ref is not None and ref() is t

    def mark(self, t: torch.Tensor) -> None:
        self.device_data[id(t)] = weakref.ref(t)

    def fail(self, what: str) -> None:
        self.failures.append(f"{what} at {_caller()}")

    def _enter(self, module, args, kwargs):
        self.calls += 1
        for t in [*module.parameters(), *module.buffers(), *tree_leaves((args, kwargs))]:
            if isinstance(t, torch.Tensor):
                self.mark(t)
        self._modes = (_HostCalls(self), _Taint(self))
        for mode in self._modes:
            mode.__enter__()

    def _exit(self, module, args, output):
        for mode in reversed(self._modes):
            mode.__exit__(None, None, None)
        self._modes = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


PROMPT = "a red car"
EDIT = ["a red car", "a blue car"]
REFINE = ["a red car", "a red sports car"]

MODES = {
    "pass-through": (PROMPT, lambda: [pc.PassThrough()]),
    "record": (PROMPT, lambda: [pc.AttentionStore()]),
    "record per_step": (PROMPT, lambda: [pc.AttentionStore(per_step=True)]),
    "record per_step=level + per_head": (PROMPT, lambda: [pc.AttentionStore(per_step="level", per_head=True)]),
    "reweight attention": (PROMPT, lambda: [pc.Reweight({"red": 2.0})]),
    "reweight softmax": (PROMPT, lambda: [pc.Reweight({"red": 2.0}, mode="softmax")]),
    "replace": (EDIT, lambda: [pc.Replace(0.8)]),
    "refine": (REFINE, lambda: [pc.Refine(0.8)]),
    "inject": (EDIT, lambda: [pc.Replace(0.8), InjectSelf(0.5)]),
    "local blend": (EDIT, lambda: [pc.Replace(0.8), pc.LocalBlend([["red"], ["blue"]], start=0.0)]),
    "edit + record": (EDIT, lambda: [pc.Replace(0.8), InjectSelf(0.5), pc.AttentionStore(per_step=True)]),
}


def run_guarded(pipe, prompts, controllers, steps=3) -> SyncGuard:
    guard = SyncGuard(pipe.unet)
    try:
        with pc.control(pipe, *controllers):
            guard.arm_post()
            pipe(prompts, height=32, width=32, num_inference_steps=steps, output_type="latent",
                 generator=torch.Generator().manual_seed(0))
    finally:
        guard.remove()
    return guard


@pytest.mark.parametrize("mode", list(MODES))
def test_no_device_sync_inside_a_step(sd15, mode):
    prompts, make = MODES[mode]
    guard = run_guarded(sd15, prompts, make())
    assert guard.calls == 3  # the guard was active in every UNet call
    assert not guard.failures, f"{mode}: host-device syncs inside a step: {sorted(set(guard.failures))}"


def test_guard_catches_a_sync():
    """The guard itself: a controller that reads a device value inside the step is caught."""

    class Peeks(pc.PassThrough):
        def plan(self, site, ctx, plan):
            return plan

        def record(self, site, ctx, probs, plan):
            self.seen = float(probs.max())

        def wants_probs(self, site, ctx):
            return site.attends_text

    pipe = pc.testing.tiny_pipeline("sd15")
    guard = run_guarded(pipe, PROMPT, [Peeks()], steps=1)
    assert any("_local_scalar_dense" in f for f in guard.failures), guard.failures


def test_recordings_are_readable_after_the_run(sd15):
    """What the store moved to the CPU in bulk is there, on the CPU, once the run is over."""
    store = pc.AttentionStore(per_step=True, per_head=True)
    with pc.control(sd15, store):
        sd15(PROMPT, height=32, width=32, num_inference_steps=3, output_type="latent")
    rec = store.recording(0)
    assert rec.steps == (0, 1, 2)
    timesteps = [rec.timesteps[s] for s in rec.steps]
    assert all(isinstance(t, float) for t in timesteps) and timesteps == sorted(timesteps, reverse=True)
    assert all(t.device.type == "cpu" for step in rec.step_maps.values() for t in step.values())
    assert all(t.device.type == "cpu" for t in rec.head_sums.values())
