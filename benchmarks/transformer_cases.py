"""The transformer benchmarks' cases (for ``benchmarks/transformers.py``): one architecture built and ready to time
(``Bench``), every mode as a case against stock on the same rows, the block clock (time inside each block kind), and
the numbers made of the times: per-group ratios, per-kind block ratios, the full-depth estimate, CPU peaks, and the
check that no session left anything installed."""

from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import promptcontrol as pc

from .cases import EDIT, PROMPT, SOURCE, Entry, cpu_peak_bytes
from .harness import CLOCKS, Case, Result
from .transformer_models import Architecture, BlockKind, check_layers, check_size


# ---- the bench and its cases ----------------------------------------------------------------------------------
class BlockClock:
    """Time spent inside the blocks of each kind, per forward, by forward (pre-)hooks on the blocks; ``take()``
    returns the last forward's ``{kind: seconds}`` and starts again. CPU only (no device sync)."""

    def __init__(self, model: torch.nn.Module, kinds: tuple[BlockKind, ...], clock: str):
        self.now = CLOCKS[clock]
        self.blocks = {kind.name: list(getattr(model, kind.attribute)) for kind in kinds}
        self.totals = dict.fromkeys(self.blocks, 0.0)
        self.handles: list = []
        self._start = 0.0

    def _enter(self, *_):
        self._start = self.now()

    def _leave(self, kind: str):
        def leave(*_):
            self.totals[kind] += self.now() - self._start

        return leave

    @contextlib.contextmanager
    def installed(self):
        try:
            for kind, blocks in self.blocks.items():
                for block in blocks:
                    self.handles.append(block.register_forward_pre_hook(self._enter))
                    self.handles.append(block.register_forward_hook(self._leave(kind)))
            yield self
        finally:
            for handle in self.handles:
                handle.remove()
            self.handles.clear()

    def take(self) -> dict[str, float]:
        totals, self.totals = self.totals, dict.fromkeys(self.blocks, 0.0)
        return totals


@dataclass
class Bench:
    """One architecture at one size and depth, ready to time."""

    arch: Architecture
    model: torch.nn.Module
    pipe: Any
    size: int
    layers: tuple[int, ...]  # blocks built, one count per kind (arch.kinds)
    device: str
    text_tokens: int
    inputs: dict[int, dict] = field(default_factory=dict)  # batch -> forward kwargs
    clock: BlockClock | None = None  # set while block times are taken
    block_times: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # case -> one dict per forward

    def forward(self, batch: int, name: str) -> Callable[[], object]:
        """Case ``name``'s timed call: one forward on ``batch`` rows (and its block times, while a clock runs)."""
        if batch not in self.inputs:
            self.inputs[batch] = self.arch.inputs(self.model, self.size, batch, self.text_tokens)
        inputs = self.inputs[batch]

        def run():
            out = self.model(**inputs)
            if self.clock is not None:
                self.block_times.setdefault(name, []).append(self.clock.take())
            return out

        return run

    def session(self, prompts: list[str], make: Callable[[], Any]) -> Callable[[], contextlib.AbstractContextManager]:
        """A context factory: a fresh session from ``make()`` (``pc.control`` / ``pc.trace``), told its call."""

        @contextlib.contextmanager
        def context():
            with make() as session:
                self.arch.announce(self.pipe, prompts, self.arch.steps)
                yield session

        return context


def make_bench(arch: Architecture, size: int, layers: tuple[int, ...], device: str, dtype: torch.dtype,
               tiny: bool) -> Bench:
    """``arch`` (its published config, or the tiny one) with ``layers`` blocks of each kind, random weights, in its
    pipeline."""
    check_size(arch, size, tiny)
    check_layers(arch, layers)
    config = {**(arch.tiny_config if tiny else arch.config),
              **{kind.config_key: n for kind, n in zip(arch.kinds, layers)}}
    model = arch.build(config, dtype, device)
    text_tokens = arch.tiny_text_tokens if tiny else arch.text_tokens
    return Bench(arch, model, arch.pipeline(model, text_tokens), size, tuple(layers), device, text_tokens)


def transformer_cases(bench: Bench) -> list[Entry]:
    """Every mode in two groups, stock first in each: 1 prompt (+ CFG rows), and source + edit (+ CFG rows)."""
    from promptcontrol.controllers.inject import InjectSelf

    pipe, rows = bench.pipe, 2 if bench.arch.cfg else 1

    def control(prompts, *make):  # fresh controllers for every timing, built outside the timed region
        return bench.session(prompts, lambda: pc.control(pipe, *(m() for m in make)))

    def case(name, batch, context=contextlib.nullcontext):
        return Case(name, bench.forward(batch, name), context)

    cfg = " + CFG" if bench.arch.cfg else ""
    g1, g2 = f"1 prompt{cfg} (batch {rows})", f"source + edit{cfg} (batch {2 * rows})"
    s1, s2 = f"stock {bench.arch.stock_processor}", f"stock {bench.arch.stock_processor}, 2 prompts"
    return [
        Entry(case(s1, rows), s1, None, g1),
        Entry(case("pass-through (pc.control + PassThrough, all sites)", rows, control([PROMPT], pc.PassThrough)),
              s1, "pass-through", g1),
        Entry(case("record: pc.trace default store", rows, bench.session([PROMPT], lambda: pc.trace(pipe))),
              s1, "record", g1),
        Entry(case("reweight: Reweight({'red': 2.0})", rows, control([PROMPT], lambda: pc.Reweight({"red": 2.0}))),
              s1, "reweight", g1),
        Entry(case(s2, 2 * rows), s2, None, g2),
        Entry(case("edit: Replace + self injection (every site)", 2 * rows,
                   control([SOURCE, EDIT], lambda: pc.Replace(1.0), lambda: InjectSelf(1.0))), s2, "edit", g2),
    ]


# ---- measuring ------------------------------------------------------------------------------------------------
def spread(ratios: list[float]) -> dict:
    return dict(ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))


def per_group_ratios(results: list[Result], entries: list[Entry]) -> list[dict]:
    """Each result against its group's stock case: median / min / max of per-round ratios, and best of N."""
    by_name = {r.name: r for r in results}
    rows = []
    for entry, r in zip(entries, results):
        base = by_name[entry.baseline]
        rows.append(dict(
            name=r.name, group=entry.group, baseline=entry.baseline,
            best_s=min(r.times_s), median_s=statistics.median(r.times_s),
            best_ratio=min(r.times_s) / min(base.times_s),
            **spread([t / b for t, b in zip(r.times_s, base.times_s)]),
            peak_mb=r.peak_mb, peak_ratio=(r.peak_mb / base.peak_mb) if r.peak_mb and base.peak_mb else None,
            times_s=r.times_s,
        ))
    return rows


def full_depth_time(total: float, blocks: dict[str, float], measured: dict[str, int], full: dict[str, int]) -> float:
    """One forward recomposed at the full depth: the time outside the blocks once, plus each kind's per-block time
    × its full count (a kind must have been measured)."""
    outside = total - sum(blocks.values())
    return outside + sum(blocks[kind] / measured[kind] * full[kind] for kind in blocks)


def add_block_ratios(bench: Bench, rows: list[dict], repeats: int) -> None:
    """Per-kind block ratios (time inside the blocks of a kind against stock's, per round) and the full-depth
    estimate per round, from the last ``repeats`` forwards of each case (the timed rounds, after the warm-up)."""
    measured = {kind.name: n for kind, n in zip(bench.arch.kinds, bench.layers)}
    full = dict(zip(measured, bench.arch.full_layers()))
    timed = {name: times[-repeats:] for name, times in bench.block_times.items()}
    totals = {row["name"]: row["times_s"] for row in rows}
    for row in rows:
        mine, base = timed[row["name"]], timed[row["baseline"]]
        row["block_s"] = mine
        row["blocks"] = {kind: spread([m[kind] / b[kind] for m, b in zip(mine, base)])
                         for kind, n in measured.items() if n}
        if all(measured.values()):
            rounds = zip(totals[row["name"]], totals[row["baseline"]], mine, base)
            row["full_depth"] = spread([full_depth_time(t, m, measured, full) / full_depth_time(tb, b, measured, full)
                                        for t, tb, m, b in rounds])


def cpu_peaks(bench: Bench, entries: list[Entry], rows: list[dict]) -> None:
    """CPU: peak live tensor bytes of one more, untimed run per case (weights and inputs excluded)."""
    peaks = {e.case.name: cpu_peak_bytes(e.case, bench.model, list(bench.inputs.values())) for e in entries}
    for entry, row in zip(entries, rows):
        row["peak_mb"] = peaks[entry.case.name] / 2**20
        row["peak_ratio"] = peaks[entry.case.name] / peaks[entry.baseline] if peaks[entry.baseline] else None


def check_installed_nothing(bench: Bench, before: dict) -> None:
    """Every mode's session restored the stock processors and left no hooks (else the ratios would lie)."""
    after = {k: type(v).__name__ for k, v in bench.model.attn_processors.items()}
    hooked = [m for m in bench.model.modules() if m._forward_pre_hooks or m._forward_hooks]
    if after != before or hooked:
        raise RuntimeError(f"a benchmark session left something installed on the {bench.arch.name} transformer")
