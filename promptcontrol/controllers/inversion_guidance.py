"""``InversionGuidance``: make a pipeline call sample from an inversion of a real image (``pc.invert``).

While the session is active the pipeline's scheduler is a ``DDIMScheduler`` built from the inversion's scheduler
config (through ``session.patch``: the session puts the pipeline's own back when it ends), and at step ``i`` every
unconditional row's text features are the inversion's ``null_embeddings[i]`` — the source and the edited prompts
alike, as prompt-to-prompt does. Any other controller (``pc.trace``, ``pc.Replace``, ``pc.LocalBlend``...) composes
with it, so ``pc.edit(pipe, inversion, "edited prompt")`` edits the real image.
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol, Sequence

import torch

from ..context import SessionView, StepContext
from ..ddim import ddim_scheduler
from ..sites import AttentionSite
from .base import Controller


class InvertedImage(Protocol):
    """What this controller reads of an inversion (:class:`promptcontrol.Inversion` is the implementation; the
    protocol keeps the arrow pointing down: controllers never import the ``pc.invert`` job)."""

    prompt: str
    method: str
    null_embeddings: torch.Tensor  # (steps, K, D)
    timesteps: list[int]
    guidance_scale: float
    scheduler_config: dict

    @property
    def steps(self) -> int: ...

    @property
    def size(self) -> tuple[int, int]: ...

    @property
    def latent_hw(self) -> tuple[int, int]: ...


_READ = ("prompt", "method", "null_embeddings", "timesteps", "guidance_scale", "scheduler_config", "steps", "size",
         "latent_hw")


def _is_inverted_image(obj: object) -> bool:
    """Whether ``obj`` has everything :class:`InvertedImage` names (read without calling its properties)."""
    return all(hasattr(type(obj), name) or name in getattr(obj, "__dict__", {}) for name in _READ)


class InversionGuidance(Controller):
    """Make a pipeline call sample from an :class:`~promptcontrol.Inversion`: DDIM at its timesteps, its null
    embeddings.

    Start the call from ``inversion.x_T`` with ``num_inference_steps=inversion.steps``
    (``inversion.pipe_kwargs(pipe, prompts)`` gives those arguments); prompt 0 must be the inversion's prompt.
    It acts at no attention site. Raises ``ValueError`` when the call does not match the inversion.
    """

    def __init__(self, inversion: InvertedImage):
        if not _is_inverted_image(inversion):
            raise TypeError(f"InversionGuidance needs a pc.Inversion (from pc.invert), got {type(inversion).__name__}")
        self.inversion = inversion
        self._pipe: Any = None
        self._warned = False

    def applies_to(self, site: AttentionSite) -> bool:
        return False

    def bind(self, session: SessionView) -> None:
        pipe = session.pipe
        if pipe is None or getattr(pipe, "scheduler", None) is None:
            raise ValueError("sampling from an inversion needs the pipeline (its scheduler), not a bare UNet")
        self._pipe = pipe
        session.patch(pipe, "scheduler", ddim_scheduler(self.inversion.scheduler_config or pipe.scheduler.config))
        self._warned = False

    def unbind(self) -> None:
        self._pipe = None

    def begin_step(self, ctx: StepContext) -> None:
        inv = self.inversion
        _check_steps(ctx, inv.steps, inv.timesteps)
        _check_size(ctx, inv.latent_hw, inv.size)
        _check_source_prompt(ctx, inv.prompt)
        if ctx.index == 0 and not self._warned and inv.method == "null-text" and self._pipe is not None:
            scale = getattr(self._pipe, "_guidance_scale", None)
            if scale is not None and abs(float(scale) - inv.guidance_scale) > 1e-6:
                self._warned = True
                warnings.warn(
                    f"guidance_scale={scale:g} differs from the {inv.guidance_scale:g} the null-text embeddings were "
                    "fitted for: the unedited image will not be reconstructed faithfully",
                    stacklevel=2,
                )

    def transform_context(self, ctx: StepContext, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        rows = list(ctx.layout.uncond_rows)
        if not rows:
            return encoder_hidden_states
        null = self.inversion.null_embeddings[ctx.index]  # (K, D)
        if null.shape != encoder_hidden_states.shape[1:]:
            raise ValueError(
                f"the inversion's null embeddings are {tuple(null.shape)} per step but the pipeline's text features "
                f"are {tuple(encoder_hidden_states.shape[1:])}: was the image inverted with another pipeline?"
            )
        out = encoder_hidden_states.clone()  # (B, K, D)
        out[rows] = null.to(device=out.device, dtype=out.dtype)
        return out


def _check_steps(ctx: StepContext, steps: int, timesteps: Sequence[int]) -> None:
    """The call runs the inversion's number of DDIM steps at its timesteps."""
    if ctx.total is not None and ctx.total != steps:
        raise ValueError(
            f"the pipeline runs {ctx.total} denoising steps but the inversion has {steps}: pass "
            f"num_inference_steps={steps} (or invert again with steps={ctx.total})"
        )
    if ctx.index >= steps:
        raise ValueError(f"step {ctx.index} is past the inversion's {steps} steps")
    if int(round(ctx.timestep)) != timesteps[ctx.index]:
        raise ValueError(
            f"step {ctx.index} runs timestep {ctx.timestep:g}, the inversion's is {timesteps[ctx.index]}: "
            "sample with the inversion's DDIM steps from its x_T (a text-to-image call, strength 1)"
        )


def _check_size(ctx: StepContext, latent_hw: tuple[int, int], size: tuple[int, int]) -> None:
    """The call's latent has the inverted image's size."""
    if tuple(ctx.latent_hw) != tuple(latent_hw):
        w, h = size
        raise ValueError(
            f"the pipeline's latent is {ctx.latent_hw[0]}×{ctx.latent_hw[1]}, the inversion's {latent_hw[0]}×"
            f"{latent_hw[1]}: generate at the inverted image's size (height={h}, width={w})"
        )


def _check_source_prompt(ctx: StepContext, prompt: str) -> None:
    """Prompt 0 of the call is the prompt the image was inverted with."""
    prompts = ctx.run.prompts if ctx.run is not None else None
    if prompts and prompts[0] != prompt:
        raise ValueError(
            f"the source prompt {prompts[0]!r} is not the prompt the image was inverted with ({prompt!r}): "
            "put the inversion's prompt first, or invert again with this prompt"
        )
