"""Cost of recording cross-attention (``pc.trace``) against stock diffusers, in one run; and the store's memory.

SD 1.5-architecture UNet (published config, random weights), batch 2 (CFG), ``--steps`` UNet calls per timing
(a fresh trace each timing, so the store's running sums are created and then added to). Cases run interleaved
after warm-up (``benchmarks/harness.py``); ratios are medians of per-round ratios with their min–max.

Peak memory: on CUDA the allocator's peak (the harness); on CPU the peak of live tensor bytes allocated during
the timed calls, counted by a ``TorchDispatchMode`` in separate, untimed runs (parameters and inputs excluded).

DAAM: ``pip install --no-deps daam`` (0.2.0) installs but does not import on its own: it imports spacy, scipy,
nltk... at module level (its pinned dependencies), so it is not compared here.

CPU:  ``python -m benchmarks.record``                 (256×256, latent 32×32)
GPU:  ``python -m benchmarks.record --device cuda --dtype float16 --size 512``
Memory table only (arithmetic from shapes, no weights): ``python -m benchmarks.record --memory``
Cross-attention calls alone (less noisy on a busy machine): ``python -m benchmarks.record --attention --repeats 20``
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import promptcontrol as pc

from .cases import PeakTensorBytes, cpu_peak_bytes  # noqa: F401  (shared with benchmarks/run.py)
from .harness import Case, compare, machine, markdown_table, save
from .models import SD15_CONFIG, SDXL_CONFIG, sd15_unet, unet_inputs


@contextlib.contextmanager
def recording_step(unet, latent_hw: tuple[int, int], **options):
    """A trace whose step context is set by hand, so that cross-attention modules can be called one by one."""
    from promptcontrol.context import StepContext, batch_layout

    with pc.trace(unet, cfg=True, **options) as tr:
        ctx = StepContext(index=0, timestep=500.0, total=None, latent_hw=latent_hw, layout=batch_layout(2, None, True))
        tr.session.context = ctx
        tr.store.begin_step(ctx)
        yield tr


def attention_only(unet, inputs, repeats: int, device: str) -> str:
    """The cross-attention calls alone (inputs captured from one UNet call), stock vs recorded, interleaved; and
    the recording's extra time as a share of a stock UNet call."""
    from promptcontrol.sites import attention_modules

    sites = [s for s in pc.find_sites(unet) if s.is_cross]
    modules = attention_modules(unet, sites)
    captured: dict[str, tuple] = {}

    def hook(key):
        def capture(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[key] = (hidden.detach().clone(), kwargs["encoder_hidden_states"].detach().clone())

        return capture

    handles = [modules[s.key].register_forward_pre_hook(hook(s.key), with_kwargs=True) for s in sites]
    with torch.inference_mode():
        unet(**inputs)
    for h in handles:
        h.remove()

    def cross_calls():
        for key, (hidden, ehs) in captured.items():
            modules[key](hidden, encoder_hidden_states=ehs)

    latent_hw = tuple(inputs["sample"].shape[-2:])
    cases = [
        Case(f"stock cross-attention ({len(sites)} sites)", cross_calls),
        Case("recorded (pc.trace default)", cross_calls, lambda: recording_step(unet, latent_hw)),
        Case("recorded, per_step=True", cross_calls, lambda: recording_step(unet, latent_hw, per_step=True)),
    ]
    results = compare(cases, repeats=repeats, warmup=2, device=device)
    unet_times = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.inference_mode():
            unet(**inputs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        unet_times.append(time.perf_counter() - start)
    t_unet = statistics.median(unet_times)
    lines = [markdown_table(f"Cross-attention calls alone, {machine()}", results), ""]
    for r in results[1:]:
        extra = r.median_s - results[0].median_s
        lines.append(
            f"- {r.name}: +{extra * 1000:,.1f} ms per step = {extra / t_unet:+.1%} of a stock UNet call "
            f"({t_unet * 1000:,.0f} ms) → estimated step ratio {1 + extra / t_unet:.3f}"
        )
    return "\n".join(lines)


def memory_table(steps: int = 50) -> str:
    """The store's memory for SD 1.5 at 512² and SDXL at 1024² (one image), from the sites' shapes."""
    from diffusers import UNet2DConditionModel

    from promptcontrol.controllers.store import estimate_bytes

    rows = []
    for name, config, size in (("SD 1.5", SD15_CONFIG, 512), ("SDXL", SDXL_CONFIG, 1024)):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        sites = [s for s in pc.find_sites(unet) if s.is_cross]
        latent = (size // 8, size // 8)
        levels = {}
        for s in sites:
            levels.setdefault(pc.sites.grid_for(latent, s.level), []).append(s)
        layout = ", ".join(f"{len(v)}×{h}²" for (h, _), v in sorted(levels.items(), reverse=True))
        options = [
            ("default (running sums)", {}),
            ("per_step (float16, max_side=32)", dict(per_step=True)),
            ("per_step='level' (float16, max_side=32)", dict(per_step="level")),
            ("per_step (float16, full resolution)", dict(per_step=True, max_side=None)),
            ("per_head (float32, max_side=32)", dict(per_head=True)),
        ]
        for label, kw in options:
            est = estimate_bytes(sites, latent, steps=steps, **kw)
            rows.append(f"| {name} {size}² | {layout} | {label} | {est['total'] / 2**20:,.1f} MiB |")
    head = [
        f"**AttentionStore memory per image, {steps} steps, 77 tokens (arithmetic from the sites' shapes)**",
        "",
        "| model | cross sites (count × grid) | store options | memory / image |",
        "| --- | --- | --- | ---: |",
    ]
    return "\n".join(head + rows)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="UNet calls per timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", default="benchmarks/results/record")
    parser.add_argument("--memory", action="store_true", help="print the memory table only")
    parser.add_argument("--attention", action="store_true", help="time the cross-attention calls alone")
    args = parser.parse_args(argv)

    if args.memory:
        text = memory_table()
        print(text)
        return text

    dtype = getattr(torch, args.dtype)
    unet = sd15_unet(dtype=dtype, device=args.device)
    inputs = unet_inputs(unet, args.size, batch=2)
    if args.attention:
        text = attention_only(unet, inputs, args.repeats, args.device)
        path = f"{args.out}-attention-{args.device}-{args.dtype}-{args.size}.md"
        with open(path, "w") as f:
            f.write(text + "\n")
        print(text)
        return text

    def steps():
        for i in range(args.steps):
            unet(**{**inputs, "timestep": inputs["timestep"] - 10 * i})

    cross = sum(s.is_cross for s in pc.find_sites(unet))
    cases = [
        Case("stock AttnProcessor2_0", steps),
        Case(f"pc.trace, default (all {cross} cross sites, every step)", steps, lambda: pc.trace(unet, cfg=True)),
        Case("pc.trace, per_step=True (CPU float16, max_side=32)", steps, lambda: pc.trace(unet, cfg=True, per_step=True)),
        Case("pc.trace, sites='up'", steps, lambda: pc.trace(unet, cfg=True, sites="up")),
    ]
    results = compare(cases, repeats=args.repeats, device=args.device)
    if args.device == "cpu":
        peaks = [cpu_peak_bytes(c, unet, inputs) for c in cases]
        for r, p in zip(results, peaks):
            r.peak_mb, r.peak_ratio = p / 2**20, p / peaks[0]
    title = (
        f"Recording cost: SD 1.5 UNet, {args.size}×{args.size}, batch 2, {args.steps} steps per timing, "
        f"{args.dtype}, {machine()}"
    )
    table = markdown_table(title, results, {cases[1].name: 1.15})
    save(f"{args.out}-{args.device}-{args.dtype}-{args.size}", title, results, {"markdown": table})
    print(table)
    return table


if __name__ == "__main__":
    main()
