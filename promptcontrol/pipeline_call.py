"""The pieces of a pipeline call that every face (the CLI, the sweep) builds the same way.

One copy each, below the faces: the seed range, the keyword arguments of a call (and the ones a pipeline's own
``__call__`` needs for promptcontrol to read its words right), the seeded CPU generator and the quiet loading of
diffusers. Nothing here knows argparse.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Iterator

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes seeds up to this


def pipe_kwargs(steps: int, guidance: float, size: tuple[int, int] | None) -> dict[str, Any]:
    """``num_inference_steps``, ``guidance_scale`` and, when ``size`` = (height, width) is given, the size."""
    kwargs: dict[str, Any] = dict(num_inference_steps=steps, guidance_scale=guidance)
    if size is not None:
        kwargs["height"], kwargs["width"] = size
    return kwargs


FACE_CALL_DEFAULTS: dict[str, Any] = {
    # PixArt / Sana: the image at exactly the asked size (their aspect-ratio tables would generate at a nearby
    # size and resize; the tables know only the real models' sample sizes)
    "use_resolution_binning": False,
    # Sana: no instruction before the prompt, so the prompt's words sit where promptcontrol's positions say
    "complex_human_instruction": None,
    # PixArt / Sana: the prompt as typed (cleaning rewrites it, moving words off the positions tokenized here)
    "clean_caption": False,
}
"""Arguments the faces pass to a pipeline whose ``__call__`` takes them (read from its signature)."""


def accepted_call_defaults(pipe) -> dict[str, Any]:
    """The entries of :data:`FACE_CALL_DEFAULTS` that ``pipe.__call__`` has a parameter for (none on SD / SD3)."""
    try:
        parameters = inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):  # no readable signature: pass nothing extra
        return {}
    return {name: value for name, value in FACE_CALL_DEFAULTS.items() if name in parameters}


def pipeline_call_kwargs(pipe, steps: int, guidance: float, size: tuple[int, int] | None) -> dict[str, Any]:
    """:func:`pipe_kwargs` plus what ``pipe`` needs of :data:`FACE_CALL_DEFAULTS`."""
    return {**accepted_call_defaults(pipe), **pipe_kwargs(steps, guidance, size)}


def seeded_generator(seed: int):
    """A CPU ``torch.Generator`` seeded with ``seed`` (the same noise on every device)."""
    import torch

    return torch.Generator(device="cpu").manual_seed(int(seed))


@contextmanager
def quiet_diffusers_logs() -> Iterator[None]:
    """diffusers logs nothing inside (loading errors are raised and explained, one line each)."""
    from diffusers.utils import logging as diffusers_logging

    before = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL + 1)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(before)
