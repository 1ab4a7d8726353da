"""The Python that reproduces each result of the page, as text a person copies into a script or notebook.

Every snippet is complete: imports, the pipeline's load line, the call with every argument the page used
(seeds included), and the lines that make the pictures. Running it gives the same images and maps.
"""

from __future__ import annotations

from typing import Any

from .queries import parse_query

HEADER = "import torch\nimport promptcontrol as pc\n\n"


def _kwargs(**values: Any) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in values.items())


def _seeded(seed: int) -> str:
    return f'torch.Generator("cpu").manual_seed({int(seed)})'


def heatmap_expression(query: str, maps: str = "maps") -> str:
    """The expression that picks the map the page shows for ``query`` (see :func:`.queries.parse_query`)."""
    kind, value, occurrence = parse_query(query)
    if kind == "token":
        return f"{maps}.token({value})"
    if kind == "special":
        return f"{maps}.special({value!r})"
    if occurrence is not None:
        return f"{maps}.word({value!r}, occurrence={occurrence})"
    return f"{maps}[{value!r}]"


def inspect_code(load: str, prompt: str, *, seed: int, steps: int, guidance: float, per_step: bool,
                 normalize: str | None, query: str | None = None, step: int | None = None) -> str:
    """``pc.trace`` around one pipeline call, the maps, the shown map's overlay and the saved files."""
    options = "per_step=True" if per_step else ""
    lines = [
        HEADER + load,
        f"with pc.trace(pipe{', ' + options if options else ''}) as tr:",
        f"    image = pipe({prompt!r}, {_kwargs(num_inference_steps=steps, guidance_scale=guidance)},",
        f"                 generator={_seeded(seed)}).images[0]",
        f"maps = tr.heatmaps({_kwargs(normalize=normalize)})",
        'maps.save("maps.safetensors")              # every word\'s map, (H, W) float32 each',
    ]
    if query:
        source = "maps"
        if step is not None:
            lines.append(f"step_maps = tr.heatmaps({_kwargs(steps=[step], normalize=normalize)})  # step {step} alone")
            source = "step_maps"
        lines.append(f'{heatmap_expression(query, source)}.overlay(image).save("map.png")')
    lines.append('maps.grid(image).save("grid.png")')
    return "\n".join(lines) + "\n"


def emphasise_code(load: str, prompts: list[str], *, mode: str, seed: int, steps: int, guidance: float) -> str:
    """One ``pc.generate`` per prompt, each from the same seed."""
    listing = "".join(f"    {p!r},\n" for p in prompts)
    return (
        HEADER + load + "\n"
        f"prompts = [\n{listing}]\n"
        "images = [pc.generate(pipe, prompt, "
        f"{_kwargs(seed=seed, mode=mode, num_inference_steps=steps, guidance_scale=guidance)})[0]\n"
        "          for prompt in prompts]                  # the same seed: only the weights differ\n"
    )


def edit_code(load: str, source: str, edits: list[str], *, cross_steps: float, self_steps: float,
              blend: list[str] | None, blend_threshold: float, reweight: dict[str, float] | None, mode: str,
              seed: int, steps: int, guidance: float, image: str | None = None,
              invert_method: str = "null-text") -> str:
    """``pc.edit`` (after ``pc.invert`` for an uploaded image), its blend mask and the grid."""
    lines = [HEADER + load]
    first = repr(source)
    run = _kwargs(num_inference_steps=steps, guidance_scale=guidance)
    if image is not None:
        lines.append(f"inv = pc.invert(pipe, {image!r}, {source!r}, "
                     f"{_kwargs(steps=steps, method=invert_method, guidance_scale=guidance)}, reconstruct=False)")
        first, run = "inv", ""  # the edit takes the inversion's steps, guidance and noise
    if blend:
        lines.append(f"blend = pc.LocalBlend({blend!r}, threshold={blend_threshold!r})")
    options = _kwargs(cross_steps=cross_steps, self_steps=self_steps)
    options += ", blend=blend" if blend else ""
    options += f", reweight={reweight!r}" if reweight else ""
    options += f", mode={mode!r}"
    options += f", seed={seed!r}" if image is None else ""
    options += f", {run}" if run else ""
    lines.append(f"out = pc.edit(pipe, {first}, {edits!r},\n              {options})")
    lines.append("out.source, out.edited                    # PIL images: the source, then one per edit")
    if blend:
        lines.append("masks = blend.last_mask                  # (images, 1, h, w) bool; the page shows "
                     "masks[0] | masks[i] for edit i")
    lines.append('out.grid().save("grid.png")')
    return "\n".join(lines) + "\n"
