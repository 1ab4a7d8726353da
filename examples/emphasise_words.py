"""Emphasise: the same seed with a word weighted 0.5, 1 and 2, from the prompt syntax and from the API.

    python examples/emphasise_words.py --out runs/example-emphasise
"""

import argparse
from pathlib import Path

import torch

import promptcontrol as pc

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="runs/example-emphasise")
args = parser.parse_args()

pipe = pc.load_pipeline()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
for weight in (0.5, 1.0, 2.0):
    image = pc.generate(pipe, f"a (red:{weight}) circle and a blue square", seed=0, num_inference_steps=20)[0]
    image.save(out / f"red_{weight}.png")

# The same thing without the syntax, in any of the three modes:
for mode in ("attention", "softmax", "embedding"):
    with pc.control(pipe, pc.Reweight({"square": 2.0}, mode=mode)):
        image = pipe("a red circle and a blue square", num_inference_steps=20,
                     generator=torch.Generator().manual_seed(0)).images[0]
    image.save(out / f"square_2.0_{mode}.png")
print(pc.parse_prompt("a ((red)) circle [and] a (blue square:1.3)"))
print(f"images in {out}")
