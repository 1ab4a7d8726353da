"""The measured results of :mod:`promptcontrol.toy.evaluate`, as plain data (each part's numbers and counts).

Here so that the report (:mod:`promptcontrol.toy.report`) and the measurement both use them without importing
each other.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CaptionAccuracy:
    """Shares of the captions' objects drawn right; counts say how many claims each share is over."""

    colour: float
    shape: float
    position: float
    all_correct: float  # share of images where every claim of the caption holds
    extra: float  # share of images showing a colour blob the caption does not name
    n_images: int
    n_objects: int
    n_positions: int


@dataclass
class HeatmapTruth:
    """Heat-map truth: mIoU of noun / adjective regions with the drawn object; own-object preference."""

    noun_miou: float
    adjective_miou: float
    own_object: float  # share of words of two-object captions whose map is higher on their own object
    n_objects: int
    n_words_two_objects: int


@dataclass
class LevelMaps:
    """The map scores of one (place, level) of the recorded cross-attention sites alone."""

    place: str
    level: int
    sites: int  # how many recorded sites that (place, level) holds
    truth: HeatmapTruth


@dataclass(frozen=True)
class PairedMargin:
    """Paired differences a − b over n items: their mean, sample standard deviation (n − 1; nan for n < 2) and
    how many items a wins (a > b)."""

    mean: float
    sd: float
    won: int
    n: int


def paired_margin(a, b) -> PairedMargin:
    """:class:`PairedMargin` of per-item scores ``a`` over ``b`` (same length, paired by position)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_margin needs two equal-length 1-d score lists, got shapes {a.shape} and {b.shape}")
    if a.size == 0:
        return PairedMargin(float("nan"), float("nan"), 0, 0)
    d = a - b
    sd = float(np.std(d, ddof=1)) if d.size > 1 else float("nan")
    return PairedMargin(float(d.mean()), sd, int((d > 0).sum()), int(d.size))


@dataclass
class EditTruth:
    """Colour swap: IoU of the swapped object's segment with the source's, with and without pc.edit's control."""

    controlled: float  # mean IoU (0 where either segment is missing)
    plain: float
    recoloured_controlled: float  # share of swaps whose edited image shows the new colour's object
    recoloured_plain: float
    layout_controlled: float  # IoU of the whole foreground (non-background pixels), source vs edit
    layout_plain: float
    n_swaps: int
    object_pairs: tuple[tuple[float, float], ...] = ()  # per swap: (controlled, plain) swapped-object IoU
    layout_pairs: tuple[tuple[float, float], ...] = ()  # per swap: (controlled, plain) layout IoU

    @property
    def layout_margin(self) -> PairedMargin:
        """pc.edit's layout IoU minus the plain prompt change's, paired per swap."""
        return paired_margin([c for c, _ in self.layout_pairs], [p for _, p in self.layout_pairs])

    @property
    def object_margin(self) -> PairedMargin:
        """pc.edit's swapped-object IoU minus the plain prompt change's, paired per swap."""
        return paired_margin([c for c, _ in self.object_pairs], [p for _, p in self.object_pairs])


@dataclass
class WeightTruth:
    """Colour weighting: share of the object's pixels in the weighted colour, per weight (mean over prompts)."""

    weights: tuple[float, ...]
    shares: tuple[float, ...]  # mean share at each weight
    monotonic: float  # share of prompts whose shares rise (non-decreasing, last > first)
    n_prompts: int
    mode: str = "attention"  # pc.generate's reweighting mode

    @property
    def rise(self) -> float:
        """Mean share at the highest weight minus at the lowest."""
        return self.shares[-1] - self.shares[0]
