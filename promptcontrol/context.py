"""What a controller knows at one UNet call: the step, the timestep, and which batch row is which.

Diffusers pipelines batch classifier-free guidance as ``[uncond rows | cond rows]`` only when guidance is on;
with ``guidance_scale <= 1`` the batch holds conditional rows alone. Each prompt is repeated
``num_images_per_prompt`` times, consecutively. :func:`batch_layout` turns those facts into per-row labels so
that no controller ever guesses ``batch // 2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence


@dataclass
class RunInfo:
    """What one pipeline call said about its prompts, captured from its ``encode_prompt`` call.

    prompts:            the prompt of each prompt index, or ``None`` when the pipeline got embeddings only
    prompts_2:          SDXL's / SD3's second prompt of each prompt index (``None`` means same as ``prompts``)
    prompts_3:          SD3's T5 prompt of each prompt index (``None`` means same as ``prompts``)
    negative_prompts:   the negative prompt of each prompt index, as given (``None``: empty / embeddings)
    images_per_prompt:  ``num_images_per_prompt``
    cfg:                whether the pipeline runs classifier-free guidance (batch ``[uncond | cond]``)
    """

    prompts: list[str] | None = None
    prompts_2: list[str] | None = None
    prompts_3: list[str] | None = None
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


def timestep_value(timestep: Any) -> float:
    """The scheduler's timestep as a float (the first element of a tensor). On a GPU this reads the device: call
    it outside the denoising step (at the end of a run), or where a controller really needs the value."""
    if hasattr(timestep, "flatten"):
        return float(timestep.flatten()[0])
    return float(timestep)


@dataclass(frozen=True, init=False)
class StepContext:
    """One UNet call, as the controllers see it.

    index:     0-based denoising step of the current pipeline run (one per UNet call, never per layer)
    timestep:  the scheduler's timestep value, converted to a float on first access (``raw_timestep`` keeps what
               the UNet got: a tensor on the latents' device, read without a device sync inside the step)
    total:     number of steps in the run where the pipeline says (``None`` for a bare UNet)
    latent_hw: spatial size of the latent (the grid of level 0)
    layout:    which row is which (see :class:`BatchLayout`)
    run:       the captured pipeline-call info, when there is one
    run_id:    counts the pipeline runs of the session (1 for the first); changes exactly when a new run starts
    text_length: tokens of the text input of this call (``encoder_hidden_states.shape[1]``), or ``None``; Flux's
               single-stream attention learns from it where the text ends in its ``[text | image]`` sequence.
               Read as the pipeline passed it, before the controllers' ``transform_inputs``: concept tokens that
               ConceptAttention appends come after it (the Flux processor adds their count)

    Nothing in the step path reads ``timestep`` (on CUDA, ``float`` of a device tensor waits for the GPU): the
    store keeps ``raw_timestep`` and converts when the recording is read; ``InversionGuidance`` reads it (it
    checks the inversion's timesteps, on inversion runs only), as may a user's ``steps=`` callable.
    """

    index: int
    total: int | None
    latent_hw: tuple[int, int]
    layout: BatchLayout
    run: RunInfo | None = field(default=None, compare=False)
    run_id: int = 0
    raw_timestep: Any = field(default=None, compare=False, repr=False)
    text_length: int | None = field(default=None, compare=False)

    def __init__(
        self,
        index: int,
        timestep: Any,
        total: int | None,
        latent_hw: tuple[int, int],
        layout: BatchLayout,
        run: RunInfo | None = None,
        run_id: int = 0,
        text_length: int | None = None,
    ):
        for name, value in (("index", index), ("total", total), ("latent_hw", latent_hw), ("layout", layout),
                            ("run", run), ("run_id", run_id), ("raw_timestep", timestep), ("text_length", text_length)):
            object.__setattr__(self, name, value)

    @property
    def timestep(self) -> float:
        """The timestep as a float (converted once; a device read on CUDA — not for the step path)."""
        value = self.__dict__.get("_timestep_float")
        if value is None:
            value = timestep_value(self.raw_timestep)
            object.__setattr__(self, "_timestep_float", value)
        return value

    @property
    def batch_size(self) -> int:
        return self.layout.size

    @property
    def fraction(self) -> float | None:
        """Progress through the run in [0, 1): ``index / total``, or ``None`` when the total is unknown."""
        return None if not self.total else self.index / self.total


def batch_mismatch(ctx: StepContext, text_rows: int) -> str:
    """Why a UNet call's latent batch (``ctx.layout.size`` rows) and its text batch (``text_rows``) differ, and
    what to pass instead: the pipeline repeats the prompts × images per prompt; latents are taken as given."""
    latent_rows = ctx.layout.size
    run = ctx.run
    doubled = bool(run is not None and run.cfg) and latent_rows % 2 == 0 and text_rows % 2 == 0
    seen = f"the UNet got {latent_rows} latent rows and {text_rows} text rows{', doubled for guidance' if doubled else ''}"
    if run is None or run.prompts is None:
        return (
            f"batch mismatch: {seen}; give latents and prompt embeddings the same batch "
            "(prompts × num_images_per_prompt)"
        )
    images = len(run.prompts) * run.images_per_prompt
    return (
        f"batch mismatch: {len(run.prompts)} prompt(s) × {run.images_per_prompt} image(s) per prompt = {images} "
        f"image(s), but the latents hold {latent_rows // 2 if doubled else latent_rows} ({seen}); pass latents "
        f"(or images) with {images} row(s), or as many prompts × num_images_per_prompt as latent rows"
    )


class SessionView(Protocol):
    """What a controller and a processor may read of the session they serve (:class:`promptcontrol.Session` is
    the implementation; this protocol keeps the arrows pointing down: controllers never import the session).

    ``pipe`` (or ``None`` for a bare model), ``denoiser`` (the UNet or transformer; ``unet`` is the same object on
    UNet pipelines), ``sites`` (every attention site), ``controllers``, ``tokenizer``, ``context`` (the current
    :class:`StepContext`), ``hook_module``; ``patch(obj, name, value)`` changes an attribute for the session's length.
    """

    pipe: Any
    denoiser: Any
    sites: Sequence[Any]
    controllers: Sequence[Any]
    tokenizer: Any
    context: "StepContext | None"
    hook_module: Any

    @property
    def unet(self) -> Any: ...

    def patch(self, obj: Any, name: str, value: Any) -> None: ...
