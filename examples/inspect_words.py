"""Inspect: generate on the embedded model and save one heat map per word, and a grid.

    python examples/inspect_words.py --out runs/example-inspect
"""

import argparse
from pathlib import Path

import torch

import promptcontrol as pc

parser = argparse.ArgumentParser()
parser.add_argument("--prompt", default="a red circle on the left and a blue square on the right")
parser.add_argument("--out", default="runs/example-inspect")
args = parser.parse_args()

pipe = pc.load_pipeline()
with pc.trace(pipe, per_step=True) as tr:
    image = pipe(args.prompt, num_inference_steps=20, generator=torch.Generator().manual_seed(0)).images[0]

maps = tr.heatmaps()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
image.save(out / "image.png")
maps.grid(image).save(out / "grid.png")
for word in dict.fromkeys(maps.words):
    maps[word].overlay(image, legend=True).save(out / f"{word}.png")
maps.strip("circle", image, steps=[0, 5, 10, 15, 19]).save(out / "circle_steps.png")
maps.save(out / "maps.safetensors")
print(f"{len(maps.words)} word maps of {maps.prompt!r} in {out}")
