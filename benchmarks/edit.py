"""Cost of a prompt-to-prompt edit (1 source + 1 edit) against stock diffusers generating the same 2 prompts.

A ``StableDiffusionPipeline`` around an SD 1.5-architecture UNet (published config, random weights) with a small
random text encoder (768 wide, so the UNet accepts it) and output ``latent`` (no VAE decode): the timed call is
``pipe([source, edit], latents=..., num_inference_steps=--steps)`` — text encoding, ``--steps`` UNet calls of
batch 4 (CFG) and the scheduler. Cases, interleaved after warm-up (``benchmarks/harness.py``):

* stock diffusers (``AttnProcessor2_0``, SDPA) — the baseline;
* ``pc.edit``'s controllers with every step inside both windows (Replace on every cross site, source
  self-attention injected at the two coarsest levels) — the worst case, fused on SDPA;
* the same plus ``LocalBlend`` (records probabilities at the blend sites only, masks the latents each step);
* stock diffusers with the classic ``AttnProcessor`` at every layer (explicit softmax, what prompt-to-prompt's
  attention hook needs), and an explicit prompt-to-prompt processor that also edits the materialised maps.

CPU:  ``python -m benchmarks.edit`` (256×256, latent 32×32)      GPU: ``--device cuda --dtype float16 --size 512``
"""

from __future__ import annotations

import argparse

import torch

import promptcontrol as pc
from promptcontrol.controllers.inject import InjectSelf
from promptcontrol.controllers.edit import AutoEdit

from .cases import EDIT, SOURCE, build_pipeline, classic_processors, explicit_edit
from .harness import Case, compare, machine, markdown_table, save
from .models import sd15_unet


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1, help="denoising steps per timed call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", default="benchmarks/results/edit")
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    unet = sd15_unet(dtype=dtype, device=args.device)
    pipe = build_pipeline(unet)
    prompts = [SOURCE, EDIT]
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, args.size // 8, args.size // 8, generator=g).repeat(2, 1, 1, 1).to(args.device, dtype)

    def generate():
        return pipe(prompts, latents=latents, num_inference_steps=args.steps, output_type="latent")

    explicit = explicit_edit(pipe, args.size)  # benchmarks/cases.py, shared with benchmarks/run.py

    def edit_controllers(blend: bool):
        controllers = [AutoEdit(1.0), InjectSelf(1.0)]
        if blend:
            controllers.append(pc.LocalBlend([["red"], ["blue"]], start=0.0))
        return lambda: pc.control(pipe, *controllers)

    cases = [
        Case("stock diffusers (SDPA), 2 prompts", generate),
        Case("pc.edit controllers (replace + self injection, every step)", generate, edit_controllers(False)),
        Case("pc.edit controllers + LocalBlend", generate, edit_controllers(True)),
        Case("classic AttnProcessor everywhere (explicit softmax)", generate, lambda: classic_processors(unet)),
        Case("explicit prompt-to-prompt (softmax + map edits)", generate, explicit),
    ]
    results = compare(cases, repeats=args.repeats, device=args.device)
    title = (
        f"1 source + 1 edit, SD 1.5 UNet, {args.size}×{args.size}, CFG (UNet batch 4), {args.steps} step(s) per call, "
        f"{args.dtype}, {machine()}"
    )
    table = markdown_table(title, results, {cases[1].name: 1.05, cases[2].name: 1.05})
    save(f"{args.out}-{args.device}-{args.dtype}-{args.size}", title, results)
    print(table)
    return table


if __name__ == "__main__":
    main()
