"""Measure what a model draws against what its caption says (needs only the model).

Pipeline of the measurement:

1. ``eval_samples(n, seed)``: ``n`` captions from the world grammar (seeded, fixed across models);
2. ``generate(pipe, samples)``: one image per caption, seed ``seed + i`` for caption ``i``;
3. ``segment(image)`` (:mod:`promptcontrol.toy.segment`): each pixel → nearest palette colour; per colour,
   its largest blob is that colour's object if it is big enough and shaped like a shape;
4. ``caption_accuracy(generations)``: for every object the caption names —
   colour: a blob of its colour exists; shape: that blob's shape (``classify_shape``: best IoU against the
   circle / square / triangle prototypes fitted to the blob's bounding box) is the named one; position (only
   objects with a named position): the blob's centroid lies on that side of the image centre along the
   dominant axis. A missing blob counts as wrong for all three.

The heat-map measurements (noun/adjective mIoU, own-object preference, edit layout IoU, weight
monotonicity) reuse ``Generation`` (the image and its segments per caption object) and ``iou``; they add
fields to ``TruthReport`` (:mod:`promptcontrol.toy.report`), which prints every measured row in ``table()`` with issue 16's targets. The map
maps are read by a :class:`MapRule` (sites by place and level, level weighting; default :data:`MAP_RULE`);
``by_level`` adds the maps of each recorded (place, level) alone. The local-blend part (``blend``, its mask rule
a :class:`~.blend_truth.BlendRule`, default :data:`BLEND_RULE`) is in :mod:`promptcontrol.toy.blend_truth`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from . import world
from .blend_truth import BlendRule, blend_truth
from .report import TruthReport  # noqa: F401 (callers import it from here)
from .results import CaptionAccuracy, EditTruth, HeatmapTruth, LevelMaps, WeightTruth
from .results import PairedMargin, paired_margin  # noqa: F401 (callers import them from here)
from .segment import PALETTE_NAMES, Segment, iou, palette_labels, segment
from .segment import classify_shape, prototype  # noqa: F401 (callers import them from here)


# --------------------------------------------------------------------------- positions

def side_of(cx: float, cy: float, size: int) -> str:
    """Which named region a centroid is in: the side of the centre along the dominant axis."""
    dx, dy = cx - size / 2, cy - size / 2
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


# --------------------------------------------------------------------------- generation


@dataclass
class Generation:
    """One evaluated caption: the world sample it came from, the seed, the image, its segments."""

    sample: world.Sample
    seed: int
    image: np.ndarray  # (H, W, 3) uint8
    segments: dict[str, Segment]

    def segment_of(self, obj_index: int) -> Segment | None:
        """The segment of the caption's object ``obj_index`` (by its colour), or None if not drawn."""
        return self.segments.get(self.sample.scene.objects[obj_index].colour)


def eval_samples(n: int = 48, seed: int = 1234) -> list[world.Sample]:
    """The fixed evaluation captions (a seed disjoint from training's scene RNG streams)."""
    return world.dataset(n, seed)


@torch.no_grad()
def generate(pipe, samples: list[world.Sample], *, seed: int = 0, steps: int = 20, guidance_scale: float = 7.5,
             batch: int = 16) -> list[Generation]:
    """Images for the samples' captions (caption i with generator seed ``seed + i``), segmented."""
    gens: list[Generation] = []
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        seeds = [seed + start + i for i in range(len(chunk))]
        out = pipe([s.caption.text for s in chunk], num_inference_steps=steps, guidance_scale=guidance_scale,
                   generator=[torch.Generator(device="cpu").manual_seed(s) for s in seeds], output_type="np")
        images = (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)  # (B, H, W, 3)
        gens += [Generation(s, sd, im, segment(im)) for s, sd, im in zip(chunk, seeds, images)]
    return gens


# --------------------------------------------------------------------------- caption accuracy


def caption_accuracy(gens: list[Generation]) -> CaptionAccuracy:
    if not gens:
        raise ValueError("no generations to score")
    col = shp = pos = n_obj = n_pos = all_ok = extra = 0
    for g in gens:
        ok = True
        named = {o.colour for o in g.sample.scene.objects}
        extra += any(c not in named for c in g.segments)
        for i, o in enumerate(g.sample.scene.objects):
            seg = g.segment_of(i)
            n_obj += 1
            c = seg is not None
            s = c and seg.shape == o.shape
            col += c
            shp += s
            ok &= s
            if g.sample.caption.objects[i].position is not None:
                n_pos += 1
                p = c and side_of(seg.cx, seg.cy, g.image.shape[0]) == o.position
                pos += p
                ok &= p
        all_ok += ok
    return CaptionAccuracy(col / n_obj, shp / n_obj, pos / n_pos if n_pos else float("nan"),
                           all_ok / len(gens), extra / len(gens), len(gens), n_obj, n_pos)


# --------------------------------------------------------------------------- heat maps, edits, weights

HEAT_THRESHOLD = 0.4
"""A word's region: its min-max normalised map ≥ τ (as DAAM)."""


@dataclass(frozen=True)
class PlaceLevels:
    """A ``sites=`` rule by place and level: ``site -> bool``, true for sites whose ``(site.place, site.level)``
    is one of ``pairs``. Prints as ``down@0+up@1``."""

    pairs: tuple[tuple[str, int], ...]

    def __call__(self, site) -> bool:
        return (site.place, site.level) in self.pairs

    def __str__(self) -> str:
        return "+".join(f"{place}@{level}" for place, level in self.pairs)

    @classmethod
    def parse(cls, texts: list[str]) -> "PlaceLevels":
        """From ``["down:0", "up:1"]`` (place ``down`` / ``mid`` / ``up``, level an int >= 0)."""
        pairs = []
        for text in texts:
            place, _, level = text.partition(":")
            if place not in ("down", "mid", "up", "transformer") or not level.isdigit():
                raise ValueError(f"site {text!r} is not PLACE:LEVEL (place down, mid, up or transformer; level 0, "
                                 "1, ...), e.g. down:0 up:1")
            pairs.append((place, int(level)))
        return cls(tuple(pairs))


_best_sites = PlaceLevels((("down", 0), ("up", 1), ("transformer", 0)))
"""Issue 6's map sites: on a UNet, down blocks at level 0 (full latent grid) and up blocks at level 1 — on the v2
embedded model ``down_blocks.0`` + ``up_blocks.0``, the sites measured best there; on a transformer (one token
grid, level 0) every block that sees the text. ``--maps-by-level`` measures every (place, level)."""


@dataclass(frozen=True)
class MapRule:
    """How the map rows read a trace: ``tr.heatmaps(k, sites=sites, weighting=weighting)``.

    ``sites=None`` is ``heatmaps``' default (every recorded site but the mid block's); ``weighting`` one of
    ``heatmaps``' level weightings (``"level"``, ``"resolution"``, ``"layer"``). A rule by place, level and
    resolution, never by block index, so the same rule reads every model."""

    sites: object = None
    weighting: str = "level"

    def heatmaps(self, tr, k: int):
        return tr.heatmaps(k, sites=self.sites, weighting=self.weighting)

    def __str__(self) -> str:
        return f"{'every site but mid' if self.sites is None else self.sites}, {self.weighting} weighting"


MAP_RULE = MapRule(None, "resolution")
"""The map rule of ``evaluate``: every recorded site but the mid block's (``heatmaps``' default sites), levels
weighted ∝ their h·w. Chosen on tuning sets no reported number uses (``scripts/choose_rules.sh``: map captions
``eval_samples(16, 5151)``) against issue 6's ``_best_sites`` and the other weightings; docs/embedded-model.md,
"Map rule", has the table. On a transformer (one token grid) it is every joint block."""


def _occurrence(words: list[str], index: int) -> int:
    """1-based occurrence of ``words[index]`` among the equal words of the caption."""
    return words[:index + 1].count(words[index])


@torch.no_grad()
def traced_generations(pipe, samples: list[world.Sample], *, seed: int = 0, steps: int = 20,
                       guidance_scale: float = 7.5):
    """``(generations, trace)``: the samples' images generated under ``pc.trace`` (its recordings stay readable)."""
    from ..tracing import trace

    with trace(pipe) as tr:
        gens = generate(pipe, samples, seed=seed, steps=steps, guidance_scale=guidance_scale)
    return gens, tr


def score_maps(gens: list[Generation], maps: list, threshold: float = HEAT_THRESHOLD) -> HeatmapTruth:
    """Each object's noun / adjective map (``maps[k]``: the HeatMaps of generation k) against the object drawn
    (its segment; a missing segment counts as IoU 0 and a failed preference)."""
    nouns, adjs, own = [], [], []
    for g, hm in zip(gens, maps):
        words = g.sample.caption.words
        objs = g.sample.caption.objects
        segs = [g.segment_of(i) for i in range(len(objs))]
        for i, ow in enumerate(objs):
            for idx, out in ((ow.noun, nouns), (ow.adjective, adjs)):
                m = hm.word(words[idx], occurrence=_occurrence(words, idx)).numpy()  # (H, W) in [0, 1]
                out.append(0.0 if segs[i] is None else iou(m >= threshold, segs[i].mask))
                if len(objs) == 2:
                    other = segs[1 - i]
                    own.append(segs[i] is not None and other is not None
                               and bool(m[segs[i].mask].mean() > m[other.mask].mean()))
    return HeatmapTruth(float(np.mean(nouns)), float(np.mean(adjs)), float(np.mean(own)) if own else float("nan"),
                        len(nouns), len(own))


def heatmap_truth(pipe, samples: list[world.Sample], *, seed: int = 0, steps: int = 20,
                  guidance_scale: float = 7.5, threshold: float = HEAT_THRESHOLD,
                  rule: MapRule = MAP_RULE) -> HeatmapTruth:
    """Generate each caption under ``pc.trace`` and score its maps, read with ``rule`` (default
    :data:`MAP_RULE`), with :func:`score_maps`."""
    gens, tr = traced_generations(pipe, samples, seed=seed, steps=steps, guidance_scale=guidance_scale)
    return score_maps(gens, [rule.heatmaps(tr, k) for k in range(len(gens))], threshold)


def recorded_place_levels(tr) -> list[tuple[tuple[str, int], int]]:
    """``[((place, level), number of sites)]`` of the cross-attention sites a trace recorded: down, mid, up,
    each from level 0 (the full latent grid) up."""
    counts: dict[tuple[str, int], int] = {}
    for site in tr.store.recording(0).sites:
        if site.kind == "cross":
            counts[(site.place, site.level)] = counts.get((site.place, site.level), 0) + 1
    order = {"down": 0, "mid": 1, "up": 2}
    return sorted(counts.items(), key=lambda item: (order.get(item[0][0], 3), item[0][1]))


def maps_by_level(gens: list[Generation], tr, threshold: float = HEAT_THRESHOLD) -> list[LevelMaps]:
    """:func:`score_maps` with the maps of each recorded (place, level) alone (the mid block included)."""
    out = []
    for (place, level), n in recorded_place_levels(tr):
        rule = PlaceLevels(((place, level),))
        maps = [tr.heatmaps(k, sites=rule) for k in range(len(gens))]
        out.append(LevelMaps(place, level, n, score_maps(gens, maps, threshold)))
    return out


def swap_prompts(samples: list[world.Sample]) -> list[tuple[str, str, str, str]]:
    """(source caption, edited caption, source colour, new colour): object 0's colour → a colour not in it."""
    out = []
    for s in samples:
        words = s.caption.words
        ow = s.caption.objects[0]
        used = {o.colour for o in s.scene.objects}
        new = next(c for c in world.COLOURS if c not in used)
        edited = list(words)
        edited[ow.adjective] = new
        out.append((s.caption.text, " ".join(edited), s.scene.objects[0].colour, new))
    return out


@torch.no_grad()
def edit_truth(pipe, samples: list[world.Sample], *, seed: int = 0, steps: int = 20, cross_steps: float = 0.8,
               self_steps: float = 0.4) -> EditTruth:
    """For each swap: ``pc.edit`` with the given steps vs the plain prompt change (both 0) from the same seed."""
    from ..editing import edit

    scores = {k: [] for k in ("controlled", "plain", "rc", "rp", "lc", "lp")}
    for j, (src, dst, c0, c1) in enumerate(swap_prompts(samples)):
        for name, cs, ss in (("controlled", cross_steps, self_steps), ("plain", 0.0, 0.0)):
            res = edit(pipe, src, dst, cross_steps=cs, self_steps=ss, seed=seed + j, num_inference_steps=steps,
                       output_type="np")
            ims = [(np.clip(np.asarray(im), 0, 1) * 255).round().astype(np.uint8) for im in res.images]
            a, b = segment(ims[0]).get(c0), segment(ims[1]).get(c1)
            scores[name].append(0.0 if a is None or b is None else iou(a.mask, b.mask))
            scores["r" + name[0]].append(b is not None)
            scores["l" + name[0]].append(iou(palette_labels(ims[0]) > 0, palette_labels(ims[1]) > 0))
    m = {k: float(np.mean(v)) for k, v in scores.items()}
    return EditTruth(m["controlled"], m["plain"], m["rc"], m["rp"], m["lc"], m["lp"], len(scores["plain"]),
                     tuple(zip(scores["controlled"], scores["plain"])), tuple(zip(scores["lc"], scores["lp"])))


MONO_TOL = 0.02
MONO_RISE = 0.05


def colour_share(image: np.ndarray, colour: str) -> float:
    """Share of the non-background pixels whose nearest palette colour is ``colour`` (0 when none)."""
    labels = palette_labels(image)
    fg = labels > 0
    return float((labels[fg] == PALETTE_NAMES.index(colour)).mean()) if fg.any() else 0.0


def weight_prompts(samples: list[world.Sample]) -> list[tuple[str, str]]:
    """(caption template with object 0's colour word as ``(colour:{w})``, that colour) per sample. Whole
    captions, not "a (red:w) circle": alone, an object is already ~98 % its colour at weight 1 (nothing to raise)."""
    out = []
    for s in samples:
        words = list(s.caption.words)
        colour = s.scene.objects[0].colour
        words[s.caption.objects[0].adjective] = f"({colour}:{{w}})"
        out.append((" ".join(words), colour))
    return out


@torch.no_grad()
def weight_truth(pipe, samples: list[world.Sample], *, seed: int = 0, steps: int = 20,
                 weights: tuple[float, ...] = (0.5, 1.0, 2.0), guidance_scale: float = 7.5,
                 mode: str = "attention") -> WeightTruth:
    from ..generation import generate as pc_generate

    rows = []
    for j, (template, colour) in enumerate(weight_prompts(samples)):
        row = []
        for w in weights:
            im = pc_generate(pipe, template.format(w=w), seed=seed + j, mode=mode, num_inference_steps=steps,
                             guidance_scale=guidance_scale, output_type="np")[0]
            row.append(colour_share((np.clip(im, 0, 1) * 255).round().astype(np.uint8), colour))
        rows.append(row)
    arr = np.array(rows)
    # rising: no step down by more than MONO_TOL (pixel noise) and the last weight ≥ the first + MONO_RISE
    mono = [bool(np.all(np.diff(r) >= -MONO_TOL) and r[-1] >= r[0] + MONO_RISE) for r in arr]
    return WeightTruth(tuple(weights), tuple(float(x) for x in arr.mean(0)), float(np.mean(mono)), len(rows), mode)


# --------------------------------------------------------------------------- prompt sets and parts


@dataclass(frozen=True)
class PromptSets:
    """The seeded prompt sets of each measurement: the same for every model, so numbers compare."""

    captions: int = 48  # caption accuracy
    maps: int = 16  # heat maps (same seed as the captions: the first ``maps`` of them)
    swaps: int = 8  # colour swaps with pc.edit
    weights: int = 8  # colour weights 0.5 / 1 / 2
    blends: int = 8  # local-blend swaps of generated scenes
    inversions: int = 4  # local-blend swaps of inverted rendered scenes
    seed: int = 1234
    swap_seed: int = 99
    weight_seed: int = 77
    blend_seed: int = 2024  # fresh: used by no other part (world.dataset(blends, 2024, n_objects=2))
    invert_seed: int = 2025  # fresh: world.dataset(inversions, 2025, n_objects=2)

    def shifted(self, offset: int) -> "PromptSets":
        """The same sets with every seed + ``offset`` (fresh prompts and seeds for a report)."""
        return replace(self, seed=self.seed + offset, swap_seed=self.swap_seed + offset,
                       weight_seed=self.weight_seed + offset, blend_seed=self.blend_seed + offset,
                       invert_seed=self.invert_seed + offset)


BLEND_RULE = BlendRule(0.6, (0, 1))
"""The local-blend mask rule of ``evaluate``: threshold 0.6 of the map's maximum on the maps of levels 0 and 1 (on
the embedded UNet model every down / up cross-attention level; on a transformer its one level). Chosen on tuning
scenes no reported number uses (``scripts/choose_rules.sh``: ``world.dataset(4, 3030)`` generated, ``(2, 3031)``
inverted) among thresholds 0.3–0.6 × levels {coarsest (``pc.LocalBlend``'s default, prompt-to-prompt's), 0 + 1,
0}; docs/embedded-model.md, "Blend rule", has the table. ``pc.LocalBlend``'s own defaults stay
prompt-to-prompt's."""

WEIGHT_MODES = ("attention", "embedding")
"""pc.generate's default (the P2P equalizer) and A1111's embedding scaling: both measured, as they differ here."""
QUICK = PromptSets(captions=16, maps=8, swaps=4, weights=4, blends=4, inversions=2)
PARTS = ("captions", "maps", "edits", "weights", "blend")


def check_parts(parts: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the first unknown measurement and listing ``PARTS``."""
    if not parts:
        raise ValueError(f"no measurement chosen: choose from {', '.join(PARTS)}")
    for part in parts:
        if part not in PARTS:
            raise ValueError(f"unknown measurement {part!r}: choose from {', '.join(PARTS)}")


def evaluate(pipe, *, sets: PromptSets = PromptSets(), parts: tuple[str, ...] = PARTS, steps: int = 20,
             guidance_scale: float = 7.5, progress=None, map_rule: MapRule = MAP_RULE,
             blend_rule: BlendRule = BLEND_RULE, by_level: bool = False) -> TruthReport:
    """Measure ``pipe`` on the world's ground truth; ``parts`` picks the measurements (see ``PARTS``).

    ``map_rule``: how the map rows read the trace (default :data:`MAP_RULE`); ``blend_rule``: the local-blend
    mask of the blend part (default :data:`BLEND_RULE`); ``by_level``: also score the maps of each recorded
    (place, level) alone, from the same images (needs the ``maps`` part).
    ``progress(part)`` is called before each part (e.g. to print it). The edit, weight and blend parts use
    guidance 7.5 through ``pc.edit`` / ``pc.generate`` defaults and the given steps.
    """
    check_parts(parts)
    if by_level and "maps" not in parts:
        raise ValueError("the by-level breakdown scores the maps part: add 'maps' to the parts")
    pipe.set_progress_bar_config(disable=True)
    report = TruthReport(settings=report_settings(sets, steps, guidance_scale, map_rule, blend_rule))
    for part in PARTS:
        if part not in parts:
            continue
        if progress is not None:
            progress(part)
        _measure(report, part, pipe, sets, steps, guidance_scale, map_rule, blend_rule, by_level)
    return report


def report_settings(sets: PromptSets, steps: int, guidance_scale: float, map_rule: MapRule,
                    blend_rule: BlendRule) -> dict:
    """The settings line of a report: steps, guidance, both rules and every prompt set's size and seed."""
    return {"steps": steps, "guidance_scale": guidance_scale, "map_rule": str(map_rule),
            "blend_rule": str(blend_rule), **asdict(sets)}


def _measure(report: TruthReport, part: str, pipe, sets: PromptSets, steps: int, guidance_scale: float,
             map_rule: MapRule, blend_rule: BlendRule, by_level: bool) -> None:
    """Run one part of :func:`evaluate` and store its result in ``report``."""
    if part == "captions":
        gens = generate(pipe, eval_samples(sets.captions, sets.seed), seed=sets.seed, steps=steps,
                        guidance_scale=guidance_scale)
        report.caption = caption_accuracy(gens)
    elif part == "maps":
        gens, tr = traced_generations(pipe, eval_samples(sets.maps, sets.seed), seed=sets.seed, steps=steps,
                                      guidance_scale=guidance_scale)
        report.heatmaps = score_maps(gens, [map_rule.heatmaps(tr, k) for k in range(len(gens))])
        if by_level:
            report.maps_by_level = maps_by_level(gens, tr)
    elif part == "edits":
        report.edits = edit_truth(pipe, eval_samples(sets.swaps, sets.swap_seed), seed=sets.swap_seed, steps=steps)
    elif part == "weights":
        report.weights = [weight_truth(pipe, eval_samples(sets.weights, sets.weight_seed), seed=sets.weight_seed,
                                       steps=steps, guidance_scale=guidance_scale, mode=mode)
                          for mode in WEIGHT_MODES]
    else:
        report.blend = blend_truth(pipe, n_generated=sets.blends, n_inverted=sets.inversions,
                                   blend_seed=sets.blend_seed, invert_seed=sets.invert_seed, steps=steps,
                                   rule=blend_rule)


if __name__ == "__main__":
    # ``python -m promptcontrol.toy.evaluate [options]`` is ``promptcontrol evaluate [options]``. The command line
    # is looked up by name, only when this file runs as a script: as a module the measurement never imports the
    # command line (the arrow points cli -> toy.evaluate).
    import sys
    from importlib import import_module

    sys.exit(import_module("promptcontrol.cli").main(["evaluate", *sys.argv[1:]]))
