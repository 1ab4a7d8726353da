"""Transformer benchmarks: each mode's transformer forward against stock diffusers, in one run (issue 17 item 6).

An SD3-medium architecture ``SD3Transformer2DModel`` (the published config, random weights: timing does not depend
on the weights) is called directly, one denoising step per timing, with random latents, random text features
``(B, 77 + 256, 4096)`` and random pooled projections ``(B, 2048)``: the text encoders are not what is measured.
Modes, interleaved round-robin after a warm-up round (``benchmarks/harness.py``), each against the stock case on
the same rows:

* *1 prompt + CFG (batch 2)*: stock ``JointAttnProcessor2_0``; pass-through (``pc.PassThrough``, every site);
  record (``pc.trace``, default store); reweight (``pc.Reweight({"red": 2.0})``, one word × 2);
* *source + edit + CFG (batch 4)*: stock on 4 rows; edit (``pc.Replace(1.0)`` + ``InjectSelf(1.0)``: cross from the
  source and self injection, at every site, as ``pc.edit`` runs inside both windows).

Why a pipeline around the transformer: word weights and edits need the prompts' words (the tokenizer), the CFG
layout and the number of steps, which a session reads from a pipeline call (``encode_prompt``, the scheduler). So
the session is built on a ``StableDiffusion3Pipeline`` around the benchmark's transformer with two 1-layer CLIP text
encoders on the real CLIP tokenizer and no T5; each timing's session is told its call (``encode_prompt`` on the
prompts, ``scheduler.set_timesteps(28)``) *outside* the timed region, and the timed region is the transformer's
forward alone — step 0 of 28, the step at which every mode acts.

CPU cost: a 24-block forward at 512² takes tens of seconds on 2 cores, so ``--layers`` (CPU default 2, ``--gpu``
default 24) builds the model with fewer joint blocks. The blocks are identical (same widths, same joint attention),
so per-block ratios carry to the full depth; the output says which layer count was measured.

CPU:  ``python -m benchmarks.run --only sd3`` (or ``python -m benchmarks.transformers``): float32, 512², 2 blocks
GPU:  ``python -m benchmarks.run --only sd3 --gpu``: CUDA float16, 1024², 24 blocks, peak CUDA memory
Smoke: ``python -m benchmarks.transformers --tiny`` (a tiny SD3 config, seconds)
Writes ``benchmarks/results/sd3-<device>-<dtype>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import promptcontrol as pc

from .cases import EDIT, PROMPT, SOURCE, Entry, _text_encoder, cpu_peak_bytes
from .harness import Case, Result, compare, machine

# ---- architectures --------------------------------------------------------------------------------------------
SD3_MEDIUM_CONFIG = dict(  # stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,  # 24 heads × 64 = 1536 wide
    joint_attention_dim=4096,  # T5-XXL width; CLIP-L + CLIP-G features (768 + 1280) are zero-padded up to it
    caption_projection_dim=1536,
    pooled_projection_dim=2048,  # CLIP-L pooled 768 + CLIP-G pooled 1280
    pos_embed_max_size=192,
)  # no qk_norm, no dual_attention_layers (those are SD3.5's): diffusers' defaults

TINY_SD3_CONFIG = dict(  # the shapes of promptcontrol.testing_sd3.tiny_sd3_transformer, SD3 (not 3.5) flavour
    sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
    pos_embed_max_size=32,
)


@dataclass(frozen=True)
class Architecture:
    """One transformer family: its published config, how to build it, its pipeline (for words, layout and steps),
    the inputs of one denoising step, and how a session is told about a call without running the pipeline."""

    name: str
    title: str
    config: dict
    tiny_config: dict
    build: Callable[[dict, torch.dtype, str], torch.nn.Module]
    pipeline: Callable[[torch.nn.Module], Any]
    inputs: Callable[[torch.nn.Module, int, int, int], dict]  # (model, image size, batch, text tokens) -> kwargs
    announce: Callable[[Any, list[str], int], None]  # (pipe, prompts, steps): what a pipeline call tells a session
    stock_processor: str
    cfg: bool  # whether the pipeline's calls carry [uncond | cond] rows
    text_tokens: int  # the text sequence the denoiser sees in the pipeline's default call
    tiny_text_tokens: int
    vae_scale: int = 8
    steps: int = 28  # the pipeline's default step count: the session is told it; step 0 is timed


def build_sd3(config: dict, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = SD3Transformer2DModel(**config)
    if dtype != torch.float32:
        model = model.to(dtype=dtype)
    return model.eval().requires_grad_(False)


def sd3_pipeline(transformer: torch.nn.Module):
    """A ``StableDiffusion3Pipeline`` around ``transformer``: two 1-layer CLIP encoders (pooled widths summing to
    the transformer's ``pooled_projection_dim``) on the real CLIP tokenizer, no T5, no VAE (never decoded)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    param = next(transformer.parameters())
    pooled = transformer.config.pooled_projection_dim
    tokenizer = pc.testing.clip_tokenizer()
    torch.manual_seed(1)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
        text_encoder=_text_encoder(8, pooled // 2, param.dtype, param.device), tokenizer=tokenizer,
        text_encoder_2=_text_encoder(8, pooled - pooled // 2, param.dtype, param.device), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


SD3_TEXT_TOKENS = 77 + 256  # CLIP's 77, then T5's StableDiffusion3Pipeline default max_sequence_length 256


def sd3_inputs(model: torch.nn.Module, size: int, batch: int, text_tokens: int) -> dict:
    """One denoising step's forward kwargs: latents ``(B, C, size/8, size/8)``, text ``(B, text_tokens,
    joint_dim)``, pooled ``(B, pooled_dim)``, timestep ``(B,)`` (random: the text encoders are not the point)."""
    cfg = model.config
    param = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    latent = size // 8
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, latent, latent, generator=g).to(param),
        encoder_hidden_states=torch.randn(batch, text_tokens, cfg.joint_attention_dim, generator=g).to(param),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(param),
        timestep=torch.full((batch,), 980.0, device=param.device, dtype=param.dtype),
        return_dict=False,
    )


def sd3_announce(pipe, prompts: list[str], steps: int) -> None:
    """What ``pipe(prompts, num_inference_steps=steps)`` tells an active session before its first step."""
    pipe.scheduler.set_timesteps(steps, device=pipe.transformer.device)
    pipe.encode_prompt(prompts, None, None, device=pipe.transformer.device, do_classifier_free_guidance=True)


ARCHITECTURES: dict[str, Architecture] = {
    "sd3": Architecture(
        name="sd3", title="SD3-medium architecture SD3Transformer2DModel (published config, random weights)",
        config=SD3_MEDIUM_CONFIG, tiny_config=TINY_SD3_CONFIG, build=build_sd3, pipeline=sd3_pipeline,
        inputs=sd3_inputs, announce=sd3_announce, stock_processor="JointAttnProcessor2_0", cfg=True,
        text_tokens=SD3_TEXT_TOKENS, tiny_text_tokens=77 + 16,
    ),
    # NOT YET RUN — "flux-dev" (issue 18 item 5): FluxTransformer2DModel with black-forest-labs/FLUX.1-dev's
    # published config (19 double- + 38 single-stream blocks, 3072 wide), FluxPipeline's T5 tokenizer for words,
    # inputs (packed latents, img_ids / txt_ids, guidance) and cfg=False (guidance-distilled). One more entry here
    # once Flux sites are supported; the cases and the report below take it as they are.
}


# ---- the cases ------------------------------------------------------------------------------------------------
@dataclass
class Bench:
    """One architecture at one size and depth, ready to time."""

    arch: Architecture
    model: torch.nn.Module
    pipe: Any
    size: int
    layers: int
    device: str
    text_tokens: int
    inputs: dict[int, dict] = field(default_factory=dict)  # batch -> forward kwargs

    def forward(self, batch: int) -> Callable[[], object]:
        if batch not in self.inputs:
            self.inputs[batch] = self.arch.inputs(self.model, self.size, batch, self.text_tokens)
        inputs = self.inputs[batch]
        return lambda: self.model(**inputs)

    def session(self, prompts: list[str], make: Callable[[], Any]) -> Callable[[], contextlib.AbstractContextManager]:
        """A context factory: a fresh session from ``make()`` (``pc.control`` / ``pc.trace``), told its call."""

        @contextlib.contextmanager
        def context():
            with make() as session:
                self.arch.announce(self.pipe, prompts, self.arch.steps)
                yield session

        return context


def make_bench(arch: Architecture, size: int, layers: int, device: str, dtype: torch.dtype, tiny: bool) -> Bench:
    """``arch`` (its published config, or the tiny one) with ``layers`` blocks, random weights, in its pipeline."""
    check_size(arch, size, tiny)
    if layers < 1:
        raise ValueError(f"--layers must be at least 1 (got {layers}); the full {arch.name} model has "
                         f"{arch.config['num_layers']}")
    config = {**(arch.tiny_config if tiny else arch.config), "num_layers": layers}
    model = arch.build(config, dtype, device)
    text_tokens = arch.tiny_text_tokens if tiny else arch.text_tokens
    return Bench(arch, model, arch.pipeline(model), size, layers, device, text_tokens)


def check_size(arch: Architecture, size: int, tiny: bool) -> None:
    """The image side must give whole patches and fit the position embedding table."""
    config = arch.tiny_config if tiny else arch.config
    step = arch.vae_scale * config["patch_size"]
    largest = config["pos_embed_max_size"] * step
    if size % step or not step <= size <= largest:
        raise ValueError(f"--size {size}: {arch.name} needs a multiple of {step} (VAE ×{arch.vae_scale}, patch "
                         f"{config['patch_size']}) between {step} and {largest} (pos_embed_max_size "
                         f"{config['pos_embed_max_size']})")


def transformer_cases(bench: Bench) -> list[Entry]:
    """Every mode in two groups, stock first in each: 1 prompt (+ CFG rows), and source + edit (+ CFG rows)."""
    from promptcontrol.controllers.inject import InjectSelf

    pipe, rows = bench.pipe, 2 if bench.arch.cfg else 1
    one, two = bench.forward(rows), bench.forward(2 * rows)

    def control(prompts, *make):  # fresh controllers for every timing, built outside the timed region
        return bench.session(prompts, lambda: pc.control(pipe, *(m() for m in make)))

    cfg = " + CFG" if bench.arch.cfg else ""
    g1, g2 = f"1 prompt{cfg} (batch {rows})", f"source + edit{cfg} (batch {2 * rows})"
    s1, s2 = f"stock {bench.arch.stock_processor}", f"stock {bench.arch.stock_processor}, 2 prompts"
    return [
        Entry(Case(s1, one), s1, None, g1),
        Entry(Case("pass-through (pc.control + PassThrough, all sites)", one, control([PROMPT], pc.PassThrough)),
              s1, "pass-through", g1),
        Entry(Case("record: pc.trace default store", one, bench.session([PROMPT], lambda: pc.trace(pipe))),
              s1, "record", g1),
        Entry(Case("reweight: Reweight({'red': 2.0})", one, control([PROMPT], lambda: pc.Reweight({"red": 2.0}))),
              s1, "reweight", g1),
        Entry(Case(s2, two), s2, None, g2),
        Entry(Case("edit: Replace + self injection (every site)", two,
                   control([SOURCE, EDIT], lambda: pc.Replace(1.0), lambda: InjectSelf(1.0))), s2, "edit", g2),
    ]


# ---- measuring ------------------------------------------------------------------------------------------------
def per_group_ratios(results: list[Result], entries: list[Entry]) -> list[dict]:
    """Each result against its group's stock case: median / min / max of per-round ratios, and best of N."""
    by_name = {r.name: r for r in results}
    rows = []
    for entry, r in zip(entries, results):
        base = by_name[entry.baseline]
        ratios = [t / b for t, b in zip(r.times_s, base.times_s)]
        rows.append(dict(
            name=r.name, group=entry.group, baseline=entry.baseline,
            best_s=min(r.times_s), median_s=statistics.median(r.times_s),
            best_ratio=min(r.times_s) / min(base.times_s),
            ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
            peak_mb=r.peak_mb, peak_ratio=(r.peak_mb / base.peak_mb) if r.peak_mb and base.peak_mb else None,
            times_s=r.times_s,
        ))
    return rows


def cpu_peaks(bench: Bench, entries: list[Entry], rows: list[dict]) -> None:
    """CPU: peak live tensor bytes of one more, untimed run per case (weights and inputs excluded)."""
    peaks = {e.case.name: cpu_peak_bytes(e.case, bench.model, list(bench.inputs.values())) for e in entries}
    for entry, row in zip(entries, rows):
        row["peak_mb"] = peaks[entry.case.name] / 2**20
        row["peak_ratio"] = peaks[entry.case.name] / peaks[entry.baseline] if peaks[entry.baseline] else None


def check_installed_nothing(bench: Bench, before: dict) -> None:
    """Every mode's session restored the stock processors and left no hooks (else the ratios would lie)."""
    after = {k: type(v).__name__ for k, v in bench.model.attn_processors.items()}
    if after != before or bench.model._forward_pre_hooks or bench.model._forward_hooks:
        raise RuntimeError(f"a benchmark session left something installed on the {bench.arch.name} transformer")


# ---- the report -----------------------------------------------------------------------------------------------
def depth_note(bench: Bench, tiny: bool) -> str:
    full = bench.arch.config["num_layers"]
    if tiny:
        return f"Tiny config ({bench.layers} blocks): a smoke run, not a measurement of the SD3-medium architecture."
    if bench.layers == full:
        return f"Measured: all {full} joint blocks of the SD3-medium architecture."
    return (
        f"Measured: {bench.layers} of the SD3-medium architecture's {full} joint blocks (`--layers {bench.layers}`). "
        "The blocks are identical (1536 wide, 24 heads × 64, the same joint attention over image + text tokens), so "
        "per-block ratios carry to the full depth. Two caveats, both small: the layers outside the blocks (patch "
        "embedding, context embedder, final layer) run the same in every mode and dilute a shallow model's ratios "
        f"slightly toward 1; and the last block is `context_pre_only` (no text feed-forward), 1 of {bench.layers} "
        f"here against 1 of {full} in the full model."
    )


def megabytes(mb: float) -> str:
    return f"{mb:,.0f} MB" if mb >= 10 else f"{mb:.2f} MB"


def table(title: str, rows: list[dict], unit: str) -> str:
    lines = [
        f"**{title}**", "",
        f"| case | best time / {unit} | ratio to stock, best of N | median per-round ratio (min–max) | peak memory |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    group = None
    for row in rows:
        if row["group"] != group:
            group = row["group"]
            lines.append(f"| *{group}* | | | | |")
        peak = "—" if row["peak_mb"] is None else f"{megabytes(row['peak_mb'])} ({row['peak_ratio']:.2f}×)"
        lines.append(
            f"| {row['name']} | {row['best_s'] * 1000:,.1f} ms | {row['best_ratio']:.3f} | {row['ratio']:.3f} "
            f"({row['ratio_min']:.3f}–{row['ratio_max']:.3f}) | {peak} |"
        )
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd3", choices=sorted(ARCHITECTURES))
    parser.add_argument("--gpu", action="store_true", help="CUDA float16 at 1024², all 24 blocks")
    parser.add_argument("--device", help="cpu or cuda (default: cuda with --gpu, else cpu)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--size", type=int, help="image side (default 512 on the CPU, 1024 on CUDA, 64 with --tiny)")
    parser.add_argument("--layers", type=int, help="joint blocks to build (default 2 on the CPU, 24 on CUDA)")
    parser.add_argument("--repeats", type=int, help="interleaved timed rounds (default 5 on the CPU, 10 on CUDA)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--clock", choices=["wall", "cpu"], help="default: cpu on the CPU, wall on CUDA")
    parser.add_argument("--no-memory", action="store_true", help="CPU: skip the peak-memory runs (1 more run each)")
    parser.add_argument("--tiny", action="store_true", help="a tiny SD3 config (smoke test, seconds)")
    parser.add_argument("--out", default="benchmarks/results/sd3", help="path prefix; -<device>-<dtype> is added")
    args = parser.parse_args(argv)
    cuda = (args.device or ("cuda" if args.gpu else "cpu")).startswith("cuda")
    args.device = args.device or ("cuda" if cuda else "cpu")
    args.dtype = args.dtype or ("float16" if cuda else "float32")
    if args.size is None:
        args.size = 64 if args.tiny else 1024 if cuda else 512
    if args.layers is None:
        args.layers = 2 if args.tiny or not cuda else 24
    if args.repeats is None:
        args.repeats = 2 if args.tiny else 10 if cuda else 5
    args.clock = args.clock or ("wall" if cuda else "cpu")
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f"--repeats must be at least 1 and --warmup at least 0 (got {args.repeats}, {args.warmup})")
    return args


def run(args: argparse.Namespace) -> tuple[str, dict]:
    """Build, time every mode interleaved, and return (Markdown, payload)."""
    arch = ARCHITECTURES[args.arch]
    dtype = getattr(torch, args.dtype)
    bench = make_bench(arch, args.size, args.layers, args.device, dtype, args.tiny)
    before = {k: type(v).__name__ for k, v in bench.model.attn_processors.items()}
    entries = transformer_cases(bench)
    results = compare([e.case for e in entries], repeats=args.repeats, warmup=args.warmup, device=args.device,
                      clock=args.clock, progress=not args.tiny)
    rows = per_group_ratios(results, entries)
    if args.device == "cpu" and not args.no_memory:
        cpu_peaks(bench, entries, rows)
    check_installed_nothing(bench, before)
    latent = args.size // arch.vae_scale
    image_tokens = (latent // bench.model.config.patch_size) ** 2
    text_tokens = bench.text_tokens
    title = (
        f"{'tiny SD3 config' if args.tiny else arch.title}, {args.size}×{args.size} (latent {latent}×{latent} → "
        f"{image_tokens} image tokens, text {text_tokens} tokens), {bench.layers} block(s), {args.dtype}, one "
        f"transformer forward per timing, {args.clock} clock, {args.repeats} interleaved rounds after {args.warmup} "
        f"warm-up — {machine()}"
    )
    memory = ("peak CUDA memory per case (allocator)" if args.device.startswith("cuda") else
              "peak memory: live tensor bytes of one more, untimed run per case (weights and inputs excluded)"
              if not args.no_memory else "peak memory: not measured (--no-memory)")
    notes = [
        depth_note(bench, args.tiny),
        "Ratios are to the stock case of the same group (same rows). *best of N*: the case's fastest round over "
        "stock's fastest; *median per-round ratio*: the median of the N rounds' ratios, with their min–max. "
        f"Each session is entered and told its call (prompts, CFG, {arch.steps} steps) outside the timed region; "
        "per-run work the controllers do at step 0 (resolving words, aligning prompts) is inside it. " + memory + ".",
    ]
    markdown = "\n\n".join([table(title, rows, "forward"), *notes])
    payload = dict(arch=arch.name, config={**(arch.tiny_config if args.tiny else arch.config), "num_layers":
                   bench.layers}, full_layers=arch.config["num_layers"], image_tokens=image_tokens,
                   text_tokens=text_tokens, title=title, notes=notes, rows=rows)
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
