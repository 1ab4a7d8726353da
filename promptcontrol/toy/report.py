"""The truth report: every measured number of :mod:`promptcontrol.toy.evaluate` as rows with issue 16's targets.

``TruthReport`` holds what each part measured (its fields are filled by ``evaluate``); ``rows()`` lists
(metric, value, target, counted over) and ``table()`` prints them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .blend_truth import BlendTruth, blend_rows
from .results import CaptionAccuracy, EditTruth, HeatmapTruth, LevelMaps, WeightTruth

@dataclass
class TruthReport:
    """Every measured number; each part fills its field, ``rows()`` lists them with issue 16's targets."""

    caption: CaptionAccuracy | None = None
    settings: dict = field(default_factory=dict)
    heatmaps: HeatmapTruth | None = None
    edits: EditTruth | None = None
    weights: list[WeightTruth] | None = None  # one per mode of WEIGHT_MODES
    blend: BlendTruth | None = None
    maps_by_level: list[LevelMaps] | None = None  # with --maps-by-level: the maps of each (place, level) alone
    concepts: Any = None  # the ``concepts`` part (toy.concept_truth.ConceptTruth): anything with ``rows()``

    def rows(self) -> list[tuple[str, float, str, str]]:
        """(metric, value, target, counted over) for every measured number; targets are issue 16's."""
        out = []
        if self.caption is not None:
            out += _caption_rows(self.caption)
        if self.heatmaps is not None:
            out += _map_rows(self.heatmaps)
        for lm in self.maps_by_level or []:
            out += [(f"noun map mIoU, {lm.place}@{lm.level} alone", lm.truth.noun_miou, "-",
                     f"{lm.truth.n_objects} objects, {lm.sites} sites"),
                    (f"adjective map mIoU, {lm.place}@{lm.level} alone", lm.truth.adjective_miou, "-",
                     f"{lm.truth.n_objects} objects, {lm.sites} sites")]
        if self.edits is not None:
            out += _edit_rows(self.edits)
        for w in self.weights or []:
            out += [(f"colour share, {w.mode} w {k:g}", v, "rising", f"{w.n_prompts} prompts")
                    for k, v in zip(w.weights, w.shares)]
            out.append((f"rising monotonically, {w.mode}", w.monotonic, ">= 7/8", f"{w.n_prompts} prompts"))
        if self.blend is not None:
            out += blend_rows(self.blend)
        if self.concepts is not None:
            out += self.concepts.rows()
        return out

    def table(self) -> str:
        rows = self.rows()
        mw = max([30] + [len(m) for m, *_ in rows])
        tw = max([9] + [len(t) for _, _, t, _ in rows])
        lines = [f"{'metric':<{mw}} {'value':>7}  {'target':<{tw}} over"]
        lines += [f"{m:<{mw}} {v:>7.3f}  {t:<{tw}} {n}" for m, v, t, n in rows]
        if self.settings:
            lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()))
        return "\n".join(lines)


def _caption_rows(c: CaptionAccuracy) -> list[tuple[str, float, str, str]]:
    return [("colour accuracy", c.colour, ">= 0.97", f"{c.n_objects} objects"),
            ("shape accuracy", c.shape, ">= 0.97", f"{c.n_objects} objects"),
            ("position accuracy", c.position, ">= 0.97", f"{c.n_positions} named positions"),
            ("whole caption right", c.all_correct, "-", f"{c.n_images} images"),
            ("images with an extra colour", c.extra, "-", f"{c.n_images} images")]


def _map_rows(h: HeatmapTruth) -> list[tuple[str, float, str, str]]:
    return [("noun map mIoU", h.noun_miou, ">= 0.60", f"{h.n_objects} objects"),
            ("adjective map mIoU", h.adjective_miou, ">= 0.50", f"{h.n_objects} objects"),
            ("map prefers own object", h.own_object, ">= 0.95", f"{h.n_words_two_objects} words")]


def _edit_rows(e: EditTruth) -> list[tuple[str, float, str, str]]:
    n = f"{e.n_swaps} swaps"
    lm, om = e.layout_margin, e.object_margin
    return [("colour-swap layout IoU, pc.edit 0.8/0.4", e.layout_controlled, ">= 0.85", n),
            ("colour-swap layout IoU, plain change", e.layout_plain, "< pc.edit", n),
            ("layout IoU margin over plain (mean)", lm.mean, "> 0", f"paired, {lm.won} of {lm.n} swaps won"),
            ("layout IoU margin over plain (sd)", lm.sd, "stated", f"{lm.n} per-swap differences"),
            ("swap IoU, pc.edit 0.8/0.4", e.controlled, ">= 0.80", n),
            ("swap IoU, plain prompt change", e.plain, "< pc.edit", n),
            ("swap IoU margin over plain (mean)", om.mean, "-", f"paired, {om.won} of {om.n} won, sd {om.sd:.3f}"),
            ("swap recoloured, pc.edit", e.recoloured_controlled, "-", n),
            ("swap recoloured, plain change", e.recoloured_plain, "-", n)]
