"""Host–device syncs in every mode: the benchmark's sessions run under ``torch.cuda.set_sync_debug_mode``.

A sync inside a denoising step (``.item()``, ``.cpu()``, ``float(tensor)``, a blocking copy, branching on a
tensor's value) stalls a GPU until its queue drains. For every mode of ``benchmarks/run.py`` (stock, pass-through,
record, per-step record, reweight, Replace / Refine + self injection, + LocalBlend) this runs one pipeline call
twice, each in a fresh session:

* **inside the step** — mode ``"error"`` during every UNet call, the session's own step hooks included (its
  pre-hook runs after ours, its post-hook before ours): the first sync raises, and the row names the line.
  Stock diffusers runs this way first, so a sync found in a session's row is the session's;
* **whole call** — mode ``"warn"`` over the whole pipeline call (prompt encoding, scheduler, between-step work
  such as LocalBlend's latent masking): syncs counted by source line, against stock diffusers on as many prompts.
  Stock syncs outside the UNet (e.g. copying timesteps to the device), so only the excess is the session's.

Without CUDA the sync mode cannot be set: the same sessions still run (UNet calls counted, processors and hooks
checked restored), and the report says ``no CUDA: skipped the sync mode, ran the sessions``.

CUDA: ``python -m benchmarks.sync_check --models tiny-sd15 tiny-sdxl sd15:512``   (float16)
CPU:  ``python -m benchmarks.sync_check``                                         (tiny pipelines, float32)
Writes ``<out>-<device>.md`` and ``.json``; the exit status is 1 when a sync was found inside a step, a session
failed or something was left installed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import inspect
import json
import os
import sys
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import torch

import promptcontrol as pc

from .cases import EDIT, PROMPT, REFINED, SOURCE
from .harness import machine

SYNC_WORDS = "synchroniz"  # torch's message: "called a synchronizing CUDA operation"
NO_CUDA = "no CUDA: skipped the sync mode, ran the sessions"
SetMode = Callable[[object], None]  # torch.cuda.set_sync_debug_mode


@dataclass
class Mode:
    """One session to check: its name, the prompts of its pipeline call, and a factory of its context."""

    name: str
    prompts: list[str]
    context: Callable[[], ContextManager]
    stock: bool = False


@dataclass
class Row:
    """What one mode did on one model."""

    model: str
    mode: str
    prompts: int
    unet_calls: int = 0
    inside_step: str = ""  # "no sync" / "sync at file:line in func" / "skipped (no CUDA)"
    whole_call_syncs: int | None = None  # syncs in one pipeline call, warn mode (None without CUDA)
    stock_syncs: int | None = None  # the same for stock diffusers on as many prompts
    extra_sites: dict[str, int] = field(default_factory=dict)  # source line → syncs beyond stock's
    restored: bool = True
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.restored and not self.error and not self.inside_step.startswith("sync")


def modes(pipe) -> list[Mode]:
    """The benchmark's modes, stock diffusers first in each group (1 prompt; source + edit)."""
    from promptcontrol.controllers.inject import InjectSelf

    def control(*make):  # fresh controllers for every session
        return lambda: pc.control(pipe, *(m() for m in make))

    one, two = [PROMPT], [SOURCE, EDIT]
    return [
        Mode("stock", one, contextlib.nullcontext, stock=True),
        Mode("pass-through", one, control(pc.PassThrough)),
        Mode("record (default store)", one, lambda: pc.trace(pipe)),
        Mode("record per_step=True", one, lambda: pc.trace(pipe, per_step=True)),
        Mode("reweight {'red': 2}", one, control(lambda: pc.Reweight({"red": 2.0}))),
        Mode("stock, 2 prompts", two, contextlib.nullcontext, stock=True),
        Mode("edit: Replace + InjectSelf", two, control(lambda: pc.Replace(1.0), lambda: InjectSelf(1.0))),
        Mode("edit: Refine + InjectSelf", [SOURCE, REFINED], control(lambda: pc.Refine(1.0), lambda: InjectSelf(1.0))),
        Mode("edit: Replace + InjectSelf + LocalBlend", two,
             control(lambda: pc.Replace(1.0), lambda: InjectSelf(1.0),
                     lambda: pc.LocalBlend([["red"], ["blue"]], start=0.0))),
    ]


# ---- the two scopes ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def sync_errors_in_forward(module: torch.nn.Module, set_mode: SetMode | None):
    """Mode ``"error"`` during every forward of ``module`` and its hooks (ours run first and last), ``0`` outside.

    Enter it inside the session, so that our pre-hook is prepended before the session's and our post-hook appended
    after it. Yields a one-item list counting the forwards; ``set_mode=None`` (no CUDA) only counts."""
    calls = [0]

    def before(_module, _args):
        calls[0] += 1
        if set_mode is not None:
            set_mode("error")

    def after(_module, _args, _output):  # always_call: also when the forward or a hook raised
        if set_mode is not None:
            set_mode(0)

    pre = module.register_forward_pre_hook(before, prepend=True)
    post = module.register_forward_hook(after, always_call=True)
    try:
        yield calls
    finally:
        pre.remove()
        post.remove()
        if set_mode is not None:
            set_mode(0)


def count_syncs(call: Callable[[], object], set_mode: SetMode) -> collections.Counter:
    """Syncs during ``call()`` in mode ``"warn"``, counted by the source line that asked for them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_mode("warn")
        try:
            call()
        finally:
            set_mode(0)
    return collections.Counter(
        f"{_short(w.filename)}:{w.lineno}" for w in caught if SYNC_WORDS in str(w.message)
    )


def sync_site(error: BaseException) -> str:
    """Where a sync error came from: the innermost promptcontrol frame of its traceback, else the innermost one."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if _short(f.filename).startswith("promptcontrol/")]
    frame = (ours or frames or [None])[-1]
    if frame is None:
        return "an unknown line"
    return f"{_short(frame.filename)}:{frame.lineno} in {frame.name} ({(frame.line or '').strip()})"


ANCHORS = ("promptcontrol", "benchmarks", "tests", "diffusers", "transformers", "torch")


def _short(filename: str) -> str:
    """A path from its innermost package folder on (``promptcontrol/session.py``, ``diffusers/schedulers/...``)."""
    parts = Path(filename).parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] in ANCHORS:
            return "/".join(parts[i:])
    return filename


def _is_sync_error(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and SYNC_WORDS in str(error)


# ---- one mode on one model --------------------------------------------------------------------------------------
def _installed(pipe) -> tuple:
    """What a session changes and must put back: processors (by identity), UNet hooks, methods shadowed by
    functions on the pipeline or scheduler (a pipeline call's own attributes, numbers, do not count)."""
    unet = pipe.unet

    def shadowed(obj) -> list[str]:
        return sorted(k for k, v in vars(obj).items() if inspect.isfunction(v) or inspect.ismethod(v))

    return (
        {k: id(p) for k, p in unet.attn_processors.items()},
        len(unet._forward_pre_hooks), len(unet._forward_hooks), shadowed(pipe), shadowed(pipe.scheduler),
    )


def check_mode(mode: Mode, pipe, call: Callable[[list[str]], object], set_mode: SetMode | None, model: str,
               stock: dict[int, collections.Counter]) -> Row:
    """Run ``mode`` once with errors inside every UNet call, once counting syncs over the call (CUDA only)."""
    row = Row(model, mode.name, len(mode.prompts))
    before = _installed(pipe)
    try:
        with mode.context(), sync_errors_in_forward(pipe.unet, set_mode) as calls:
            try:
                call(mode.prompts)
                row.inside_step = "no sync" if set_mode else "skipped (no CUDA)"
            except RuntimeError as error:
                if not _is_sync_error(error):
                    raise
                row.inside_step = f"sync at {sync_site(error)}"
        row.unet_calls = calls[0]
        if set_mode is not None:
            with mode.context():
                sites = count_syncs(lambda: call(mode.prompts), set_mode)
            if mode.stock:
                stock[len(mode.prompts)] = sites
            baseline = stock.get(len(mode.prompts), collections.Counter())
            row.whole_call_syncs, row.stock_syncs = sum(sites.values()), sum(baseline.values())
            row.extra_sites = dict((sites - baseline).most_common(5))
    except Exception as error:  # noqa: BLE001 — one mode's failure is reported, the others still run
        row.error = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    row.restored = _installed(pipe) == before
    return row


# ---- models -----------------------------------------------------------------------------------------------------
def build(spec: str, device: str, dtype: torch.dtype):
    """``tiny-sd15`` / ``tiny-sdxl`` (the test pipelines, 32² by default) or ``sd15`` / ``sdxl`` (full-size UNet of
    the published config, random weights, as in the benchmark; 512² / 1024² by default); ``name:size`` sets the
    size. Returns the pipeline and the image side."""
    name, _, size = spec.partition(":")
    if name in ("sd15", "sdxl"):  # built on the device, in dtype
        from .cases import build_pipeline, build_unet

        return build_pipeline(build_unet(name, dtype, device)), int(size or (512 if name == "sd15" else 1024))
    if not name.startswith("tiny-"):
        raise ValueError(f"unknown model {spec!r}; use tiny-sd15, tiny-sdxl, sd15 or sdxl, optionally with :size")
    pipe = pc.testing.tiny_pipeline(name[5:], device=device)  # float32
    return (pipe if dtype == torch.float32 else pipe.to(dtype=dtype)), int(size or 32)


def caller(pipe, side: int, steps: int, device: str, dtype: torch.dtype) -> Callable[[list[str]], object]:
    """``call(prompts)``: one pipeline call from fixed latents made on the device (no host copy in the loop)."""
    g = torch.Generator(device).manual_seed(0)
    latents = torch.randn(1, 4, side // 8, side // 8, generator=g, device=device, dtype=dtype)

    def call(prompts: list[str]):
        with torch.inference_mode():
            return pipe(prompts, latents=latents.repeat(len(prompts), 1, 1, 1), height=side, width=side,
                        num_inference_steps=steps, output_type="latent")

    return call


def check_model(spec: str, steps: int, device: str, dtype: torch.dtype, set_mode: SetMode | None) -> list[Row]:
    """Every mode on one model (a warm-up call of stock diffusers first, outside any sync mode)."""
    pipe, side = build(spec, device, dtype)
    call = caller(pipe, side, steps, device, dtype)
    call([PROMPT])  # warm-up: lazy CUDA / cuBLAS initialisation is no step's sync
    stock: dict[int, collections.Counter] = {}
    rows = [check_mode(mode, pipe, call, set_mode, spec, stock) for mode in modes(pipe)]
    del pipe
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


# ---- report -----------------------------------------------------------------------------------------------------
def summary(rows: list[Row], cuda: bool) -> str:
    """One line: whether every mode ran, was restored and (on CUDA) kept syncs out of the step."""
    failed = [r for r in rows if r.error]
    unrestored = [r for r in rows if not r.restored]
    synced = [r for r in rows if r.inside_step.startswith("sync")]
    parts = [] if cuda else [NO_CUDA]
    parts.append(f"{len(rows)} sessions on {len({r.model for r in rows})} pipeline(s)")
    if cuda:
        parts.append("no sync inside any step" if not synced else
                     f"a sync inside the step in {len(synced)}: " + "; ".join(f"{r.model} {r.mode}" for r in synced))
    parts.append("all ran" if not failed else f"{len(failed)} failed: " + "; ".join(f"{r.mode}" for r in failed))
    parts.append("all restored" if not unrestored else
                 f"{len(unrestored)} left something installed: " + "; ".join(r.mode for r in unrestored))
    return ", ".join(parts)


def markdown(rows: list[Row], title: str, line: str) -> str:
    lines = [
        f"**{title}**", "",
        "| model | mode | prompts | UNet calls | inside each UNet call (mode \"error\") | syncs per call, whole call "
        "(stock) | lines beyond stock | restored | error |",
        "| --- | --- | ---: | ---: | --- | ---: | --- | :---: | --- |",
    ]
    for r in rows:
        syncs = "—" if r.whole_call_syncs is None else f"{r.whole_call_syncs} ({r.stock_syncs})"
        extra = ", ".join(f"`{k}` ×{v}" for k, v in r.extra_sites.items())
        lines.append(f"| {r.model} | {r.mode} | {r.prompts} | {r.unet_calls} | {r.inside_step} | {syncs} | {extra} | "
                     f"{'yes' if r.restored else '**no**'} | {r.error} |")
    return "\n".join([*lines, "", line])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-sd15", "tiny-sdxl"],
                        help="tiny-sd15, tiny-sdxl, sd15, sdxl, each optionally :size (default: the tiny pipelines)")
    parser.add_argument("--steps", type=int, default=3, help="denoising steps per call (default 3)")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: float16 on CUDA")
    parser.add_argument("--out", default="benchmarks/results/sync-check")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device here; leave --device out to run on the CPU")
    dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    set_mode = torch.cuda.set_sync_debug_mode if cuda else None

    rows = [row for spec in args.models for row in check_model(spec, args.steps, device, dtype, set_mode)]
    line = summary(rows, cuda)
    title = (f"Sync check: {args.steps} denoising step(s) per call, {str(dtype).replace('torch.', '')}, "
             f"{device} — {machine()}")
    text = markdown(rows, title, line)
    out = Path(f"{args.out}-{'cuda' if cuda else device}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"machine": machine(), "title": title, "summary": line, "args": vars(args),
         "rows": [{**asdict(r), "ok": r.ok} for r in rows]}, indent=2))
    print(text, flush=True)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
