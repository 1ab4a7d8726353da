"""The three jobs on real Stable Diffusion models, fp16 on a CUDA GPU (documented; not run in CI).

Needs the model hub (or local copies of the folders) and a GPU with ~6 GB (SD 1.5) / ~12 GB (SDXL):

    python examples/real_models.py --model runwayml/stable-diffusion-v1-5 --out runs/sd15
    python examples/real_models.py --model stabilityai/stable-diffusion-xl-base-1.0 --size 1024 --out runs/sdxl

Offline, pass a local folder saved with `save_pretrained`; a hub id without network fails with
"no network: pass a local folder".
"""

import argparse
from pathlib import Path

import torch

import promptcontrol as pc

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="runwayml/stable-diffusion-v1-5")
parser.add_argument("--size", type=int, default=512)
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--out", default="runs/real")
args = parser.parse_args()

pipe = pc.load_pipeline(args.model, device="cuda", dtype=torch.float16)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
common = dict(height=args.size, width=args.size, num_inference_steps=args.steps)

# Inspect: per-word heat maps (running sums only: a few MB whatever the step count)
prompt = "a photograph of a red car parked next to a yellow house"
with pc.trace(pipe) as tr:
    image = pipe(prompt, generator=torch.Generator("cuda").manual_seed(0), **common).images[0]
maps = tr.heatmaps()
maps.grid(image).save(out / "inspect_grid.png")
maps["car"].overlay(image, legend=True).save(out / "inspect_car.png")

# Emphasise: A1111 / compel syntax, reweighting attention on fused SDPA kernels
pc.generate(pipe, "a photograph of a (red:1.6) car parked next to a yellow house", seed=0, **common)[0].save(
    out / "emphasise_red.png"
)

# Edit: swap a word and keep the layout (prompt-to-prompt), with a local blend around the car
result = pc.edit(pipe, "a photograph of a red car parked next to a yellow house",
                 ["a photograph of a blue car parked next to a yellow house",
                  "a photograph of a red bicycle parked next to a yellow house"],
                 cross_steps=0.8, self_steps=0.4, blend=[["car"], ["car"], ["bicycle"]], seed=0, **common)
result.grid().save(out / "edit_grid.png")
print(f"pictures in {out}")
