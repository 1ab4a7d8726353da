"""Cost of ``pc.Reweight`` against stock diffusers, and what the explicit-softmax path would cost.

SD 1.5-architecture UNet (published config, random weights), batch 2 (CFG), one denoising step per timing,
weights on two token positions of the conditional row. Cases, timed round-robin in one run:

* stock ``AttnProcessor2_0`` (baseline);
* ``Reweight`` in each mode: ``attention`` (V scaled per token, SDPA), ``softmax`` (log-w SDPA mask),
  ``embedding`` (text features scaled once per step);
* diffusers' classic ``AttnProcessor`` at every site (explicit softmax, as P2P-style tools run) — the cost of
  materialising the maps, without even reweighting them.

CPU: ``python -m benchmarks.reweight`` (256×256); GPU: ``python -m benchmarks.reweight --device cuda --dtype
float16 --sizes 512``.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

import promptcontrol as pc

from .harness import Case, compare, machine, markdown_table, save
from .models import sd15_unet, unet_inputs

WEIGHTS = {2: 2.0, 7: 0.5}  # token positions of the conditional row


@contextlib.contextmanager
def classic_processors(unet):
    """diffusers' explicit-softmax ``AttnProcessor`` at every site for the block; the originals after."""
    from diffusers.models.attention_processor import AttnProcessor

    saved = dict(unet.attn_processors)
    unet.set_attn_processor(AttnProcessor())
    try:
        yield
    finally:
        unet.set_attn_processor(dict(saved))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", default="benchmarks/results/reweight")
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    unet = sd15_unet(dtype=dtype, device=args.device)
    tables = []
    for size in args.sizes:
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
        results = compare(cases, repeats=args.repeats, device=args.device)
        title = f"Reweight, SD 1.5 UNet, {size}×{size}, batch 2, {args.dtype}, {machine()}"
        tables.append(markdown_table(title, results, {c.name: 1.03 for c in cases[1:4]}))
        save(f"{args.out}-{args.device}-{args.dtype}-{size}", title, results)
    text = "\n\n".join(tables)
    print(text)
    return text


if __name__ == "__main__":
    main()
