"""What a controller knows at one UNet call: the step, the timestep, and which batch row is which.

Diffusers pipelines batch classifier-free guidance as ``[uncond rows | cond rows]`` only when guidance is on;
with ``guidance_scale <= 1`` the batch holds conditional rows alone. Each prompt is repeated
``num_images_per_prompt`` times, consecutively. :func:`batch_layout` turns those facts into per-row labels so
that no controller ever guesses ``batch // 2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunInfo:
    """What one pipeline call said about its prompts, captured from its ``encode_prompt`` call.

    prompts:            the prompt of each prompt index, or ``None`` when the pipeline got embeddings only
    prompts_2:          SDXL's second prompt of each prompt index (``None`` means same as ``prompts``)
    negative_prompts:   the negative prompt of each prompt index, as given (``None``: empty / embeddings)
    images_per_prompt:  ``num_images_per_prompt``
    cfg:                whether the pipeline runs classifier-free guidance (batch ``[uncond | cond]``)
    """

    prompts: list[str] | None = None
    prompts_2: list[str] | None = None
    negative_prompts: list[str] | None = None
    images_per_prompt: int = 1
    cfg: bool | None = None


@dataclass(frozen=True)
class BatchLayout:
    """Labels of the rows of one UNet batch.

    cond_rows / uncond_rows: batch rows that carry the prompt / the negative (empty) prompt
    prompt_of_row:           prompt index of each row (uncond rows: the prompt they guide)
    image_of_row:            index of the output image each row belongs to
    """

    cond_rows: tuple[int, ...]
    uncond_rows: tuple[int, ...]
    prompt_of_row: tuple[int, ...]
    image_of_row: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.prompt_of_row)

    @property
    def num_images(self) -> int:
        return len(self.cond_rows)

    def cond_row_of_image(self, image: int) -> int:
        """The conditional batch row that produces output image ``image``."""
        return self.cond_rows[image]


def batch_layout(batch_size: int, run: RunInfo | None, cfg_default: bool = False) -> BatchLayout:
    """Label the rows of a UNet batch of ``batch_size`` rows.

    With guidance on, the first half is unconditional and the second conditional. Rows are grouped by prompt,
    ``images_per_prompt`` consecutive rows each. When the run info does not fit the batch (a bare UNet, an
    unknown pipeline), every row counts as conditional and as its own prompt, unless ``cfg_default`` says the
    caller batches ``[uncond | cond]``.
    """
    cfg = run.cfg if run is not None and run.cfg is not None else cfg_default
    if cfg and batch_size % 2:
        cfg = False
    per_half = batch_size // 2 if cfg else batch_size
    per_prompt = run.images_per_prompt if run is not None else 1
    if run is not None and run.prompts is not None and len(run.prompts) * per_prompt != per_half:
        per_prompt = 1  # the run info belongs to a different call shape; fall back to one prompt per row
    if per_prompt < 1 or per_half % per_prompt:
        per_prompt = 1
    half = [(i // per_prompt, i) for i in range(per_half)]
    if cfg:
        rows = half + half
        uncond = tuple(range(per_half))
        cond = tuple(range(per_half, batch_size))
    else:
        rows = half
        uncond, cond = (), tuple(range(batch_size))
    return BatchLayout(
        cond_rows=cond,
        uncond_rows=uncond,
        prompt_of_row=tuple(p for p, _ in rows),
        image_of_row=tuple(i for _, i in rows),
    )


@dataclass(frozen=True)
class StepContext:
    """One UNet call, as the controllers see it.

    index:     0-based denoising step of the current pipeline run (one per UNet call, never per layer)
    timestep:  the scheduler's timestep value
    total:     number of steps in the run where the pipeline says (``None`` for a bare UNet)
    latent_hw: spatial size of the latent (the grid of level 0)
    layout:    which row is which (see :class:`BatchLayout`)
    run:       the captured pipeline-call info, when there is one
    run_id:    counts the pipeline runs of the session (1 for the first); changes exactly when a new run starts
    """

    index: int
    timestep: float
    total: int | None
    latent_hw: tuple[int, int]
    layout: BatchLayout
    run: RunInfo | None = field(default=None, compare=False)
    run_id: int = 0

    @property
    def batch_size(self) -> int:
        return self.layout.size

    @property
    def fraction(self) -> float | None:
        """Progress through the run in [0, 1): ``index / total``, or ``None`` when the total is unknown."""
        return None if not self.total else self.index / self.total
