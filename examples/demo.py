"""The smallest end-to-end run: a pipeline inside pc.control, an image written to disk.

    python examples/demo.py --out runs/demo
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import promptcontrol as pc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="a red circle and a blue square")
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pipe = pc.testing.tiny_pipeline("sd15")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with pc.control(pipe, pc.PassThrough()) as session:
        image = pipe(args.prompt, num_inference_steps=10, generator=torch.Generator().manual_seed(args.seed)).images[0]
        print(f"{len(session.sites)} attention sites controlled; last step {session.context.index + 1}/{session.context.total}")
    image.save(out / "image.png")
    print(f"wrote {out / 'image.png'}")


if __name__ == "__main__":
    main()
