"""Shared fixtures: tiny offline pipelines (built once per test session, never mutated by tests) and the layers
prompt-to-prompt injects self-attention at, read from a UNet's config."""

from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_pipes():
    """A cache of tiny pipelines by kind: ``tiny_pipes("sd15")``."""
    from promptcontrol.testing import tiny_pipeline

    cache = {}

    def get(kind: str = "sd15"):
        if kind not in cache:
            cache[kind] = tiny_pipeline(kind)
        return cache[kind]

    return get


@pytest.fixture
def sd15(tiny_pipes):
    return tiny_pipes("sd15")


def coarsest_attention_levels(unet, count: int = 2) -> list[int]:
    """Halvings of the ``count`` coarsest resolutions that hold attention, read from the UNet's config: down block
    ``i`` works at latent / 2**i and the middle block at the last down block's resolution (SD 1.5 at 512²: 16² and
    8², the layers prompt-to-prompt injects self-attention at, ``att.shape[1] <= 16 ** 2``)."""
    config = unet.config
    levels = {i for i, name in enumerate(config.down_block_types) if "CrossAttn" in name}
    if "CrossAttn" in (config.mid_block_type or ""):
        levels.add(len(config.down_block_types) - 1)
    return sorted(levels)[-count:]


@pytest.fixture
def injected_self_queries():
    """``(unet, latent_hw) -> {query count}``: the self-attention layers prompt-to-prompt injects at, by their
    number of queries (the grid of :func:`coarsest_attention_levels` at this latent size; stride-2 convolutions
    round odd sizes up)."""

    def queries(unet, latent_hw: tuple[int, int]) -> set[int]:
        h, w = latent_hw
        return {math.ceil(h / 2**i) * math.ceil(w / 2**i) for i in coarsest_attention_levels(unet)}

    return queries
