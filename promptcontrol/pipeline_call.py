"""The pieces of a pipeline call that every face (the CLI, the sweep) builds the same way.

One copy each, below the faces: the seed range, the keyword arguments of a call, the seeded CPU generator and
the quiet loading of diffusers. Nothing here knows argparse.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes seeds up to this


def pipe_kwargs(steps: int, guidance: float, size: tuple[int, int] | None) -> dict[str, Any]:
    """``num_inference_steps``, ``guidance_scale`` and, when ``size`` = (height, width) is given, the size."""
    kwargs: dict[str, Any] = dict(num_inference_steps=steps, guidance_scale=guidance)
    if size is not None:
        kwargs["height"], kwargs["width"] = size
    return kwargs


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
