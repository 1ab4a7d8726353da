"""Write the three job notebooks (inspect, emphasise, edit) into notebooks/, without outputs.

    python scripts/make_notebooks.py

The notebooks are generated so that their cells stay short and consistent; edit this file, not the .ipynb.
They run on the embedded toy model on CPU in well under a minute each; tests/test_notebooks.py executes them.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

SETUP = """import torch
import promptcontrol as pc

pipe = pc.load_pipeline()            # the embedded toy model (offline, CPU); or a hub id / local folder
seed = lambda s=0: torch.Generator().manual_seed(s)
big = lambda image: image.resize((192, 192), resample=0)   # 32x32 pictures, shown larger"""

NOTEBOOKS = {
    "inspect.ipynb": [
        new_markdown_cell(
            "# Inspect: which pixels attend to which words\n\n"
            "`pc.trace` records the cross-attention of a run and turns it into one heat map per word, at the "
            "image's size. Only the conditional rows are recorded, as running sums (memory does not grow with steps)."
        ),
        new_code_cell(SETUP),
        new_code_cell(
            'prompt = "a red circle on the left and a blue square on the right"\n'
            "with pc.trace(pipe) as tr:\n"
            "    image = pipe(prompt, num_inference_steps=20, generator=seed()).images[0]\n"
            "maps = tr.heatmaps()          # HeatMaps of image 0\n"
            "maps.words"
        ),
        new_markdown_cell("The picture and one overlay per word (each map normalised to [0, 1]):"),
        new_code_cell("maps.grid(big(image))"),
        new_markdown_cell("A phrase is the union of its tokens; a repeated word can be picked by occurrence:"),
        new_code_cell('maps["red circle"].overlay(big(image), legend=True)'),
        new_markdown_cell("How a word's map grows over denoising (record per step, opt-in):"),
        new_code_cell(
            "with pc.trace(pipe, per_step=True) as tr:\n"
            "    image = pipe(prompt, num_inference_steps=10, generator=seed()).images[0]\n"
            'tr.heatmaps().strip("circle", big(image), steps=[0, 3, 6, 9])'
        ),
        new_markdown_cell("The maps as numbers, for your own analysis:"),
        new_code_cell('maps.to_tensor().shape, float(maps["circle"].tensor.mean())'),
    ],
    "emphasise.ipynb": [
        new_markdown_cell(
            "# Emphasise: per-word weights\n\n"
            "`pc.Reweight` scales the attention to a word's tokens on fused SDPA kernels; `pc.generate` reads the "
            "weights from the prompt syntax people already type (A1111 `(word:1.5)`, `[word]`; compel `word+`)."
        ),
        new_code_cell(SETUP),
        new_code_cell('pc.parse_prompt("a (red:1.5) circle and a [blue] square+")'),
        new_markdown_cell("The same seed with the colour word weighted 0.5, 1 and 2:"),
        new_code_cell(
            "from PIL import Image\n"
            "images = [pc.generate(pipe, f\"a (red:{w}) circle\", seed=0, num_inference_steps=20)[0] for w in (0.5, 1.0, 2.0)]\n"
            "row = Image.new('RGB', (3 * 192, 192))\n"
            "for i, im in enumerate(images):\n"
            "    row.paste(big(im), (192 * i, 0))\n"
            "row"
        ),
        new_markdown_cell("The controller itself, inside any pipeline call (three modes: `attention`, `softmax`, `embedding`):"),
        new_code_cell(
            'with pc.control(pipe, pc.Reweight({"square": 2.0}, mode="softmax")):\n'
            '    image = pipe("a yellow square", num_inference_steps=20, generator=seed()).images[0]\n'
            "big(image)"
        ),
    ],
    "edit.ipynb": [
        new_markdown_cell(
            "# Edit a prompt, keep the layout\n\n"
            "`pc.edit` runs prompt-to-prompt on fused attention: the source and the edits start from the same noise; "
            "the edits take the source's cross-attention maps for the first `cross_steps` of the run and its "
            "self-attention for the first `self_steps`; `blend` keeps everything outside the named words' region."
        ),
        new_code_cell(SETUP),
        new_code_cell(
            'out = pc.edit(pipe, "a red circle on the left and a blue square on the right",\n'
            '              ["a green circle on the left and a blue square on the right",\n'
            '               "a red triangle on the left and a blue square on the right"],\n'
            '              cross_steps=0.8, self_steps=0.4, seed=0, num_inference_steps=20)\n'
            "out.grid()"
        ),
        new_markdown_cell("Without the source's attention (`cross_steps=0, self_steps=0`) the edit is just another prompt with the same seed:"),
        new_code_cell(
            'plain = pc.edit(pipe, "a red circle on the left and a blue square on the right",\n'
            '                "a green circle on the left and a blue square on the right",\n'
            "                cross_steps=0.0, self_steps=0.0, seed=0, num_inference_steps=20)\n"
            "plain.grid()"
        ),
        new_markdown_cell("A local blend keeps the pixels outside the edited word's region:"),
        new_code_cell(
            'pc.edit(pipe, "a red circle on the left and a blue square on the right",\n'
            '        "a green circle on the left and a blue square on the right",\n'
            '        blend=["circle"], seed=0, num_inference_steps=20).grid()'
        ),
    ],
}


def main() -> None:
    folder = Path(__file__).resolve().parent.parent / "notebooks"
    folder.mkdir(exist_ok=True)
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
        nbformat.validate(nb)
        (folder / name).write_text(nbformat.writes(nb) + "\n")
        print("wrote", folder / name)


if __name__ == "__main__":
    main()
