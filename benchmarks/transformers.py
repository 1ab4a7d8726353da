"""Transformer benchmarks: each mode's transformer forward against stock diffusers, in one run (issue 17 item 6,
issue 18 item 5).

Two architectures, each its published config with random weights (timing does not depend on the weights), called
directly, one denoising step per timing, on random inputs (the text encoders are not what is measured):

* ``--arch sd3``: SD3-medium ``SD3Transformer2DModel``: latents ``(B, 16, size/8, size/8)``, text features
  ``(B, 77 + 256, 4096)``, pooled ``(B, 2048)``; CFG rows ``[uncond | cond]``;
* ``--arch flux``: Flux.1-dev ``FluxTransformer2DModel``: packed latents ``(B, (size/16)², 64)`` with their
  ``img_ids``, T5 features ``(B, 512, 4096)`` with ``txt_ids``, pooled CLIP ``(B, 768)``, the guidance scale
  (guidance-distilled: no CFG rows, one denoiser call per step).

Modes, interleaved round-robin after a warm-up round (``benchmarks/harness.py``), each against the stock case on
the same rows:

* *1 prompt* (SD3: + CFG, batch 2; Flux: batch 1): stock processor (``JointAttnProcessor2_0`` /
  ``FluxAttnProcessor``); pass-through (``pc.PassThrough``, every site); record (``pc.trace``, default store);
  reweight (``pc.Reweight({"red": 2.0})``, one word × 2);
* *source + edit* (SD3: + CFG, batch 4; Flux: batch 2): stock on the same rows; edit (``pc.Replace(1.0)`` +
  ``InjectSelf(1.0)``: cross from the source and self injection, at every site, as ``pc.edit`` runs inside both
  windows).

Why a pipeline around the transformer: word weights and edits need the prompts' words (the tokenizer), the batch
layout and the number of steps, which a session reads from a pipeline call (``encode_prompt``, the scheduler). So
the session is built on the architecture's pipeline (``StableDiffusion3Pipeline`` / ``FluxPipeline``) around the
benchmark's transformer with 1-layer text encoders (SD3: two CLIP on the real CLIP tokenizer, no T5; Flux: CLIP
for the pooled vector and a T5 encoder on the package's T5-format tokenizer, whose tokens are Flux's text keys);
each timing's session is told its call (``encode_prompt`` on the prompts, ``scheduler.set_timesteps(28)``)
*outside* the timed region, and the timed region is the transformer's forward alone — step 0 of 28, the step at
which every mode acts.

CPU cost: full depth at 512² takes minutes per forward on 2 cores, so ``--layers`` builds fewer blocks: SD3
``--layers N`` joint blocks (CPU default 2 of 24), Flux ``--layers D,S`` double- and single-stream blocks (CPU
default 1,1 of 19,38; each Flux block is ~10× an SD3-medium block). Blocks of a kind are identical, so per-kind
ratios carry to the full depth: on the CPU forward hooks time the blocks of each kind (*block* columns), and *est.
full depth* recomposes each round's forward as outside + full count × per-block time of each kind (Flux: weights
the kinds 19:38). ``--gpu`` builds every block.

CPU:  ``python -m benchmarks.run --only sd3`` / ``--only flux`` (or ``python -m benchmarks.transformers --arch
      flux``): float32, 512²
GPU:  ``python -m benchmarks.run --only sd3 --gpu`` (CUDA float16) / ``--only flux --gpu`` (CUDA bfloat16, what
      Flux.1-dev is run in): 1024², every block, peak CUDA memory
Smoke: ``python -m benchmarks.transformers --tiny [--arch flux]`` (a tiny config, seconds)
Writes ``benchmarks/results/<arch>-<device>-<dtype>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .harness import compare, machine
from .transformer_cases import (Bench, BlockClock, add_block_ratios, check_installed_nothing, cpu_peaks,
                                full_depth_time, make_bench, per_group_ratios, transformer_cases)
from .transformer_models import (ARCHITECTURES, FLUX_DEV_CONFIG, SD3_MEDIUM_CONFIG, Architecture, flux_image_ids,
                                 image_tokens)

__all__ = [  # the command line, and the moved names callers (the tests) reach through this module
    "main", "parse", "run", "measure", "table", "depth_note",
    "ARCHITECTURES", "FLUX_DEV_CONFIG", "SD3_MEDIUM_CONFIG", "flux_image_ids",
    "BlockClock", "add_block_ratios", "check_installed_nothing", "full_depth_time", "make_bench", "transformer_cases",
]


# ---- the run --------------------------------------------------------------------------------------------------
def takes_block_times(args: argparse.Namespace, arch: Architecture) -> bool:
    """Block times where they are needed and cheap: on the CPU clock, with fewer blocks than the published model."""
    return args.clock == "cpu" and tuple(args.layers) != arch.full_layers()


# ---- the report -----------------------------------------------------------------------------------------------
def depth_note(bench: Bench, tiny: bool) -> str:
    described = bench.arch.layers_text(bench.layers)
    if tiny:
        return f"Tiny config ({described}): a smoke run, not a measurement of the {bench.arch.name} architecture."
    if bench.layers == bench.arch.full_layers():
        return f"Measured: all {described} of the {bench.arch.title.split(' (')[0]}."
    return bench.arch.depth_note(bench.layers, bench.arch.full_layers())


def block_note(arch: Architecture) -> str:
    counts = " + ".join(f"{n} × {kind.name}" for n, kind in zip(arch.full_layers(), arch.kinds))
    return (
        "*Block* columns: the CPU time inside the blocks of that kind (forward hooks on each block) over stock's, "
        "per round, median (min–max); blocks of a kind are identical, so this per-block ratio is the full "
        f"model's for that kind. *est. full depth*: each round's forward recomposed as outside the blocks + {counts} "
        "per-block time, over stock's recomposed the same way — the whole-transformer ratio of the published "
        "depth, on the assumption (true of identical blocks) that every block of a kind costs what the measured "
        "ones did. Work a session does at its first attention call counts in the first block and is multiplied "
        "with it, so the estimate leans high if anything."
    )


def megabytes(mb: float) -> str:
    return f"{mb:,.0f} MB" if mb >= 10 else f"{mb:.2f} MB"


def ratio_text(r: dict | None) -> str:
    return "—" if r is None else f"{r['ratio']:.3f} ({r['ratio_min']:.3f}–{r['ratio_max']:.3f})"


def table(title: str, rows: list[dict], unit: str, kinds: list[str]) -> str:
    """The Markdown table; ``kinds``: the block kinds with block columns (none: no block times taken)."""
    extra = [f"{kind} block ratio" for kind in kinds] + (["est. full depth ratio"] if kinds else [])
    head = ["case", f"best time / {unit}", "ratio to stock, best of N", "median per-round ratio (min–max)", *extra,
            "peak memory"]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    group = None
    for row in rows:
        if row["group"] != group:
            group = row["group"]
            lines.append(f"| *{group}* |" + " |" * (len(head) - 1))
        peak = "—" if row["peak_mb"] is None else f"{megabytes(row['peak_mb'])} ({row['peak_ratio']:.2f}×)"
        blocks = [ratio_text(row["blocks"].get(kind)) for kind in kinds]
        blocks += [ratio_text(row.get("full_depth"))] if kinds else []
        cells = [row["name"], f"{row['best_s'] * 1000:,.1f} ms", f"{row['best_ratio']:.3f}", ratio_text(row), *blocks,
                 peak]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_layers(text: str) -> tuple[int, ...]:
    """``"2"`` or ``"1,1"`` → block counts (argparse type)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: block counts, N or D,S (e.g. 2 for SD3, 1,1 for Flux)")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd3", choices=sorted(ARCHITECTURES))
    parser.add_argument("--gpu", action="store_true", help="CUDA at 1024², every block (SD3 float16, Flux bfloat16)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda with --gpu, else cpu)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--size", type=int, help="image side (default 512 on the CPU, 1024 on CUDA, 64 with --tiny)")
    parser.add_argument(
        "--layers", type=parse_layers, help="blocks to build: SD3 N joint blocks (default 2 on the CPU, 24 on "
        "CUDA); Flux D,S double- and single-stream blocks (default 1,1 on the CPU, 19,38 on CUDA)")
    parser.add_argument("--repeats", type=int, help="interleaved timed rounds (default 5 on the CPU, 10 on CUDA)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--clock", choices=["wall", "cpu"], help="default: cpu on the CPU, wall on CUDA")
    parser.add_argument("--no-memory", action="store_true", help="CPU: skip the peak-memory runs (1 more run each)")
    parser.add_argument("--tiny", action="store_true", help="the architecture's tiny config (smoke test, seconds)")
    parser.add_argument("--out", help="path prefix (default benchmarks/results/<arch>); -<device>-<dtype> is added")
    args = parser.parse_args(argv)
    arch = ARCHITECTURES[args.arch]
    cuda = (args.device or ("cuda" if args.gpu else "cpu")).startswith("cuda")
    args.device = args.device or ("cuda" if cuda else "cpu")
    args.dtype = args.dtype or (arch.gpu_dtype if cuda else "float32")
    if args.size is None:
        args.size = 64 if args.tiny else 1024 if cuda else 512
    if args.layers is None:
        args.layers = arch.cpu_layers if args.tiny or not cuda else arch.full_layers()
    if args.repeats is None:
        args.repeats = 2 if args.tiny else 10 if cuda else 5
    args.clock = args.clock or ("wall" if cuda else "cpu")
    args.out = args.out or f"benchmarks/results/{arch.name}"
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f"--repeats must be at least 1 and --warmup at least 0 (got {args.repeats}, {args.warmup})")
    return args


def measure(bench: Bench, args: argparse.Namespace) -> list[dict]:
    """Time every mode interleaved (with block times where :func:`takes_block_times`), then peak memory."""
    entries = transformer_cases(bench)
    cases = [e.case for e in entries]
    timing = dict(repeats=args.repeats, warmup=args.warmup, device=args.device, clock=args.clock,
                  progress=not args.tiny)
    if takes_block_times(args, bench.arch):
        bench.clock = BlockClock(bench.model, bench.arch.kinds, args.clock)
        try:
            with bench.clock.installed():
                rows = per_group_ratios(compare(cases, **timing), entries)
        finally:
            bench.clock = None
        add_block_ratios(bench, rows, args.repeats)
    else:
        rows = per_group_ratios(compare(cases, **timing), entries)
    if args.device == "cpu" and not args.no_memory:
        cpu_peaks(bench, entries, rows)
    return rows


def run(args: argparse.Namespace) -> tuple[str, dict]:
    """Build, time every mode interleaved, and return (Markdown, payload)."""
    arch = ARCHITECTURES[args.arch]
    dtype = getattr(torch, args.dtype)
    bench = make_bench(arch, args.size, args.layers, args.device, dtype, args.tiny)
    before = {k: type(v).__name__ for k, v in bench.model.attn_processors.items()}
    rows = measure(bench, args)
    check_installed_nothing(bench, before)
    latent = args.size // arch.vae_scale
    tokens = image_tokens(arch, args.size, bench.model.config.patch_size)
    packed = f" → packed {arch.pack}×{arch.pack}" if arch.pack > 1 else ""
    title = (
        f"{f'tiny {arch.name} config' if args.tiny else arch.title}, {args.size}×{args.size} (latent "
        f"{latent}×{latent}{packed} → {tokens} image tokens, text {bench.text_tokens} tokens), "
        f"{arch.layers_text(bench.layers)}, {args.dtype}, one transformer forward per timing, {args.clock} clock, "
        f"{args.repeats} interleaved rounds after {args.warmup} warm-up — {machine()}"
    )
    memory = ("peak CUDA memory per case (allocator)" if args.device.startswith("cuda") else
              "peak memory: live tensor bytes of one more, untimed run per case (weights and inputs excluded)"
              if not args.no_memory else "peak memory: not measured (--no-memory)")
    layout = "prompts, CFG" if arch.cfg else "prompts, no CFG rows"
    kinds = [kind.name for kind, n in zip(arch.kinds, bench.layers) if n] if takes_block_times(args, arch) else []
    notes = [
        depth_note(bench, args.tiny),
        *([block_note(arch)] if kinds else []),
        "Ratios are to the stock case of the same group (same rows). *best of N*: the case's fastest round over "
        "stock's fastest; *median per-round ratio*: the median of the N rounds' ratios, with their min–max. "
        f"Each session is entered and told its call ({layout}, {arch.steps} steps) outside the timed region; "
        "per-run work the controllers do at step 0 (resolving words, aligning prompts) is inside it. " + memory + ".",
    ]
    markdown = "\n\n".join([table(title, rows, "forward", kinds), *notes])
    config = {**(arch.tiny_config if args.tiny else arch.config),
              **{kind.config_key: n for kind, n in zip(arch.kinds, bench.layers)}}
    payload = dict(arch=arch.name, config=config, full_layers=dict(zip([k.name for k in arch.kinds],
                   arch.full_layers())), image_tokens=tokens, text_tokens=bench.text_tokens, title=title,
                   notes=notes, rows=rows)
    return markdown, payload


def main(argv: list[str] | None = None) -> str:
    args = parse(argv)
    markdown, payload = run(args)
    device = "cuda" if args.device.startswith("cuda") else args.device
    out = Path(f"{args.out}-{device}-{args.dtype}")
    out.parent.mkdir(parents=True, exist_ok=True)
    text = f"Machine: {machine()}\n\n{markdown}\n"
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "args": vars(args), **payload}, indent=2))
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
