"""Colour-blob segmentation of the toy world's pictures: which object of which shape each palette colour drew.

``segment(image)``: each pixel → nearest palette colour (background included); per colour, the largest
4-connected component is that colour's object if it has at least ``MIN_AREA`` pixels and fits some shape
prototype with IoU ≥ ``MIN_FIT`` (so colour noise is not an object; captions never repeat a colour).
``classify_shape(mask)``: best IoU against the circle / square / triangle prototypes fitted to the blob's
bounding box. The measurements over these segments are in :mod:`promptcontrol.toy.evaluate`.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from . import world

MIN_AREA = 10
"""Smallest component (pixels, at 32×32) counted as an object; world objects have ≥ 50."""
MIN_FIT = 0.6
"""Smallest IoU of a blob with its best-fitting shape prototype for it to count as an object: drawn shapes,
even soft ones, fit ≥ 0.75; the speckled colour noise of an untrained model fits ≤ 0.5."""

PALETTE_NAMES = ("background",) + tuple(world.COLOURS)
PALETTE = np.array([world.BACKGROUND] + list(world.COLOURS.values()), np.float32)  # (5, 3)


# --------------------------------------------------------------------------- geometry helpers

def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks of one shape (1.0 when both are empty)."""
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a (H, W) bool mask (empty mask → empty)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, bool)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp, queue = [], deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            comp.append((y, x))
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    queue.append((yy, xx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask, bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def prototype(shape: str, h: int, w: int) -> np.ndarray:
    """(h, w) bool mask of ``shape`` stretched to fill an h×w box, drawn like ``world.object_mask``."""
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = (u + 0.5) / w * 2 - 1, (v + 0.5) / h * 2 - 1  # [-1, 1] across the box
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.ones((h, w), bool)
    if shape == "triangle":
        return np.abs(u) <= (v + 1) / 2
    raise ValueError(f"unknown shape {shape!r}: use one of {world.SHAPES}")


def classify_shape(mask: np.ndarray) -> tuple[str, dict[str, float]]:
    """Best-matching shape of a blob: IoU with each prototype fitted to its bounding box."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise ValueError("empty mask: nothing to classify")
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    scores = {s: iou(crop, prototype(s, *crop.shape)) for s in world.SHAPES}
    return max(scores, key=scores.get), scores


# --------------------------------------------------------------------------- segmentation


@dataclass
class Segment:
    """One colour's object in a generated image. ``mask``: (H, W) bool; centroid in pixels (x, y)."""

    colour: str
    mask: np.ndarray
    shape: str
    fit: float  # IoU with the best shape prototype
    cx: float
    cy: float

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def palette_labels(image: np.ndarray) -> np.ndarray:
    """(H, W) int: index into ('background', *world.COLOURS) of each pixel's nearest palette colour."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    d = ((image.astype(np.float32)[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1)  # (H, W, 5)
    return d.argmin(-1)


def segment(image: np.ndarray, min_area: int | None = None, min_fit: float = MIN_FIT) -> dict[str, Segment]:
    """Objects of an (H, W, 3) uint8 image by colour: {colour: Segment} for colours whose largest blob is big
    enough (``min_area``) and shaped like a shape (``min_fit``)."""
    size = image.shape[0]
    min_area = MIN_AREA * (size * image.shape[1]) // (world.SIZE ** 2) if min_area is None else min_area
    labels = palette_labels(image)
    out = {}
    for k, name in enumerate(PALETTE_NAMES[1:], start=1):
        blob = largest_component(labels == k)
        if blob.sum() < max(1, min_area):
            continue
        shape, fits = classify_shape(blob)
        if fits[shape] < min_fit:
            continue
        ys, xs = np.nonzero(blob)
        out[name] = Segment(name, blob, shape, fits[shape], float(xs.mean() + 0.5), float(ys.mean() + 0.5))
    return out
