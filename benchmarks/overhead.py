"""Overhead of a pass-through session: ``pc.control(unet, pc.PassThrough())`` vs stock ``AttnProcessor2_0``.

SD 1.5-architecture UNet (published config, random weights), batch 2 (CFG), one denoising step per timing.
CPU: ``python -m benchmarks.overhead``; GPU: ``python -m benchmarks.overhead --device cuda --dtype float16``.
"""

from __future__ import annotations

import argparse

import torch

import promptcontrol as pc

from .harness import Case, compare, machine, markdown_table, save
from .models import sd15_unet, unet_inputs


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="cpu: process CPU time (shared CPUs)")
    parser.add_argument("--out", default="benchmarks/results/overhead")
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    unet = sd15_unet(dtype=dtype, device=args.device)
    tables, payload = [], {}
    for size in args.sizes:
        inputs = unet_inputs(unet, size, batch=2)

        def step():
            return unet(**inputs)

        cases = [
            Case("stock AttnProcessor2_0", step),
            Case("pc.control, no controller", step, lambda: pc.control(unet, cfg=True)),
            Case("pc.control + PassThrough (all 32 sites)", step, lambda: pc.control(unet, pc.PassThrough(), cfg=True)),
        ]
        results = compare(cases, repeats=args.repeats, device=args.device, clock=args.clock)
        title = f"SD 1.5 UNet, {size}×{size}, batch 2, {args.dtype}, {args.clock} clock, {machine()}"
        tables.append(markdown_table(title, results, {cases[2].name: 1.02}))
        payload[str(size)] = [r.__dict__ for r in results]
        save(f"{args.out}-{args.device}-{args.dtype}-{args.clock}-{size}", title, results)
    text = "\n\n".join(tables)
    print(text)
    return text


if __name__ == "__main__":
    main()
