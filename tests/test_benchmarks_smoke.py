"""``benchmarks/sync_check.py`` on the CPU: every mode runs and is restored, and — with a stand-in for
``torch.cuda.set_sync_debug_mode`` — a sync inside a step is caught and located, one between steps is counted, and
the mode covers the session's own step hooks and is reset when a step raises."""

from __future__ import annotations

import collections
import contextlib
import json
import warnings

import pytest

import promptcontrol as pc
from benchmarks import sync_check as sc

STEPS = 2


class FakeSyncMode:
    """Stands in for ``torch.cuda.set_sync_debug_mode``; :meth:`sync` acts as a CUDA sync does under each mode."""

    def __init__(self):
        self.mode = 0

    def __call__(self, mode) -> None:
        self.mode = mode

    def sync(self) -> None:
        if self.mode == "error":
            raise RuntimeError("called a synchronizing CUDA operation")
        if self.mode == "warn":
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=2)  # the asking line


class ModeProbe(pc.Controller):
    """Notes the sync mode seen by the session's step hooks."""

    def __init__(self, fake: FakeSyncMode):
        self.fake, self.seen = fake, []

    def begin_step(self, ctx) -> None:
        self.seen.append(("begin", self.fake.mode))

    def end_step(self, ctx) -> None:
        self.seen.append(("end", self.fake.mode))


class SyncInStep(pc.Controller):
    def __init__(self, fake: FakeSyncMode):
        self.fake = fake

    def begin_step(self, ctx) -> None:
        self.fake.sync()


class SyncBetweenSteps(pc.Controller):
    def __init__(self, fake: FakeSyncMode):
        self.fake = fake

    def transform_latents(self, ctx, latents):
        self.fake.sync()
        return latents


@pytest.fixture
def call(sd15):
    return sc.caller(sd15, 32, STEPS, "cpu", sd15.unet.dtype)


def check(pipe, call, fake, controller) -> sc.Row:
    """One mode under the stand-in, after stock diffusers (whose syncs are the baseline)."""
    stock: dict[int, collections.Counter] = {}
    stock_row = sc.check_mode(sc.Mode("stock", ["a red car"], contextlib.nullcontext, stock=True), pipe, call,
                              fake, "tiny-sd15", stock)
    assert stock_row.ok and stock_row.whole_call_syncs == 0
    return sc.check_mode(sc.Mode("probe", ["a red car"], lambda: pc.control(pipe, controller)), pipe, call, fake,
                         "tiny-sd15", stock)


def test_cpu_run_of_every_mode_says_the_sync_mode_was_skipped(tmp_path):
    assert sc.main(["--models", "tiny-sd15", "--steps", str(STEPS), "--device", "cpu",
                    "--out", str(tmp_path / "sync")]) == 0
    report = json.loads((tmp_path / "sync-cpu.json").read_text())
    assert [r["mode"] for r in report["rows"]] == [m.name for m in sc.modes(None)]
    assert all(r["unet_calls"] == STEPS and r["restored"] and not r["error"] for r in report["rows"])
    assert {r["inside_step"] for r in report["rows"]} == {"skipped (no CUDA)"}
    assert report["summary"].startswith(sc.NO_CUDA)
    assert sc.NO_CUDA in (tmp_path / "sync-cpu.md").read_text()


def test_error_mode_covers_the_session_step_hooks_and_only_them(sd15, call):
    fake = FakeSyncMode()
    probe = ModeProbe(fake)
    with pc.control(sd15, probe), sc.sync_errors_in_forward(sd15.unet, fake) as calls:
        call(["a red car"])
        assert fake.mode == 0  # between and after the UNet calls
    assert calls == [STEPS]
    assert probe.seen == [("begin", "error"), ("end", "error")] * STEPS


def test_error_mode_is_reset_when_a_step_raises(sd15, call):
    class Raises(pc.Controller):
        def begin_step(self, ctx):
            raise ValueError("boom")

    fake = FakeSyncMode()
    with pc.control(sd15, Raises()), sc.sync_errors_in_forward(sd15.unet, fake):
        with pytest.raises(ValueError, match="boom"):
            call(["a red car"])
        assert fake.mode == 0
    assert not sd15.unet._forward_pre_hooks and not sd15.unet._forward_hooks


def test_a_sync_inside_the_step_is_caught_and_located(sd15, call):
    fake = FakeSyncMode()
    row = check(sd15, call, fake, SyncInStep(fake))
    assert row.inside_step.startswith("sync at promptcontrol/"), row.inside_step  # the session line that asked
    assert not row.ok and row.restored and not row.error
    assert (row.whole_call_syncs, row.stock_syncs) == (STEPS, 0)
    assert sum(row.extra_sites.values()) == STEPS
    assert all(k.startswith("tests/test_benchmarks_smoke.py:") for k in row.extra_sites), row.extra_sites
    assert fake.mode == 0


def test_a_sync_between_steps_is_counted_beyond_stock_not_flagged(sd15, call):
    fake = FakeSyncMode()

    def call_stock_syncs_once(prompts):  # as diffusers does, e.g. copying the timesteps to the device
        fake.sync()
        return call(prompts)

    stock: dict[int, collections.Counter] = {}
    sc.check_mode(sc.Mode("stock", ["a red car"], contextlib.nullcontext, stock=True), sd15, call_stock_syncs_once,
                  fake, "tiny-sd15", stock)
    row = sc.check_mode(sc.Mode("probe", ["a red car"], lambda: pc.control(sd15, SyncBetweenSteps(fake))), sd15,
                        call_stock_syncs_once, fake, "tiny-sd15", stock)
    assert row.inside_step == "no sync" and row.ok
    assert (row.whole_call_syncs, row.stock_syncs) == (STEPS + 1, 1)
    assert sum(row.extra_sites.values()) == STEPS


@pytest.mark.parametrize("leak", ["hook", "shadowed method"])
def test_a_mode_that_leaves_something_installed_is_reported(sd15, call, leak):
    undo = []

    @contextlib.contextmanager
    def leaky():
        if leak == "hook":
            undo.append(sd15.unet.register_forward_hook(lambda *args: None).remove)
        else:
            sd15.scheduler.set_timesteps = sd15.scheduler.set_timesteps  # an instance attribute now
            undo.append(lambda: vars(sd15.scheduler).pop("set_timesteps"))
        yield

    try:
        row = sc.check_mode(sc.Mode("leaky", ["a red car"], leaky), sd15, call, None, "tiny-sd15", {})
    finally:
        for step in undo:
            step()
    assert not row.restored and not row.ok and row.unet_calls == STEPS


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="tiny-sd15, tiny-sdxl, sd15 or sdxl"):
        sc.build("sd3", "cpu", None)


def test_dispatch_case_runs_and_reports_every_mode(tmp_path):
    """`benchmarks.run --only dispatch` (what gpu.sh calls) runs on the CPU and writes a row per mode."""
    import subprocess
    import sys

    out = tmp_path / "dispatch.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--only", "dispatch", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.read_text() if out.exists() else result.stdout
    for mode in ("pass-through", "record", "reweight", "Replace"):
        assert mode in text, mode
