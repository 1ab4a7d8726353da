"""Shared fixtures: tiny offline pipelines (built once per test session, never mutated by tests)."""

from __future__ import annotations

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
