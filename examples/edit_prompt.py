"""Edit: change a word, keep the layout (prompt-to-prompt), with and without a local blend.

    python examples/edit_prompt.py --out runs/example-edit
"""

import argparse
from pathlib import Path

import promptcontrol as pc

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="runs/example-edit")
args = parser.parse_args()

pipe = pc.load_pipeline()
source = "a red circle on the left and a blue square on the right"
edits = ["a green circle on the left and a blue square on the right",
         "a red triangle on the left and a blue square on the right"]
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

kept = pc.edit(pipe, source, edits, cross_steps=0.8, self_steps=0.4, seed=0, num_inference_steps=20)
kept.grid().save(out / "edit.png")
plain = pc.edit(pipe, source, edits, cross_steps=0.0, self_steps=0.0, seed=0, num_inference_steps=20)
plain.grid().save(out / "plain_prompts.png")       # the same prompts and seed without the source's attention
blended = pc.edit(pipe, source, edits[0], blend=["circle"], seed=0, num_inference_steps=20)
blended.grid().save(out / "edit_blend.png")
print(f"grids in {out}")
