"""Interleaved timing of several cases against a baseline in one process: medians, ratios and their spread.

Each case is a context factory (entered outside the timed region: installing processors is not a step's
cost) and a function timed inside it. Cases run round-robin after warm-up, so drift of the machine (thermal,
other load) hits every case alike; the ratio of each case to the baseline is taken per round and summarised by
its median and min–max.
"""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, ContextManager

import torch


@dataclass
class Case:
    name: str
    run: Callable[[], object]  # one denoising step (or whatever is timed)
    context: Callable[[], ContextManager] = contextlib.nullcontext  # e.g. lambda: pc.control(unet, ...)
    note: str = ""


@dataclass
class Result:
    name: str
    median_s: float
    ratio: float  # median of per-round ratios to the baseline
    ratio_min: float
    ratio_max: float
    peak_mb: float | None  # peak device memory (CUDA only), else None
    peak_ratio: float | None
    note: str = ""
    times_s: list[float] = field(default_factory=list)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
"""``wall``: elapsed time; ``cpu``: this process's CPU time over all its threads — steadier on a shared machine,
where other jobs steal wall time from every case unevenly (CPU runs only; GPU work is not CPU time)."""


def _timed(case: Case, device: str, clock: str = "wall") -> tuple[float, float | None]:
    now = CLOCKS[clock]
    with case.context():
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        start = now()
        with torch.inference_mode():
            case.run()
        _sync(device)
        elapsed = now() - start
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return elapsed, peak


def compare(
    cases: list[Case],
    *,
    repeats: int = 5,
    warmup: int = 1,
    device: str = "cpu",
    progress: bool = True,
    clock: str = "wall",
) -> list[Result]:
    """Time every case ``repeats`` times, round-robin, after ``warmup`` untimed rounds; ``cases[0]`` is the baseline.

    ``clock``: ``"wall"`` or ``"cpu"`` (see :data:`CLOCKS`)."""
    from tqdm.auto import tqdm

    if clock not in CLOCKS or (clock == "cpu" and device != "cpu"):
        raise ValueError(f"clock must be 'wall', or 'cpu' on the CPU; got {clock!r} on {device}")
    for _ in range(warmup):
        for case in cases:
            _timed(case, device, clock)
    times = {c.name: [] for c in cases}
    peaks = {c.name: [] for c in cases}
    for _ in tqdm(range(repeats), desc="rounds", disable=not progress):
        for case in cases:
            t, p = _timed(case, device, clock)
            times[case.name].append(t)
            if p is not None:
                peaks[case.name].append(p)
    base = cases[0].name
    results = []
    for case in cases:
        ratios = [t / b for t, b in zip(times[case.name], times[base])]
        peak = max(peaks[case.name]) if peaks[case.name] else None
        base_peak = max(peaks[base]) if peaks[base] else None
        results.append(
            Result(
                name=case.name,
                median_s=statistics.median(times[case.name]),
                ratio=statistics.median(ratios),
                ratio_min=min(ratios),
                ratio_max=max(ratios),
                peak_mb=peak,
                peak_ratio=None if peak is None or not base_peak else peak / base_peak,
                note=case.note,
                times_s=times[case.name],
            )
        )
    return results


def machine() -> str:
    """A one-line description of where the numbers were measured."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"


MET, MISSED, WITHIN_NOISE = "yes", "**no**", "within noise"
VERDICT_RULE = (
    "met: yes when every round's ratio is within the target, **no** when no round is, within noise when the "
    "min–max straddles the target (the rounds cannot tell, whatever the median says)."
)


def verdict(ratio_min: float, ratio_max: float, target: float) -> str:
    """Whether the rounds resolve a target: met when every round's ratio is within it, missed when none is,
    else within noise (the spread straddles the target, whatever the median says)."""
    if ratio_max <= target:
        return MET
    if ratio_min > target:
        return MISSED
    return WITHIN_NOISE


def markdown_table(
    title: str, results: list[Result], targets: dict[str, float] | None = None, unit: str = "step"
) -> str:
    """Results as a Markdown table; a case with a target shows :func:`verdict` on it. ``unit``: what one timing
    covers."""
    targets = targets or {}
    lines = [
        f"**{title}**",
        "",
        f"| case | median time / {unit} | ratio to stock (min–max) | peak memory | target | met |",
        "| --- | ---: | ---: | ---: | ---: | :---: |",
    ]
    for r in results:
        peak = "—" if r.peak_mb is None else f"{r.peak_mb:,.0f} MB ({r.peak_ratio:.2f}×)"
        target = targets.get(r.name)
        met = "" if target is None else verdict(r.ratio_min, r.ratio_max, target)
        lines.append(
            f"| {r.name} | {r.median_s * 1000:,.1f} ms | {r.ratio:.3f} ({r.ratio_min:.3f}–{r.ratio_max:.3f}) | {peak} | "
            f"{'' if target is None else f'≤{target:.2f}'} | {met} |"
        )
    return "\n".join(lines)


def save(path: str, title: str, results: list[Result], extra: dict | None = None) -> None:
    """Write the results as JSON (with the machine) next to a Markdown table of the same name."""
    from pathlib import Path

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"title": title, "machine": machine(), "results": [asdict(r) for r in results], **(extra or {})}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(out.with_suffix(".json"))
