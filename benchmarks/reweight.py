"""Cost of ``pc.Reweight`` against stock diffusers, and what the explicit-softmax path would cost.

SD 1.5-architecture UNet (published config, random weights), batch 2 (CFG), one denoising step per timing,
weights on two token positions of the conditional row. Cases, timed round-robin in one run:

* stock ``AttnProcessor2_0`` (baseline);
* ``Reweight`` in each mode: ``attention`` (V scaled per token, SDPA), ``softmax`` (log-w SDPA mask),
  ``embedding`` (text features scaled once per step);
* diffusers' classic ``AttnProcessor`` at every site (explicit softmax, as P2P-style tools run) — the cost of
  materialising the maps, without even reweighting them.

A second table (``--part attention``) times only the cross-attention calls of one step, with the shapes the UNet
produces (captured by hooks), stock SDPA against the fused reweight plans: a tighter measure of the added work
than whole-step ratios on a busy machine.

CPU: ``python -m benchmarks.reweight`` (256×256); GPU: ``python -m benchmarks.reweight --device cuda --dtype
float16 --sizes 512``.
"""

from __future__ import annotations

import argparse
import time

import torch

import promptcontrol as pc

from promptcontrol.plan import IDENTITY, run_plan
from promptcontrol.sites import attention_modules, find_sites

from .cases import WEIGHTS, classic_processors  # noqa: F401  (shared with benchmarks/run.py)
from .harness import Case, Result, compare, machine, markdown_table, save
from .models import sd15_unet, unet_inputs

def cross_attention_inputs(unet, inputs) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(q, k, v) ``(B, heads, N, d)`` of every cross-attention call of one UNet step."""
    captured = []

    def hook(module, args, kwargs, output):
        hs, ehs = args[0], kwargs["encoder_hidden_states"]
        b, heads = hs.shape[0], module.heads

        def split(x):
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        captured.append((split(module.to_q(hs)), split(module.to_k(ehs)), split(module.to_v(ehs))))

    cross = [site for site in find_sites(unet) if site.kind == "cross"]
    handles = [module.register_forward_hook(hook, with_kwargs=True) for module in attention_modules(unet, cross).values()]
    try:
        with torch.inference_mode():
            unet(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def attention_part(unet, size: int, repeats: int, device: str, dtype_name: str, clock: str = "wall") -> tuple[str, list]:
    """Only the cross-attention calls of one step: stock SDPA vs the fused reweight plans."""
    import torch.nn.functional as F

    qkv = cross_attention_inputs(unet, unet_inputs(unet, size, batch=2))
    keys = qkv[0][1].shape[2]
    weights = torch.ones(2, keys)
    for position, weight in WEIGHTS.items():
        weights[1, position] = weight
    weights = weights.to(device=qkv[0][0].device, dtype=qkv[0][0].dtype)
    scaled, biased = IDENTITY.scaled(weights), IDENTITY.biased(weights.log())

    def stock():
        for q, k, v in qkv:
            F.scaled_dot_product_attention(q, k, v)

    def fused(plan):
        def go():
            for q, k, v in qkv:
                run_plan(plan, q, k, v, None)

        return go

    def explicit():
        for q, k, v in qkv:  # what AttnProcessor does: baddbmm, softmax, bmm
            probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
            probs @ (v * weights[:, None, :, None])

    cases = [
        Case(f"stock SDPA ({len(qkv)} cross-attention calls)", stock),
        Case("Reweight attention: SDPA, V scaled", fused(scaled)),
        Case("Reweight softmax: SDPA, log-w mask", fused(biased)),
        Case("explicit softmax, probabilities × w", explicit),
    ]
    if clock == "cpu":
        results = compare_cpu_time(cases, repeats=repeats, warmup=3)
    else:
        results = compare(cases, repeats=repeats, warmup=3, device=device, progress=False)
    title = f"Cross-attention calls of one step only, SD 1.5, {size}×{size}, batch 2, {dtype_name}, {machine()}"
    title += ", CPU time of the process" if clock == "cpu" else ""
    return markdown_table(title, results), results


def compare_cpu_time(cases: list[Case], *, repeats: int, warmup: int = 1) -> list[Result]:
    """Like :func:`harness.compare` (round-robin after warm-up, per-round ratios to ``cases[0]``), timed by this
    process's CPU time: on a shared machine, time spent descheduled by other processes does not count."""
    import statistics

    def timed(case: Case) -> float:
        with case.context():
            start = time.process_time()
            with torch.inference_mode():
                case.run()
            return time.process_time() - start

    for _ in range(warmup):
        for case in cases:
            timed(case)
    times: dict[str, list[float]] = {c.name: [] for c in cases}
    for _ in range(repeats):
        for case in cases:
            times[case.name].append(timed(case))
    base = times[cases[0].name]
    results = []
    for case in cases:
        ratios = [t / b for t, b in zip(times[case.name], base)]
        results.append(
            Result(case.name, statistics.median(times[case.name]), statistics.median(ratios), min(ratios), max(ratios),
                   None, None, case.note, times[case.name])
        )
    return results


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", default="benchmarks/results/reweight")
    parser.add_argument("--part", choices=["step", "attention", "both"], default="both")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="cpu: this process's CPU time (CPU runs on a shared machine)"
    )
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    unet = sd15_unet(dtype=dtype, device=args.device)
    tables = []
    for size in args.sizes:
        if args.part in ("attention", "both"):
            table, results = attention_part(unet, size, max(20, args.repeats), args.device, args.dtype, args.clock)
            tables.append(table)
            suffix = "-cpu-time" if args.clock == "cpu" else ""
            save(f"{args.out}-attention-{args.device}-{args.dtype}-{size}{suffix}", table.splitlines()[0], results)
            print(table, flush=True)
        if args.part == "attention":
            continue
        inputs = unet_inputs(unet, size, batch=2)

        def step():
            return unet(**inputs)

        def reweight(mode):
            return lambda: pc.control(unet, pc.Reweight(WEIGHTS, mode=mode), cfg=True)

        cases = [
            Case("stock AttnProcessor2_0", step),
            Case("Reweight attention (fused V scale)", step, reweight("attention")),
            Case("Reweight softmax (fused log-w mask)", step, reweight("softmax")),
            Case("Reweight embedding (A1111)", step, reweight("embedding")),
            Case("explicit: diffusers AttnProcessor everywhere", step, lambda: classic_processors(unet)),
        ]
        if args.clock == "cpu":
            results = compare_cpu_time(cases, repeats=args.repeats)
        else:
            results = compare(cases, repeats=args.repeats, device=args.device)
        clock = ", CPU time of the process" if args.clock == "cpu" else ""
        title = f"Reweight, SD 1.5 UNet, {size}×{size}, batch 2, {args.dtype}, {machine()}{clock}"
        tables.append(markdown_table(title, results, {c.name: 1.03 for c in cases[1:4]}))
        save(f"{args.out}-{args.device}-{args.dtype}-{size}{'-cpu-time' if args.clock == 'cpu' else ''}", title, results)
        print(tables[-1], flush=True)
    return "\n\n".join(tables)


if __name__ == "__main__":
    main()
