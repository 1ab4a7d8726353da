"""Concept maps (ConceptAttention, issue 18 item 3) against the toy world's masks, beside raw attention maps.

Every caption of ``samples`` is generated once (caption i from generator seed ``seed + i``, as
:func:`~.evaluate.generate`) under ``pc.trace(pipe, concepts=CONCEPTS)``: the store records the raw joint
attention and the concept tokens (every world shape word and ``"background"``, one list for all captions, so
absent shapes compete in the concept softmax too) ride through the blocks. Per image, from the same trace:

* **raw noun map**: ``raw_rule.heatmaps(tr, k)`` (default :data:`~.evaluate.MAP_RULE`, the rule of
  ``evaluate``'s map rows: sites :data:`~.evaluate._best_sites`, ``"level"`` weighting), the noun's word map
  by occurrence, min-max normalised per word (heatmaps' default ``normalize="word"``), region = map ≥ τ
  (:data:`~.evaluate.HEAT_THRESHOLD`), exactly as :func:`~.evaluate.score_maps`;
* **concept noun map**: ``tr.concept_maps(k, sites=concept_sites, normalize="word")`` — the softmax-over-concepts
  map min-max normalised per concept (the same normalisation as the raw map), region = map ≥ τ;
* **concept argmax**: each pixel labelled by the concept of highest (unnormalised, softmax) concept map
  (``ConceptMaps.segmentation()``); a concept's region is its pixels;
* **background**: the ``"background"`` concept (absent from every caption) against the **background mask** —
  the pixels in no segment :func:`~.segment.segment` found in the generated image (any colour).

Objects are scored against their segment in the generated image; a missing segment counts as IoU 0 (as
``score_maps``). **Repeated nouns** ("a red square and a blue square"): a concept map is per concept word, so it
covers both objects; such captions are left out of the unique-noun rows (the paired comparison) and scored in
their own rows against the **union** of the objects' segments (0 when one is missing): concept region and
argmax region as above, raw region the union of each occurrence's region (map ≥ τ).

On the embedded toy models the text encoders learnt only the world's words: ``"background"`` is a token no
training caption held, so its concept token carries no trained meaning there.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import world
from .evaluate import HEAT_THRESHOLD, MAP_RULE, Generation, MapRule, _occurrence, generate
from .results import PairedMargin, paired_margin
from .segment import Segment, iou

BACKGROUND = "background"
CONCEPTS: tuple[str, ...] = (*world.SHAPES, BACKGROUND)
"""The concepts traced for every caption: the world's shape words (its nouns) and one absent from every prompt."""


# --------------------------------------------------------------------------- scoring on arrays

def background_mask(segments: dict[str, Segment], shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the pixels in no segment (every colour's, named in the caption or not)."""
    mask = np.ones(shape, bool)
    for seg in segments.values():
        if seg.mask.shape != tuple(shape):
            raise ValueError(f"segment {seg.colour!r} has shape {seg.mask.shape}, the image {tuple(shape)}")
        mask &= ~seg.mask
    return mask


def noun_groups(sample: world.Sample) -> dict[str, list[int]]:
    """``{noun: [object indices]}`` in caption order; a repeated noun has two objects."""
    words = sample.caption.words
    groups: dict[str, list[int]] = {}
    for i, ow in enumerate(sample.caption.objects):
        groups.setdefault(words[ow.noun], []).append(i)
    return groups


def union_mask(segs: Sequence[Segment | None]) -> np.ndarray | None:
    """The union of the segments' masks, or None when any is missing (the group then scores 0)."""
    if not segs or any(s is None for s in segs):
        return None
    return np.logical_or.reduce([s.mask for s in segs])


def region_iou(region: np.ndarray, truth: np.ndarray | None) -> float:
    """IoU of a predicted region with a truth mask; 0 when the truth is missing (an object not drawn)."""
    return 0.0 if truth is None else iou(region, truth)


@dataclass(frozen=True)
class ImageMaps:
    """One image's maps, as arrays at image size (H, W):

    raw:      ``raw[i]``: object i's noun map (its occurrence in the caption), word-normalised to [0, 1]
    concept:  ``{concept: map}`` word-normalised to [0, 1]
    labels:   (H, W) int, each pixel's arg-max concept (an index into ``concepts``)
    concepts: the concept names in the order of ``labels``
    """

    raw: tuple[np.ndarray, ...]
    concept: dict[str, np.ndarray]
    labels: np.ndarray
    concepts: tuple[str, ...]

    def argmax_region(self, concept: str) -> np.ndarray:
        return self.labels == self.concepts.index(concept)


@dataclass(frozen=True)
class ImageScores:
    """One image's IoUs: per unique-noun object (raw, concept, argmax), per repeated noun (the same, against the
    union of its objects), and the background concept (map, argmax)."""

    unique: tuple[tuple[float, float, float], ...]
    repeated: tuple[tuple[float, float, float], ...]
    background: tuple[float, float]


def score_image(sample: world.Sample, segments: dict[str, Segment], maps: ImageMaps,
                threshold: float = HEAT_THRESHOLD) -> ImageScores:
    """The IoUs of one image's raw / concept / argmax regions with its segments (see the module docstring)."""
    segs = [segments.get(o.colour) for o in sample.scene.objects]
    unique, repeated = [], []
    for noun, objects in noun_groups(sample).items():
        if noun not in maps.concept:
            raise ValueError(f"noun {noun!r} of {sample.caption.text!r} is not a traced concept {maps.concepts}")
        truth = union_mask([segs[i] for i in objects])
        raw_region = np.logical_or.reduce([maps.raw[i] >= threshold for i in objects])
        scores = (region_iou(raw_region, truth), region_iou(maps.concept[noun] >= threshold, truth),
                  region_iou(maps.argmax_region(noun), truth))
        (unique if len(objects) == 1 else repeated).append(scores)
    shape = maps.labels.shape
    ground = background_mask(segments, shape)
    background = (iou(maps.concept[BACKGROUND] >= threshold, ground), iou(maps.argmax_region(BACKGROUND), ground))
    return ImageScores(tuple(unique), tuple(repeated), background)


# --------------------------------------------------------------------------- the result

def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


@dataclass(frozen=True)
class ConceptTruth:
    """Per-item IoUs of raw vs concept maps (see the module docstring); means and the paired margin as
    properties. ``unique_*``: one per object of captions without a repeated noun; ``repeated_*``: one per
    repeated noun (against its objects' union); ``background_*``: one per image."""

    unique_raw: tuple[float, ...]
    unique_concept: tuple[float, ...]
    unique_argmax: tuple[float, ...]
    repeated_raw: tuple[float, ...]
    repeated_concept: tuple[float, ...]
    repeated_argmax: tuple[float, ...]
    background_concept: tuple[float, ...]
    background_argmax: tuple[float, ...]
    n_images: int
    repeated_captions: int  # captions left out of the unique-noun rows
    concepts: tuple[str, ...]
    raw_sites: str
    concept_sites: str

    @property
    def margin(self) -> PairedMargin:
        """Concept − raw noun IoU, paired per unique-noun object."""
        return paired_margin(self.unique_concept, self.unique_raw)

    def rows(self) -> list[tuple[str, float, str, str]]:
        """:func:`concept_rows` (what ``TruthReport.rows`` lists for the ``concepts`` part)."""
        return concept_rows(self)


def collect(scores: Sequence[ImageScores], *, concepts: Sequence[str], raw_sites: str,
            concept_sites: str) -> ConceptTruth:
    """A :class:`ConceptTruth` from each image's :class:`ImageScores`."""
    def column(part: str, j: int) -> tuple[float, ...]:
        return tuple(row[j] for s in scores for row in getattr(s, part))

    return ConceptTruth(
        *(column("unique", j) for j in range(3)), *(column("repeated", j) for j in range(3)),
        tuple(s.background[0] for s in scores), tuple(s.background[1] for s in scores),
        n_images=len(scores), repeated_captions=sum(bool(s.repeated) for s in scores),
        concepts=tuple(concepts), raw_sites=raw_sites, concept_sites=concept_sites,
    )


def concept_rows(ct: ConceptTruth) -> list[tuple[str, float, str, str]]:
    """Table rows (metric, value, target, counted over) of a :class:`ConceptTruth`."""
    n, r, m = len(ct.unique_raw), len(ct.repeated_raw), ct.margin
    kept = ct.n_images - ct.repeated_captions
    over = f"{n} objects, {kept} captions ({ct.repeated_captions} with a repeated noun out)"
    sites = f"raw sites {ct.raw_sites}; concept sites {ct.concept_sites}"
    groups = f"{r} repeated nouns vs their objects' union"
    images = f"{ct.n_images} images; concepts {', '.join(ct.concepts)}"
    return [
        ("noun mIoU, raw attention", _mean(ct.unique_raw), "reported", f"{over}; {sites}"),
        ("noun mIoU, concept map", _mean(ct.unique_concept), "reported", over),
        ("noun mIoU, concept - raw (paired)", m.mean, "concept > raw",
         f"concept wins {m.won}/{m.n}, sd {m.sd:.3f}"),
        ("noun mIoU, concept argmax", _mean(ct.unique_argmax), "reported", over),
        ("repeated noun IoU, raw attention (union)", _mean(ct.repeated_raw), "reported", groups),
        ("repeated noun IoU, concept map", _mean(ct.repeated_concept), "reported", groups),
        ("repeated noun IoU, concept argmax", _mean(ct.repeated_argmax), "reported", groups),
        ("background mIoU, concept map (not in prompt)", _mean(ct.background_concept), "reported", images),
        ("background mIoU, concept argmax", _mean(ct.background_argmax), "reported", images),
    ]


# --------------------------------------------------------------------------- from a pipeline

def check_joint(pipe) -> None:
    """Raise ``ValueError`` (the concept controller's reason) for a pipeline whose denoiser cannot carry
    concept tokens, before anything is generated or installed."""
    from ..controllers.concept import refusal
    from ..sites import find_sites

    model = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if model is None:
        raise ValueError(f"concept_truth needs a diffusers pipeline with a transformer; got {type(pipe).__name__}")
    why = refusal(find_sites(model), type(model).__name__)
    if why:
        raise ValueError(f"concept_truth: {why}")


@torch.no_grad()
def concept_generations(pipe, samples: list[world.Sample], *, seed: int, steps: int = 20,
                        guidance_scale: float = 7.5, concepts: Sequence[str] = CONCEPTS):
    """``(generations, trace)``: the captions generated under ``pc.trace(pipe, concepts=concepts)`` (raw maps and
    concept maps of every joint site, readable afterwards)."""
    from ..tracing import trace

    check_joint(pipe)
    with trace(pipe, concepts=list(concepts)) as tr:
        gens = generate(pipe, samples, seed=seed, steps=steps, guidance_scale=guidance_scale)
    return gens, tr


def image_maps(g: Generation, tr, k: int, *, raw_rule: MapRule = MAP_RULE, concept_sites=None) -> ImageMaps:
    """The :class:`ImageMaps` of generation ``k`` of a :func:`concept_generations` trace."""
    words = g.sample.caption.words
    hm = raw_rule.heatmaps(tr, k)
    raw = tuple(hm.word(words[ow.noun], occurrence=_occurrence(words, ow.noun)).numpy()
                for ow in g.sample.caption.objects)  # (H, W) each
    cm = tr.concept_maps(k, sites=concept_sites)
    normalised = cm.to_tensor(normalize="word").numpy()  # (C, H, W)
    concept = {c: normalised[j] for j, c in enumerate(cm.concepts)}
    return ImageMaps(raw, concept, cm.segmentation().numpy(), tuple(cm.concepts))


def score_trace(gens: list[Generation], tr, *, threshold: float = HEAT_THRESHOLD, raw_rule: MapRule = MAP_RULE,
                concept_sites=None) -> ConceptTruth:
    """Score every generation's maps read from ``tr`` (``concept_sites``: a subset of the recorded joint sites,
    any ``sites=`` spec; ``None``: all recorded)."""
    scores = [score_image(g.sample, g.segments, image_maps(g, tr, k, raw_rule=raw_rule,
                                                           concept_sites=concept_sites), threshold)
              for k, g in enumerate(gens)]
    return collect(scores, concepts=tr.concepts.concepts, raw_sites=str(raw_rule),
                   concept_sites="every recorded joint site" if concept_sites is None else str(concept_sites))


def concept_truth(pipe, samples: list[world.Sample], *, seed: int, steps: int = 20, guidance_scale: float = 7.5,
                  threshold: float = HEAT_THRESHOLD, concepts: Sequence[str] = CONCEPTS,
                  raw_rule: MapRule = MAP_RULE, concept_sites=None) -> ConceptTruth:
    """Generate the samples' captions (caption i from seed ``seed + i``) under concept tracing and score raw vs
    concept maps against the world's masks (see the module docstring). ``ValueError`` for a pipeline without
    joint attention."""
    missing = sorted({s.caption.words[o.noun] for s in samples for o in s.caption.objects} - set(concepts))
    if missing or BACKGROUND not in concepts:
        raise ValueError(f"concepts {list(concepts)} must hold every caption noun and {BACKGROUND!r}; "
                         f"missing: {missing or [BACKGROUND]}")
    gens, tr = concept_generations(pipe, samples, seed=seed, steps=steps, guidance_scale=guidance_scale,
                                   concepts=concepts)
    return score_trace(gens, tr, threshold=threshold, raw_rule=raw_rule, concept_sites=concept_sites)
