"""What an :class:`~promptcontrol.controllers.store.AttentionStore` keeps per pipeline run, and how it is read.

``RunRecord`` (one pipeline call's tensors, one slice per image), ``RecordedImage`` (one output image: its run and
slot), the resolution cap (``capped_grid``, ``pool_to``), the memory arithmetic (``estimate_bytes``), the
device → host copies that never wait inside a step (``HostCopies``) and ``recording_of``, which hands one image out
as a :class:`~promptcontrol.recording.Recording`. The store itself (selection, step bookkeeping, ``record``) lives
in :mod:`promptcontrol.controllers.store`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..context import timestep_value
from ..recording import Recording
from ..sites import AttentionSite, grid_for


@dataclass
class RunRecord:
    """What one pipeline call left in the store (all tensors hold one slice per image of the run).

    sums[key]:       (N, Q, K) float32 — summed over recorded steps and heads
    counts[key]:     number of (step × head) maps added to ``sums[key]``
    head_sums[key]:  (N, heads, K, h', w') float32 — summed over steps (``per_head``); on the attention's device
                     while the run records, on the CPU once the recording is read
    head_counts[key]: number of steps added to ``head_sums[key]``
    step_maps[step][key]: (N, K, h', w') at the store's dtype on CPU — mean over heads (``per_step="site"``)
    level_steps[step][level]: (N, K, h', w') at the store's dtype on CPU — mean over heads and the level's sites
                     (``per_step="level"``); ``level_sites[level]``: how many sites went into each
    grids[key]:      the site's (h, w); ``small_grids[key]``: (h', w') after the resolution cap
    """

    run_id: int
    latent_hw: tuple[int, int]
    prompts: list[str | None]
    prompts_2: list[str | None]
    num_tokens: int | None = None
    total: int | None = None  # the run's number of steps, where the pipeline says
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    head_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    head_counts: dict[str, int] = field(default_factory=dict)
    step_maps: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    level_steps: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)
    level_sites: dict[int, int] = field(default_factory=dict)
    timesteps: dict[int, Any] = field(default_factory=dict)  # floats once settled (tensors while recording)
    grids: dict[str, tuple[int, int]] = field(default_factory=dict)
    small_grids: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return len(self.prompts)

    @property
    def steps(self) -> list[int]:
        """The step indices recorded in this run (every step that reached ``record``)."""
        return sorted(self.timesteps)

    def nbytes(self) -> int:
        """Bytes held by the run's tensors (running sums, per-head sums, per-step and per-level maps)."""
        tensors = [*self.sums.values(), *self.head_sums.values()]
        tensors += [t for step in self.step_maps.values() for t in step.values()]
        tensors += [t for step in self.level_steps.values() for t in step.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class RecordedImage:
    """One output image in the store: where its data lives and what prompt made it."""

    index: int  # index in the store (order of generation inside the session)
    run: RunRecord
    slot: int  # index of the image inside its run
    prompt: str | None
    prompt_2: str | None
    prompt_3: str | None = None  # SD3's T5 prompt, when it was given

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.run.latent_hw


# ---- the resolution cap and the memory it takes ---------------------------------------------------------------
def capped_grid(hw: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """(h', w') after average-pooling by the smallest integer factor that brings both sides to ``<= max_side``."""
    h, w = hw
    if max_side is None or max(h, w) <= max_side:
        return h, w
    factor = math.ceil(max(h, w) / max_side)
    return math.ceil(h / factor), math.ceil(w / factor)


def pool_to(maps: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Average-pool ``maps`` (..., K, h, w) to (..., K, hw[0], hw[1]) (identity when the size already fits)."""
    if tuple(maps.shape[-2:]) == tuple(hw):
        return maps
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    return F.adaptive_avg_pool2d(flat, hw).reshape(*lead, *hw)


def per_step_mode(per_step) -> str | None:
    """``per_step=`` as ``"site"``, ``"level"`` or ``None``; a clear error for anything else."""
    if per_step is True or per_step == "site":
        return "site"
    if per_step == "level":
        return "level"
    if per_step is False or per_step is None:
        return None
    raise ValueError(f"per_step must be False, True (= 'site') or 'level'; got {per_step!r}")


def estimate_bytes(
    sites: Iterable[AttentionSite],
    latent_hw: tuple[int, int],
    *,
    steps: int = 50,
    images: int = 1,
    tokens: int = 77,
    per_step: bool | str = False,
    per_head: bool = False,
    dtype: torch.dtype = torch.float16,
    max_side: int | None = 32,
) -> dict[str, int]:
    """Bytes an :class:`AttentionStore` holds for ``images`` images after ``steps`` recorded steps, from shapes.

    ``sites``: the recorded sites (cross sites are kept, self sites ignored). Returns the bytes of the running
    sums (``"sums"``, float32, independent of ``steps``), the per-head sums (``"per_head"``, float32) and the
    per-step maps (``"per_step"``, at ``dtype``), and their ``"total"``.
    """
    sums = heads_bytes = step_bytes = 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_step = per_step_mode(per_step)
    seen_levels = set()
    for site in sites:
        if not site.attends_text:
            continue
        h, w = grid_for(latent_hw, site.level)
        sh, sw = capped_grid((h, w), max_side)
        sums += images * h * w * tokens * 4
        if per_head:
            heads_bytes += images * site.heads * sh * sw * tokens * 4
        if per_step == "site" or (per_step == "level" and site.level not in seen_levels):
            step_bytes += steps * images * sh * sw * tokens * itemsize
        seen_levels.add(site.level)
    return {"sums": sums, "per_head": heads_bytes, "per_step": step_bytes, "total": sums + heads_bytes + step_bytes}


# ---- to the host without waiting, then settled ------------------------------------------------------------------
class HostCopies:
    """Device → host copies that never wait inside a step; :meth:`settle` waits once, outside any step."""

    def __init__(self) -> None:
        self.in_flight = False  # non-blocking device → host copies not waited for yet

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the CPU without waiting: a non-blocking copy into pinned memory from CUDA (valid once
        :meth:`settle` has synchronised); a CPU tensor as it is."""
        if tensor.device.type == "cpu":
            return tensor
        if tensor.device.type != "cuda":
            return tensor.to("cpu")
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        self.in_flight = True
        return host

    def settle(self, runs: Iterable[RunRecord]) -> None:
        """Make every run readable on the host (outside any step): wait for the copies in flight, per-head sums to
        the CPU, timesteps to floats."""
        if self.in_flight:
            torch.cuda.synchronize()
            self.in_flight = False
        for run in runs:
            for key, total in run.head_sums.items():
                if total.device.type != "cpu":
                    run.head_sums[key] = total.to("cpu")
            for step, t in run.timesteps.items():
                if not isinstance(t, float):
                    run.timesteps[step] = timestep_value(t)


# ---- reading one image ------------------------------------------------------------------------------------------
def recording_of(
    image: RecordedImage,
    sites: Mapping[str, AttentionSite],
    *,
    live: bool,
    tokenizer: Any,
    scale_factor: int,
    per_step: str | None,
    per_head: bool,
) -> Recording:
    """``image`` as a :class:`~promptcontrol.recording.Recording` over the store's ``sites`` (in their order) that
    its run recorded: views of the run's tensors, or copies of the growing sums when ``live`` (still recording)."""
    run, slot = image.run, image.slot

    def own(t: torch.Tensor) -> torch.Tensor:
        return t[slot].clone() if live else t[slot]

    keys = [key for key in sites if key in run.sums]
    return Recording(
        sites=tuple(sites[key] for key in keys),
        grids={key: run.grids[key] for key in keys},
        sums={key: own(run.sums[key]) for key in keys},  # (Q, K)
        counts={key: run.counts[key] for key in keys},
        latent_hw=run.latent_hw,
        steps=tuple(run.steps),
        prompt=image.prompt,
        prompt_2=image.prompt_2,
        prompt_3=image.prompt_3,
        tokenizer=tokenizer,
        scale_factor=scale_factor,
        index=image.index,
        total=run.total,
        timesteps=dict(run.timesteps),
        per_step=per_step,
        step_maps={s: {k: t[slot] for k, t in maps.items()} for s, maps in run.step_maps.items()},
        level_steps={s: {lv: t[slot] for lv, t in maps.items()} for s, maps in run.level_steps.items()},
        level_sites=dict(run.level_sites),
        per_head=per_head,
        head_sums={key: own(t) for key, t in run.head_sums.items()},  # (heads, K, h', w')
        head_counts=dict(run.head_counts),
    )
