"""Host cost per controlled attention call ("dispatch"): the Python work a GPU user pays at every site.

With the attention compute made negligible (a tiny SD 1.x UNet from ``promptcontrol.testing``, 8×8 latent, UNet
batch 2, one thread), the time a mode adds over stock ``AttnProcessor2_0`` is the controls' host work. Each round
times one pipeline call of ``forwards`` denoising steps per case (cases interleaved, sessions entered outside
the timed region); the best of ``rounds`` rounds is kept per case. Reported per case:

* ``µs / attention call``: (case − stock) / forwards / every attention call of the UNet (self + cross);
* ``µs / controlled call``: the same over the calls that run a promptcontrol processor (the sites the mode's
  controllers act at; a recorder installs on cross sites only);
* ``inside attention``: the same difference timed inside each ``Attention.forward`` only (the processor and its
  ops; the rest of the UNet and the pipeline, which add their own noise, left out), best round's mean per call;
* ``kernels / controlled call``: the tensor operations that launch work (not views, not no-op casts), counted
  by a ``TorchDispatchMode`` over one denoising step, over stock's, per controlled call — free of the machine's
  noise and of the CPU's compute; on a GPU each is one kernel launch (a few µs of host time in eager PyTorch);
* the ratio of the case's time to stock (tiny model: the ratio of host work, not of a GPU step);
* a **projection** of the share a GPU step would gain: ``µs / controlled call × controlled sites of the full model
  / published fp16 step time`` (SD 1.5: 16 cross + 16 self sites; SDXL: 70 + 70). Step times: fal-ai
  stable-diffusion-benchmarks, A100 80G SXM, fp16, diffusers + torch 2.1 SDPA, 50 steps with CFG, end to end:
  SD 1.5 at 512² 31.44 it/s (31.8 ms/step), SDXL at 1024² 8.43 it/s (118.6 ms/step)
  (https://github.com/fal-ai/stable-diffusion-benchmarks). It assumes host and device do not overlap (the worst
  case: what a compiled or few-step model sees); a GPU run of this case replaces it.

``python -m benchmarks.run --only dispatch`` (or ``python -m benchmarks.dispatch``) writes
``benchmarks/results/dispatch-<device>-<dtype>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

import promptcontrol as pc

from .harness import machine

PROMPT = "a red car parked on a street"
SOURCE, EDIT, REFINED = "a red car parked on a street", "a blue car parked on a street", "a red sports car parked on a street"
STEP_MS = {"sd15": (31.8, "SD 1.5 512², A100 fp16, 31.44 it/s"), "sdxl": (118.6, "SDXL 1024², A100 fp16, 8.43 it/s")}
CROSS_SITES = {"sd15": 16, "sdxl": 70}  # self sites: as many again
GOALS_US = {"pass-through": 5.0, "reweight": 10.0, "edit": 10.0, "record": 20.0}


@dataclass
class DispatchCase:
    name: str
    prompts: list[str]
    guidance: float  # 7.5: [uncond | cond] (batch 2 for one prompt); 1.0: source + edit without CFG (batch 2)
    make: Callable[[], tuple]  # fresh controllers for each round
    goal: str | None = None


@dataclass
class DispatchResult:
    name: str
    best_s: float
    stock_s: float
    ratio: float
    us_per_attention_call: float
    us_per_controlled_call: float | None
    controlled_sites: int
    all_sites: int
    goal_us: float | None
    projection_sd15_pct: float | None
    projection_sdxl_pct: float | None
    inside_us: float  # mean time inside Attention.forward per call, best round
    inside_extra_us: float | None  # inside_us − stock's
    kernels_per_call: float = 0.0  # working tensor ops per attention call (one denoising step)
    extra_kernels_per_controlled_call: float | None = None  # (case − stock) per controlled call


def cases() -> list[DispatchCase]:
    from promptcontrol.controllers.inject import InjectSelf

    return [
        DispatchCase("stock AttnProcessor2_0", [PROMPT], 7.5, lambda: ()),
        DispatchCase("pass-through (PassThrough, every site)", [PROMPT], 7.5, lambda: (pc.PassThrough(),), "pass-through"),
        DispatchCase("record (default AttentionStore)", [PROMPT], 7.5, lambda: (pc.AttentionStore(),), "record"),
        DispatchCase("record per_step=True", [PROMPT], 7.5, lambda: (pc.AttentionStore(per_step=True),)),
        DispatchCase("reweight Reweight({'red': 2})", [PROMPT], 7.5, lambda: (pc.Reweight({"red": 2.0}),), "reweight"),
        DispatchCase("stock AttnProcessor2_0, source + edit", [SOURCE, EDIT], 1.0, lambda: ()),
        DispatchCase("edit: Replace + InjectSelf", [SOURCE, EDIT], 1.0, lambda: (pc.Replace(1.0), InjectSelf(1.0)), "edit"),
        DispatchCase("edit: Refine + InjectSelf", [SOURCE, REFINED], 1.0, lambda: (pc.Refine(1.0), InjectSelf(1.0)), "edit"),
        DispatchCase(
            "edit: Replace + InjectSelf + LocalBlend", [SOURCE, EDIT], 1.0,
            lambda: (pc.Replace(1.0), InjectSelf(1.0), pc.LocalBlend([["red"], ["blue"]], start=0.0)),
        ),
    ]


def _controlled_sites(pipe, controllers: tuple) -> int:
    """How many attention sites run a promptcontrol processor under ``controllers``."""
    if not controllers:
        return 0
    with pc.control(pipe, *controllers) as session:
        return sum(type(p).__module__.startswith("promptcontrol") for p in session.unet.attn_processors.values())


class AttentionClock:
    """Time spent inside every ``Attention.forward`` (processor included), while installed. ``timer``: the clock
    (the CPU time of the calling thread on CPU, as the pipeline's own timing uses CPU time: on a shared machine a
    wall clock also counts the time other processes hold the core; the wall clock on CUDA)."""

    def __init__(self, timer: Callable[[], float] = time.perf_counter):
        from diffusers.models.attention_processor import Attention

        self.cls, self.original = Attention, Attention.forward
        self.total, self.calls = 0.0, 0
        clock = self

        def forward(module, *args, **kwargs):
            start = timer()
            out = clock.original(module, *args, **kwargs)
            clock.total += timer() - start
            clock.calls += 1
            return out

        self.forward = forward

    def __enter__(self):
        self.cls.forward = self.forward
        return self

    def __exit__(self, *exc):
        self.cls.forward = self.original

    def reset(self) -> None:
        self.total, self.calls = 0.0, 0

    @property
    def per_call_us(self) -> float:
        return self.total / max(self.calls, 1) * 1e6


class KernelCount:
    """Counts the tensor operations that do work (a kernel launch on a GPU): every op but views and casts that
    return their input; in-place ops count."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                counter.ops += counter.works(func, args, out)
                return out

        self.mode, self.ops = _Mode(), 0

    @staticmethod
    def works(func, args, out) -> int:
        if func._schema.is_mutable:
            return 1
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        outs = out if isinstance(out, (tuple, list)) else (out,)
        tensors = [o for o in outs if isinstance(o, torch.Tensor)]
        return int(bool(tensors) and any(o.untyped_storage().data_ptr() not in inputs for o in tensors))


def _kernels_per_call(pipe, case: DispatchCase, clock: "AttentionClock") -> float:
    """Working tensor ops per attention call over one denoising step of ``case`` (warm: its second step)."""
    side = 8 * pipe.vae_scale_factor
    call = dict(height=side, width=side, num_inference_steps=2, guidance_scale=case.guidance, output_type="latent")
    counter = KernelCount()
    state = {"step": 0}

    def on_step(p, i, t, kwargs):
        state["step"] += 1
        return kwargs

    original = clock.cls.forward

    def counted(module, *args, **kwargs):
        if state["step"] != 1:
            return original(module, *args, **kwargs)
        with counter.mode:
            out = original(module, *args, **kwargs)
        clock.calls += 1
        return out

    controllers = case.make()
    clock.cls.forward, clock.calls = counted, 0
    try:
        with pc.control(pipe, *controllers) if controllers else contextlib.nullcontext(), torch.inference_mode():
            pipe(case.prompts, generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step, **call)
    finally:
        clock.cls.forward = original
    return counter.ops / max(clock.calls, 1)


def _time_one(pipe, case: DispatchCase, forwards: int, device: str, clock_in: "AttentionClock | None" = None) -> float:
    side = 8 * pipe.vae_scale_factor  # an 8×8 latent
    call = dict(height=side, width=side, num_inference_steps=forwards, guidance_scale=case.guidance, output_type="latent")
    controllers = case.make()
    with pc.control(pipe, *controllers) if controllers else contextlib.nullcontext():
        g = torch.Generator().manual_seed(0)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        clock = time.perf_counter if device.startswith("cuda") else time.process_time
        if clock_in is not None:
            clock_in.reset()
        start = clock()
        with torch.inference_mode():
            pipe(case.prompts, generator=g, **call)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return clock() - start


def measure(forwards: int = 200, rounds: int = 11, device: str = "cpu", dtype=torch.float32) -> list[DispatchResult]:
    """Best-of-``rounds`` time of each case (interleaved), turned into host µs per attention call."""
    torch.set_num_threads(1)
    pipe = pc.testing.tiny_pipeline("sd15").to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    all_cases = cases()
    all_sites = len(pipe.unet.attn_processors)
    controlled = [_controlled_sites(pipe, c.make()) for c in all_cases]
    counter_clock = AttentionClock()
    kernels = [_kernels_per_call(pipe, c, counter_clock) for c in all_cases]
    for case in all_cases:  # warm-up
        _time_one(pipe, case, 2, device)
    best = [float("inf")] * len(all_cases)
    inside = [float("inf")] * len(all_cases)
    with AttentionClock(time.perf_counter if device.startswith("cuda") else time.thread_time) as attention_clock:
        for _ in range(rounds):
            for i, case in enumerate(all_cases):
                best[i] = min(best[i], _time_one(pipe, case, forwards, device, attention_clock))
                inside[i] = min(inside[i], attention_clock.per_call_us)
    results, stock = [], None
    for case, t, n, t_in, kern in zip(all_cases, best, controlled, inside, kernels):
        if not n:
            stock, stock_in, stock_kern = t, t_in, kern
        extra_us = (t - stock) / forwards * 1e6  # per UNet call
        per_controlled = extra_us / n if n else None
        share = n / all_sites  # controlled share of sites, carried to the full model
        proj = {
            m: None if per_controlled is None else per_controlled * 2 * CROSS_SITES[m] * share / (STEP_MS[m][0] * 1e3) * 100
            for m in STEP_MS
        }
        results.append(DispatchResult(
            case.name, t, stock, t / stock, extra_us / all_sites, per_controlled, n, all_sites,
            GOALS_US.get(case.goal) if case.goal else None, proj["sd15"], proj["sdxl"],
            t_in, None if not n else t_in - stock_in,
            kern, None if not n else (kern - stock_kern) * all_sites / n,
        ))
    return results


def table(results: list[DispatchResult], title: str) -> str:
    lines = [
        f"**{title}**",
        "",
        "| case | µs / attention call | µs / controlled call (sites) | inside attention: µs / call over stock | goal "
        "| kernels / controlled call over stock | ratio to stock (tiny) | projection: SD 1.5 step | projection: SDXL step |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if r.us_per_controlled_call is None:
            lines.append(f"| {r.name} | — | — | {r.inside_us:.1f} µs a call | | {r.kernels_per_call:.1f} a call "
                         f"| 1.000 ({r.best_s:.3f} s a round) | | |")
            continue
        goal = "" if r.goal_us is None else f"≤{r.goal_us:g}"
        lines.append(
            f"| {r.name} | {r.us_per_attention_call:+.1f} | {r.us_per_controlled_call:+.1f} ({r.controlled_sites}) | "
            f"{r.inside_extra_us:+.1f} | {goal} | {r.extra_kernels_per_controlled_call:+.1f} | {r.ratio:.3f} | "
            f"{r.projection_sd15_pct:+.1f} % | "
            f"{r.projection_sdxl_pct:+.1f} % |"
        )
    lines += [
        "",
        "µs / attention call: the pipeline's time over stock per forward / 14 attention calls; µs / controlled call: "
        "the same over the calls that run a promptcontrol processor; inside attention: time inside Attention.forward "
        "per call (all 14; thread CPU time on CPU) over stock's — the processor's own cost, without the rest of the pipeline's noise; "
        "kernels: the tensor ops that do work (not views or no-op casts) in one denoising step, over stock's, per "
        "controlled call — each is a kernel launch on a GPU, and the one column here free of this machine's noise.",
        "",
        "Projection (not a GPU measurement): µs per controlled call × the full model's controlled sites (SD 1.5: 16 "
        "cross + 16 self; SDXL: 70 + 70, in this mode's controlled share) / the published fp16 step time — "
        f"{STEP_MS['sd15'][1]} = {STEP_MS['sd15'][0]} ms, {STEP_MS['sdxl'][1]} = {STEP_MS['sdxl'][0]} ms "
        "(fal-ai/stable-diffusion-benchmarks, diffusers + torch 2.1 SDPA, CFG); no host/device overlap assumed.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--forwards", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--out", default="benchmarks/results/dispatch")
    args = parser.parse_args(argv)
    dtype_name = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    results = measure(args.forwards, args.rounds, args.device, getattr(torch, dtype_name))
    title = (
        f"Host cost per attention call over stock: tiny SD 1.x UNet, 8×8 latent, UNet batch 2, {args.forwards} "
        f"forwards a round, best of {args.rounds} interleaved rounds, 1 thread, process CPU time (CPU) or wall clock (CUDA), {args.device} {dtype_name} — {machine()}"
    )
    text = table(results, title)
    out = Path(f"{args.out}-{'cuda' if args.device.startswith('cuda') else args.device}-{dtype_name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"machine": machine(), "args": vars(args), "results": [asdict(r) for r in results]}, indent=2
    ))
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
