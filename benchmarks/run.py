"""One benchmark for every mode: time per denoising step against stock diffusers and the explicit-attention approach.

The cases are :func:`benchmarks.cases.step_cases` (stock ``AttnProcessor2_0``; pass-through; record with the default
store and with per-step maps; reweight; replace / refine edit; edit + local blend; diffusers' classic
``AttnProcessor`` everywhere; explicit prompt-to-prompt), all timed round-robin in one process after warm-up by
``benchmarks/harness.py``; each ratio is the median of per-round ratios to the stock case *on the same rows*
(1 prompt: UNet batch 2; source + edit: UNet batch 4), with its min–max.

CPU:  ``python -m benchmarks.run --quick``   SD 1.5 UNet at 256², 1 step per call, process CPU time
GPU:  ``python -m benchmarks.run --gpu``     SD 1.5 at 512² and SDXL at 1024², fp16, wall clock with CUDA sync,
                                             peak CUDA memory (``--compile inductor`` adds compiled variants)
Writes ``benchmarks/results/run-<device>-<dtype>.md`` and ``.json`` (the machine line included).
"""

from __future__ import annotations

import argparse
import json
import textwrap
from dataclasses import asdict
from pathlib import Path

import torch

import promptcontrol as pc

from .cases import TARGETS, Entry, compiled_cases, cpu_peak_bytes, make_bench, step_cases
from .harness import MET, MISSED, VERDICT_RULE, Result, compare, machine, verdict


def rebase(results: list[Result], entries: list[Entry]) -> list[Result]:
    """Each result's ratio taken per round against its own group's stock case (the harness used ``cases[0]``)."""
    import statistics

    by_name = {r.name: r for r in results}
    for entry, r in zip(entries, results):
        base = by_name[entry.baseline]
        ratios = [t / b for t, b in zip(r.times_s, base.times_s)]
        r.ratio, r.ratio_min, r.ratio_max = statistics.median(ratios), min(ratios), max(ratios)
        if r.peak_mb is not None and base.peak_mb:
            r.peak_ratio = r.peak_mb / base.peak_mb
    return results


def store_growth(steps: tuple[int, int] = (2, 8)) -> dict:
    """Bytes the default store holds after ``steps[0]`` and ``steps[1]`` steps (tiny pipeline): bounded means equal."""
    pipe = pc.testing.tiny_pipeline("sd15")
    held = {}
    for n in steps:
        for per_step in (False, True):
            with pc.trace(pipe, per_step=per_step) as tr:
                pipe("a red car", height=32, width=32, num_inference_steps=n, output_type="latent")
            held[f"{'per_step' if per_step else 'default'}-{n}"] = tr.store.memory_bytes()
    return held


def table(title: str, results: list[Result], entries: list[Entry], unit: str) -> str:
    lines = [
        f"**{title}**",
        "",
        f"| case | median time / {unit} | ratio to stock, same rows (min–max) | peak memory | target | met |",
        "| --- | ---: | ---: | ---: | ---: | :---: |",
    ]
    group = None
    for entry, r in zip(entries, results):
        if entry.group != group:
            group = entry.group
            lines.append(f"| *{group}* | | | | | |")
        peak = "—" if r.peak_mb is None else f"{r.peak_mb:,.0f} MB ({r.peak_ratio:.2f}×)"
        target = TARGETS.get(entry.target) if entry.target else None
        met = "" if target is None else verdict(r.ratio_min, r.ratio_max, target)
        lines.append(
            f"| {r.name} | {r.median_s * 1000:,.1f} ms | {r.ratio:.3f} ({r.ratio_min:.3f}–{r.ratio_max:.3f}) | {peak} | "
            f"{'' if target is None else f'≤{target:.2f}'} | {met} |"
        )
    return "\n".join(lines)


def run_model(model: str, size: int, args, dtype: torch.dtype) -> tuple[str, dict]:
    bench = make_bench(model, size, args.steps, args.device, dtype)
    entries = step_cases(bench)
    if args.compile:
        entries += compiled_cases(bench, args.compile)
    if args.only:
        keep = {e.baseline for e in entries if any(w in e.case.name for w in args.only)}
        entries = [e for e in entries if e.case.name in keep or any(w in e.case.name for w in args.only)]
    cases = [e.case for e in entries]
    results = rebase(
        compare(cases, repeats=args.repeats, warmup=args.warmup, device=args.device, clock=args.clock), entries
    )
    if args.device == "cpu" and args.cpu_memory:
        peaks = {e.case.name: cpu_peak_bytes(e.case, bench.unet) for e in entries}
        for entry, r in zip(entries, results):
            r.peak_mb = peaks[r.name] / 2**20
            r.peak_ratio = peaks[r.name] / peaks[entry.baseline] if peaks[entry.baseline] else None
    unit = "step" if args.steps == 1 else f"{args.steps} steps"
    title = (
        f"{model}, {size}×{size}, {str(dtype).replace('torch.', '')}, {args.steps} denoising step(s) per call, "
        f"{args.clock} clock, {args.repeats} interleaved rounds after {args.warmup} warm-up — {machine()}"
    )
    text = table(title, results, entries, unit)
    payload = {
        "model": model, "size": size, "title": title,
        "results": [{**asdict(r), "group": e.group, "baseline": e.baseline,
                     "target": TARGETS.get(e.target) if e.target else None} for e, r in zip(entries, results)],
    }
    del bench
    return text, payload


def _colour(row: dict) -> str:
    """Bar colour of a results row: grey without a target, else green met / red missed / orange within noise."""
    if row["target"] is None:
        return "tab:gray"
    label = verdict(row["ratio_min"], row["ratio_max"], row["target"])
    return {MET: "tab:green", MISSED: "tab:red"}.get(label, "tab:orange")


def plot(json_path: str, png_path: str) -> None:
    """Ratios to stock with their min–max and the targets, one bar per case, from a results JSON (small PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(json_path).read_text())
    rows = [r for t in data["tables"] for r in t["results"] if r["name"] != r["baseline"]]
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(rows) + 1.0), dpi=80)
    y = range(len(rows))[::-1]
    ratios = [r["ratio"] for r in rows]
    errors = [[r["ratio"] - r["ratio_min"] for r in rows], [r["ratio_max"] - r["ratio"] for r in rows]]
    colors = [_colour(r) for r in rows]
    ax.barh(list(y), [x - 1 for x in ratios], left=1, xerr=errors, color=colors, capsize=2, height=0.6)
    for yi, r in zip(y, rows):
        if r["target"] is not None:
            ax.plot([r["target"]] * 2, [yi - 0.35, yi + 0.35], color="black", lw=1.5)
    ax.axvline(1, color="black", lw=0.8)
    ax.set_yticks(list(y), [r["name"].split(" (")[0] for r in rows], fontsize=8)
    ax.set_xlabel("time ratio to stock on the same rows (median, min–max); | = target\n"
                  "green: all rounds within it, orange: within noise, red: no round within it", fontsize=8)
    title = data["tables"][0]["title"].split(" — ")[0] + f", {data['machine']}"
    ax.set_title("\n".join(textwrap.wrap(title, 75)), fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def run_dispatch(args) -> str:
    """``--only dispatch``: the host-cost case (its own model and clock: see :mod:`benchmarks.dispatch`)."""
    from . import dispatch

    forward = ["--device", args.device, "--out", args.out.replace("/run", "/dispatch") if args.out.endswith("/run") else args.out]
    if args.dtype:
        forward += ["--dtype", args.dtype]
    if args.repeats:
        forward += ["--rounds", str(max(args.repeats, 1))]
    if args.repeats == 1:  # a smoke run (gpu.sh --cpu-dry-run): fewer forwards
        forward += ["--forwards", "20"]
    elif args.device.startswith("cuda") and not args.repeats:  # gpu.sh gives this part 45 s: 9 cases × 5 × 100
        forward += ["--rounds", "5", "--forwards", "100"]
    return dispatch.main(forward)


TRANSFORMER_ARCHS = ("sd3", "flux")  # `--only` words that run benchmarks/transformers.py instead of the UNet table


def run_transformers(args, extra: list[str]) -> str:
    """``--only sd3`` / ``--only flux`` / ``--only sd3 flux``: the SD3-medium and Flux.1-dev architecture
    transformer cases, in that order (each its own model, sizes and table: see :mod:`benchmarks.transformers`,
    whose own options — ``--layers``, ``--size``, ``--tiny``, ``--no-memory`` — pass through to each)."""
    from . import transformers

    archs = [arch for arch in TRANSFORMER_ARCHS if arch in args.only]
    texts = []
    for arch in archs:
        if args.out.endswith("/run"):
            out = args.out[: -len("/run")] + f"/{arch}"
        else:
            out = args.out if len(archs) == 1 else f"{args.out}-{arch}"
        forward = ["--arch", arch, "--device", args.device, "--out", out, "--warmup", str(args.warmup)]
        for name in ("dtype", "repeats", "clock"):
            if getattr(args, name):
                forward += [f"--{name}", str(getattr(args, name))]
        texts.append(transformers.main(forward + extra))
    return "\n".join(texts)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU: SD 1.5 at 256², 1 step per call, 3 rounds")
    parser.add_argument("--gpu", action="store_true", help="CUDA fp16: SD 1.5 at 512² and SDXL at 1024²")
    parser.add_argument("--models", nargs="+", help="model:size pairs, e.g. sd15:256 sdxl:1024 tiny-sdxl:64")
    parser.add_argument("--device", help="cpu or cuda (default: cuda with --gpu, else cpu)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    parser.add_argument(
        "--steps", type=int, help="denoising steps per timed call (default 1 on the CPU; 10 on CUDA, where the "
        "pipeline call's fixed cost — encode_prompt, set-up — would otherwise be a visible share of one step)"
    )
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--clock", choices=["wall", "cpu"], help="default: cpu on the CPU, wall on CUDA")
    parser.add_argument("--cpu-memory", action="store_true", help="CPU: also count peak tensor bytes (1 more run each)")
    parser.add_argument("--compile", metavar="BACKEND", help="also time torch.compile'd variants (e.g. inductor)")
    parser.add_argument(
        "--only", nargs="+", help="keep cases whose name contains one of these (and their stock); `--only dispatch`: "
        "the host cost per attention call instead (benchmarks/dispatch.py: tiny UNet, µs per call, GPU projection); "
        "`--only sd3` / `--only flux` / `--only sd3 flux`: the SD3-medium / Flux.1-dev architecture transformers "
        "instead (benchmarks/transformers.py: CPU 512², SD3 2 of 24 blocks, Flux 1,1 of 19,38 double,single-stream "
        "blocks; --gpu 1024², every block; takes its --layers, --size, --tiny, --no-memory too)"
    )
    parser.add_argument("--out", default="benchmarks/results/run")
    parser.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), help="only draw a results JSON as a PNG")
    args, extra = parser.parse_known_args(argv)
    transformer_case = bool(args.only) and any(arch in args.only for arch in TRANSFORMER_ARCHS)
    if extra and not transformer_case:  # only the transformer case has options of its own
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.plot:
        plot(*args.plot)
        return args.plot[1]

    args.device = args.device or ("cuda" if args.gpu else "cpu")
    if args.only and "dispatch" in args.only:
        return run_dispatch(args)
    if transformer_case:
        return run_transformers(args, extra)
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    args.clock = args.clock or ("cpu" if args.device == "cpu" else "wall")
    args.steps = args.steps or (1 if args.device == "cpu" else 10)
    args.repeats = args.repeats or (3 if args.quick or args.device == "cpu" else 10)
    if args.models:
        models = [(m.split(":")[0], int(m.split(":")[1])) for m in args.models]
    elif args.gpu:
        models = [("sd15", 512), ("sdxl", 1024)]
    else:
        models = [("sd15", 256)]
    dtype = getattr(torch, args.dtype)

    tables, payloads = [], []
    for model, size in models:
        text, payload = run_model(model, size, args, dtype)
        print(text, flush=True)
        tables.append(text)
        payloads.append(payload)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    growth = store_growth()
    growth_line = (
        "Store memory after 2 vs 8 steps (tiny pipeline, bytes held by the recorder): default store "
        f"{growth['default-2']:,} → {growth['default-8']:,} (bounded: independent of the step count); "
        f"per_step=True {growth['per_step-2']:,} → {growth['per_step-8']:,} (grows with steps, by design)."
    )
    device_name = "cuda" if args.device.startswith("cuda") else args.device
    out = Path(f"{args.out}-{device_name}-{args.dtype}")
    out.parent.mkdir(parents=True, exist_ok=True)
    markdown = "\n\n".join([f"Machine: {machine()}", *tables, VERDICT_RULE, growth_line])
    out.with_suffix(".md").write_text(markdown + "\n")
    out.with_suffix(".json").write_text(
        json.dumps({"machine": machine(), "args": vars(args), "tables": payloads, "store_bytes": growth}, indent=2)
    )
    print(growth_line)
    return markdown


if __name__ == "__main__":
    main()
