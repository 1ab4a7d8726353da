"""``AttentionStore``: record cross-attention probabilities per output image, with bounded memory.

What is kept (per pipeline run, for the conditional rows only, one slice per output image):

* default — one running sum per cross-attention site, summed over the recorded steps and over heads, at the
  site's own resolution, float32, on the device attention runs on. Memory does not grow with the number of
  steps: ``images × sum over sites (h·w) × tokens × 4`` bytes.
* ``per_step=True`` (or ``"site"``) — also each recorded step's map per site (mean over heads), moved to the CPU
  at ``dtype`` (float16 by default) and average-pooled so that no side exceeds ``max_side``. Needed for
  ``heatmaps(steps=...)`` after the run and for the per-step strip.
* ``per_step="level"`` — the same, but one map per step and level (the mean of the level's recorded sites),
  so SDXL keeps 2 maps per step instead of 70; sites can then no longer be told apart per step.
* ``per_head=True`` — also a running sum per head per site, on the CPU (float32, since it accumulates), at the
  same resolution cap. Needed for ``heatmaps(heads=...)``.

Nothing inside a denoising step waits for the device: per-step maps leave for the CPU when the step ends, by
non-blocking copies into pinned memory (on CUDA; a plain CPU tensor stays as it is); per-head sums accumulate on
the attention's device while the run records and move to the CPU in bulk when the recording is read (or the
session ends), which is also when the timesteps (kept as the UNet got them) become floats and the copies are waited for.

The probabilities are materialised only at the cross-attention sites and steps selected by ``steps`` and
``sites`` (the one vocabulary of :func:`promptcontrol.schedule.step_filter` / ``site_filter``); every other
attention call stays on fused SDPA (sites that are not selected do not even get a controlled processor).

Reading: ``store.recording(i)`` hands out image ``i`` as a :class:`~promptcontrol.recording.Recording` (plain
tensors and facts); heat maps and the read methods here (``site_map``, ``level_map``, ``steps``, ...) go through it.
The per-run data, the resolution cap, the host copies and the hand-out live in :mod:`.store_runs`.

Images: every pipeline call in the session appends its images, in output order (``image_of_row``), so image
``i`` of the store is the ``i``-th image generated inside the ``with`` block. The prompt of each image is read from
the pipeline call (``run.prompts[prompt_of_row[row]]``); ``None`` when the pipeline got embeddings only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ..context import SessionView, StepContext, batch_mismatch
from ..plan import AttentionPlan, on_device
from ..recording import Recording, fold_place_level, old_step_tuple, to_grid
from ..schedule import PLACES, site_filter, step_filter
from ..sites import AttentionSite, grid_for, grid_from_length
from .base import Controller
from .store_runs import HostCopies, RecordedImage, RunRecord, capped_grid, estimate_bytes, per_step_mode, pool_to
from .store_runs import recording_of

__all__ = [  # the store, and the per-run names that moved to store_runs, still importable from here
    "AttentionStore", "RunRecord", "RecordedImage", "capped_grid", "pool_to", "estimate_bytes",
]


def _named_patterns(spec: Any) -> tuple[str, ...]:
    """The module paths / patterns a ``sites=`` spec names (each must match a cross site; places are not names)."""
    if isinstance(spec, Mapping):
        names = spec.get("names")
        items = () if names is None else (names,) if isinstance(names, str) else tuple(names)
    elif isinstance(spec, str):
        items = (spec,)
    elif isinstance(spec, Sequence):
        items = tuple(spec)
    else:
        return ()
    return tuple(p for p in items if isinstance(p, str) and p not in PLACES)


class AttentionStore(Controller):
    """Records the cross-attention probabilities of the conditional rows, per output image.

    steps:    which steps to record (:func:`promptcontrol.schedule.step_filter`): ``None`` (every step), a list /
              ``range`` of 0-based step indices, a ``(start, end)`` pair of fractions, or ``f(ctx) -> bool``
    sites:    which cross sites to record (:func:`promptcontrol.schedule.site_filter`): ``None`` (all), a place
              (``"up"``), module paths / processor keys / patterns, a dict (``{"places": ["up"], "levels": [0]}``)
              or ``f(site) -> bool``
    places, levels: the old spelling of ``sites={"places": ..., "levels": ...}`` (``DeprecationWarning``); a tuple
              of ints as ``steps`` still means those exact steps, for one release (``DeprecationWarning``)
    per_step: also keep each step's map per site (``True``/``"site"``) or per level (``"level"``) on the CPU at
              ``dtype`` with sides capped at ``max_side``
    per_head: also keep a running sum per head per site (CPU, float32, sides capped at ``max_side``)
    dtype:    storage dtype of the per-step maps (default float16)
    max_side: resolution cap of per-step / per-head maps (``None``: full resolution)
    device:   where the default running sums live (``None``: the device attention runs on)
    joint_norm: at joint-attention sites (SD3), which normalisation the image × text maps use: ``"joint"`` (the
              default: the mass each pixel gives a word inside the one softmax over image and text keys) or
              ``"text"`` (renormalised over the text keys, like a UNet's cross-attention); see docs/transformers.md
    """

    def __init__(
        self,
        *,
        steps: Any = None,
        sites: Any = None,
        places: Iterable[str] | None = None,
        levels: Iterable[int] | None = None,
        per_step: bool | str = False,
        per_head: bool = False,
        dtype: torch.dtype = torch.float16,
        max_side: int | None = 32,
        device: str | torch.device | None = None,
        joint_norm: str = "joint",
    ):
        if joint_norm not in ("joint", "text"):
            raise ValueError(
                f"joint_norm must be 'joint' (mass inside the joint softmax) or 'text' (renormalised over the text "
                f"keys); got {joint_norm!r}"
            )
        self.joint_norm = joint_norm  # read by the joint-attention processor (SD3)
        self._names = _named_patterns(sites)  # checked against the denoiser's cross sites at bind
        self.site_spec = fold_place_level(sites, places, levels, "AttentionStore", stacklevel=2)
        self.step_spec = old_step_tuple(steps, stacklevel=2)
        self._want_step = step_filter(self.step_spec)
        self._at_site = site_filter(self.site_spec)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.float16); got {dtype!r}")
        if max_side is not None and (not isinstance(max_side, int) or max_side < 1):
            raise ValueError(f"max_side must be a positive int or None (full resolution); got {max_side!r}")
        self.per_step = per_step_mode(per_step)  # None, "site" or "level"
        self.per_head = bool(per_head)
        self.dtype = dtype
        self.max_side = max_side
        self.device = None if device is None else torch.device(device)
        self.runs: list[RunRecord] = []
        self.images: list[RecordedImage] = []
        self.sites: dict[str, AttentionSite] = {}  # every selected cross site, by key (set at bind)
        self.tokenizer = None
        self.scale_factor = 8  # pixels per latent cell; the pipeline's vae_scale_factor when there is one
        self._run_id = 0
        self._run_key: object = None
        self._current: RunRecord | None = None
        self._recording = False
        self._rows: tuple[int, ...] = ()
        self._row_index: dict[torch.device, torch.Tensor] = {}
        self._cond_rows: slice | None = None  # the conditional rows as a slice, when they are contiguous
        self._ones_cache: dict[tuple, torch.Tensor] = {}
        # site key -> (probs shape, flat running sum (N, Q·K), select (N, B·heads), booking facts, probs' 2-D shape)
        # for the current run: a site's accumulation in one kernel (see _accumulate)
        self._fast: dict[str, tuple] = {}
        self._level_acc: dict[int, list] = {}  # level → [sum (N, Q, K) of head means, sites, grid] this step
        self._pending: list[tuple[str, str, torch.Tensor]] = []  # ("step" | "head", key, map) to move to the CPU
        self._host = HostCopies()  # per-step maps leave for the CPU without waiting; settled when read
        self._seen: dict[str, tuple[int, int, int, int]] = {}  # key → (heads, Q, K, level) recorded this step
        self._grids: dict[str, tuple[int, int]] = {}  # key → its level's grid at the current latent size
        self._grids_for: tuple[int, int] | None = None

    # ---- selection ---------------------------------------------------------------------------------------
    def _selected(self, site: AttentionSite) -> bool:
        return site.attends_text and bool(self._at_site(site))

    def applies_to(self, site: AttentionSite) -> bool:
        return self._selected(site)

    def bind(self, session: SessionView) -> None:
        cross = [s for s in session.sites if s.attends_text]
        if self._names:
            unknown = sorted(p for p in set(self._names) if not any(site_filter(p)(s) for s in cross))
            if unknown:
                raise ValueError(
                    f"AttentionStore(sites=...) names no cross-attention site: {', '.join(unknown)}; "
                    f"cross sites are e.g. {', '.join(s.module_path for s in cross[:3])} (see pc.find_sites(pipe.unet))"
                )
        self.sites.update({s.key: s for s in cross if self._selected(s)})
        if not any(self._selected(s) for s in cross):
            raise ValueError(
                f"AttentionStore selects no cross-attention site (sites={self.site_spec!r}); "
                f"this UNet's cross sites are at levels {sorted({s.level for s in cross})}"
            )
        if session.tokenizer is not None:
            self.tokenizer = session.tokenizer
        pipe = session.pipe
        factor = getattr(pipe, "vae_scale_factor", None) if pipe is not None else None
        if isinstance(factor, int) and factor > 0:
            self.scale_factor = factor

    def unbind(self) -> None:
        self._host.settle(self.runs)
        self._level_acc.clear()
        self._pending.clear()
        self._seen.clear()
        self._current = None
        self._recording = False
        self._row_index = {}
        self._ones_cache = {}
        self._fast.clear()

    # ---- step bookkeeping --------------------------------------------------------------------------------
    def begin_step(self, ctx: StepContext) -> None:
        key = (ctx.run_id, ctx.latent_hw, ctx.layout)
        if key != self._run_key:  # run_id changes exactly when a pipeline run (or reset_steps) starts
            self._run_id += 1
            self._current = None  # a new pipeline run: its images are appended when it first records
            self._fast.clear()  # its sums are new tensors
        self._run_key = key
        layout = ctx.layout
        # conditional rows ordered by output image
        self._rows = tuple(r for _, r in sorted((layout.image_of_row[r], r) for r in layout.cond_rows))
        self._row_index = {}
        contiguous = bool(self._rows) and self._rows == tuple(range(self._rows[0], self._rows[-1] + 1))
        self._cond_rows = slice(self._rows[0], self._rows[-1] + 1) if contiguous else None
        self._pending.clear()  # nothing left over from a step that raised (cleared, not replaced: a compiled
        self._level_acc.clear()  # UNet's graph keeps writing into the same containers)
        self._seen.clear()
        self._recording = bool(self._rows) and bool(self._want_step(ctx))
        if self._recording:
            if self._current is None:  # a new run's images are appended at its first recorded step
                self._current = self._new_run(ctx)
            if self._grids_for != ctx.latent_hw:
                self._grids = {key: grid_for(ctx.latent_hw, site.level) for key, site in self.sites.items()}
                self._grids_for = ctx.latent_hw

    def end_step(self, ctx: StepContext) -> None:
        self._recording = False
        run = self._current
        if self._seen and run is not None:  # the step's bookkeeping, out of the attention calls (and any graph)
            self._book(run, ctx)
        if self._pending and run is not None:
            for kind, key, tensor in self._pending:
                if kind == "step":
                    run.step_maps.setdefault(ctx.index, {})[key] = self._host.to_host(tensor)
                elif key in run.head_sums:  # summed on the attention's device: no copy per step
                    total = run.head_sums[key]
                    if total.device != tensor.device:  # the recording was read mid-run: back to the device
                        total = run.head_sums[key] = total.to(tensor.device)
                    total += tensor
                    run.head_counts[key] += 1
                else:
                    run.head_sums[key] = tensor
                    run.head_counts[key] = 1
        self._pending.clear()
        if self._level_acc and run is not None:
            maps = run.level_steps.setdefault(ctx.index, {})
            for level, (total, count, grid) in self._level_acc.items():
                mean = pool_to(to_grid(total / count, grid), capped_grid(grid, self.max_side))
                maps[level] = self._host.to_host(mean.to(self.dtype))  # (N, K, h', w')
                run.level_sites[level] = count
        self._level_acc.clear()

    def _book(self, run: RunRecord, ctx: StepContext) -> None:
        """Counts, grids, tokens and the timestep of the sites recorded at this step."""
        for key, (heads, q, k, level) in self._seen.items():
            run.counts[key] = run.counts.get(key, 0) + heads
            if key not in run.grids:
                grid = self._site_grid(key, level, ctx.latent_hw, q)
                run.grids[key] = grid
                run.small_grids[key] = capped_grid(grid, self.max_side)
            if run.num_tokens is None:
                run.num_tokens = k
        run.timesteps[ctx.index] = ctx.raw_timestep  # a float when the recording is read: no sync here
        self._seen.clear()

    def _site_grid(self, key: str, level: int, latent_hw: tuple[int, int], q: int) -> tuple[int, int]:
        """The (h, w) of a site's ``q`` queries: its level's grid, or the grid a ``q``-long sequence gives."""
        grid = self._grids.get(key) or grid_for(latent_hw, level)
        return grid if grid[0] * grid[1] == q else grid_from_length(latent_hw, q)

    def wants_probs(self, site: AttentionSite, ctx: StepContext) -> bool:
        return self._recording

    def _new_run(self, ctx: StepContext) -> RunRecord:
        run = ctx.run
        prompts, prompts_2, prompts_3 = [], [], []
        for row in self._rows:
            p = ctx.layout.prompt_of_row[row]
            prompts.append(run.prompts[p] if run is not None and run.prompts is not None and p < len(run.prompts) else None)
            second = run.prompts_2 if run is not None else None
            prompts_2.append(second[p] if second is not None and p < len(second) else None)
            third = run.prompts_3 if run is not None else None
            prompts_3.append(third[p] if third is not None and p < len(third) else None)
        record = RunRecord(self._run_id, ctx.latent_hw, prompts, prompts_2, total=ctx.total)
        self.runs.append(record)
        for slot in range(record.num_images):
            self.images.append(
                RecordedImage(len(self.images), record, slot, prompts[slot], prompts_2[slot], prompts_3[slot])
            )
        return record

    def _cond(self, probs: torch.Tensor) -> torch.Tensor:
        """The conditional rows of ``probs`` (B, ...), ordered by image."""
        if self._cond_rows is not None:  # contiguous (every diffusers layout): a view, no copy
            return probs[self._cond_rows]
        index = self._row_index.get(probs.device)
        if index is None:
            index = self._row_index[probs.device] = torch.tensor(self._rows, device=probs.device)
        return probs.index_select(0, index)

    def record(self, site: AttentionSite, ctx: StepContext, probs: torch.Tensor, plan: AttentionPlan) -> None:
        """Add ``probs`` (B, heads, Q, K) of the conditional rows to this run's record.

        Per call only tensor work and writes into containers that live for the session (the run, its sums, the
        step's pending maps); counts, grids and the timestep are booked at ``end_step``. No branch depends on the
        step, so a compiled UNet keeps one graph for every recorded step after the first. From a site's second
        recorded call in a run on (default store), one kernel: see :meth:`_accumulate`."""
        fast = None if torch.compiler.is_compiling() else self._fast.get(site.key)
        if fast is not None and probs.shape == fast[0]:
            self._seen[site.key] = fast[3]
            fast[1].addmm_(fast[2], probs.reshape(fast[4]))  # (N, Q·K) += (N, B·heads) @ (B·heads, Q·K)
            return
        self._record(site, ctx, probs)

    def _accumulate(self, site: AttentionSite, probs: torch.Tensor) -> None:
        """Set up the site's one-kernel accumulation for the rest of the run (outside torch.compile, default store):
        ``sum (N, Q·K) += select (N, B·heads) @ probs (B·heads, Q·K)``, where ``select`` picks each image's
        conditional row and sums its heads (exact zeros elsewhere) — no row slicing, no per-call shapes."""
        total = self._current.sums.get(site.key) if self._current is not None else None
        if torch.compiler.is_compiling() or total is None or not total.is_contiguous() or total.dtype != probs.dtype:
            return
        b, heads, q, k = probs.shape
        n = len(self._rows)
        select = torch.zeros(n, b * heads, dtype=probs.dtype)  # host-built, once per site and run
        for image, row in enumerate(self._rows):
            select[image, row * heads : (row + 1) * heads] = 1.0
        select = on_device(select, probs.device)
        self._fast[site.key] = (probs.shape, total.view(n, q * k), select, self._seen[site.key], (b * heads, q * k))

    def _record(self, site: AttentionSite, ctx: StepContext, probs: torch.Tensor) -> None:
        """:meth:`record` without the per-site accumulation set up (first call at a site, per-step / per-head maps,
        a store ``device``, torch.compile)."""
        if probs.shape[0] != ctx.layout.size:
            raise ValueError(batch_mismatch(ctx, int(probs.shape[0])))
        run = self._current
        if run is None:  # called without begin_step having opened the run (a direct call)
            run = self._current = self._new_run(ctx)
        cond = self._cond(probs)  # (N, heads, Q, K)
        heads, q, k = cond.shape[1:]
        self._seen[site.key] = (heads, q, k, site.level)
        total = run.sums.get(site.key)
        keep_maps = self.per_head or self.per_step is not None
        if total is not None and not keep_maps and self.device is None:
            # the sum over heads and the running sum in one kernel: (N, 1, Q·K) += (N, 1, heads) @ (N, heads, Q·K)
            n = cond.shape[0]
            total.view(n, 1, q * k).baddbmm_(self._ones(n, heads, cond), cond.reshape(n, heads, q * k))
            self._accumulate(site, probs)
            return
        summed = cond.sum(dim=1)  # (N, Q, K)
        target = summed if self.device is None else summed.to(self.device)
        if total is None:
            run.sums[site.key] = target
            if not keep_maps and self.device is None:
                self._accumulate(site, probs)
        else:
            total += target
        if keep_maps:
            self._keep_maps(site, ctx, cond, summed, heads, q)

    def _ones(self, n: int, heads: int, like: torch.Tensor) -> torch.Tensor:
        """A (n, 1, heads) tensor of ones like ``like`` (kept per shape, device and dtype outside torch.compile)."""
        if torch.compiler.is_compiling():
            return like.new_ones(n, 1, heads)
        key = (n, heads, like.device, like.dtype)
        ones = self._ones_cache.get(key)
        if ones is None:
            ones = self._ones_cache[key] = like.new_ones(n, 1, heads)
        return ones

    def _keep_maps(self, site, ctx, cond, summed, heads: int, q: int) -> None:
        """Per-head and per-step maps of this call (moved to the CPU at ``end_step``, without waiting)."""
        grid = self._site_grid(site.key, site.level, ctx.latent_hw, q)
        small = capped_grid(grid, self.max_side)
        if self.per_head:
            per_head = pool_to(to_grid(cond, grid), small)  # (N, heads, K, h', w')
            self._pending.append(("head", site.key, per_head.to(torch.float32, copy=True)))
        if self.per_step == "site":
            mean = pool_to(to_grid(summed / heads, grid), small)  # (N, K, h', w')
            self._pending.append(("step", site.key, mean.to(self.dtype)))
        elif self.per_step == "level":
            acc = self._level_acc.get(site.level)
            if acc is None:
                self._level_acc[site.level] = [summed / heads, 1, grid]
            else:
                acc[0] = acc[0] + summed / heads
                acc[1] += 1

    # ---- reading -----------------------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return len(self.images)

    def image(self, index: int) -> RecordedImage:
        """The recorded image ``index`` (negative counts from the end); clear errors when there is none."""
        if not self.images:
            raise RuntimeError(
                "nothing was recorded yet: run the pipeline inside `with pc.trace(pipe) as tr:` (or "
                "`pc.control(pipe, store)`) before asking for maps; check that steps=/sites= select something"
            )
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"image_index must be an int, got {type(index).__name__}")
        if not -len(self.images) <= index < len(self.images):
            raise IndexError(
                f"image_index {index} is out of range: the store holds {len(self.images)} image(s) "
                f"(0..{len(self.images) - 1}, in the order they were generated)"
            )
        return self.images[index]

    def recording(self, index: int = 0) -> Recording:
        """Image ``index`` as a :class:`~promptcontrol.recording.Recording`: its prompt, sites, grids, steps, sums
        and per-step / per-head maps (views of the store's tensors; copies while its run is still recording)."""
        image = self.image(index)
        self._host.settle(self.runs)
        live = image.run is self._current  # its sums still grow in place: hand out a copy
        return recording_of(
            image,
            self.sites,
            live=live,
            tokenizer=self.tokenizer,
            scale_factor=self.scale_factor,
            per_step=self.per_step,
            per_head=self.per_head,
        )

    def recorded_sites(self, index: int = 0) -> list[AttentionSite]:
        """The sites with data for image ``index``, in the denoiser's order."""
        return list(self.recording(index).sites)

    def steps(self, index: int = 0) -> list[int]:
        """The step indices recorded for image ``index``."""
        return list(self.recording(index).steps)

    def site_map(self, index: int, site: AttentionSite | str, *, steps: Any = None, heads: Any = None) -> torch.Tensor:
        """Mean attention map (K, h, w) float32 of image ``index`` at ``site``: :meth:`Recording.site_map`."""
        return self.recording(index).site_map(site, steps=steps, heads=heads)

    def level_map(self, index: int, level: int, steps: Any) -> torch.Tensor:
        """Mean map (K, h', w') at ``level`` over ``steps`` (``per_step="level"``): :meth:`Recording.level_map`."""
        return self.recording(index).level_map(level, steps)

    def heatmaps(self, image_index: int = 0, **options):
        """Per-word :class:`~promptcontrol.heatmap.HeatMaps` of recorded image ``image_index`` (as ``tr.heatmaps``)."""
        from ..heatmap import build_heatmaps  # a convenience; heat maps read the recording alone

        return build_heatmaps(self.recording(image_index), **options)

    def memory_bytes(self) -> int:
        """Bytes held by the recorded tensors (running sums, per-head sums, per-step maps)."""
        self._host.settle(self.runs)
        return sum(run.nbytes() for run in self.runs)

    def reset(self) -> None:
        """Forget every recording (the store can be used again)."""
        self.runs, self.images = [], []
        self._current = None
        self._run_key = None
        self._fast.clear()
