"""The synthetic world the embedded model was trained on.

Small RGB images (32×32 by default) of one or two flat-coloured shapes on a black background, each
with its exact mask, and captions from a small grammar that names every object by a colour adjective
and a noun, optionally with a position ("on the left", "at the top") before or after the noun.

Everything is deterministic for a seed::

    s = sample(7)                 # Sample: scene, caption, image (H, W, 3) uint8, masks
    s.caption.text                # 'on the left a red circle and on the right a blue square'
    s.caption.objects[0].noun     # index into s.caption.words of 'circle'
    s.masks[0]                    # (H, W) bool, exactly the pixels drawn for object 0

Conventions (the evaluation code relies on them):
- two objects in one scene always have different colours, so a colour names one object;
- ``position`` is the named region an object sits in ('left', 'right', 'top', 'bottom'), or ``None``
  when the scene is free; captions only name positions of scenes whose layout is ``"named"``;
- the second object is drawn over the first (they never overlap in generated scenes anyway).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SIZE = 32
"""Default image side in pixels."""

BACKGROUND: tuple[int, int, int] = (0, 0, 0)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
LAYOUTS = ("named", "free", "next_to")

# Half-extent of a shape in pixels, at the default 32-pixel size (scaled with the image size).
_MIN_HALF, _MAX_HALF = 5, 7


@dataclass(frozen=True)
class Obj:
    """One shape: its kind, colour, centre (x, y in pixels, continuous) and half-extent."""

    shape: str
    colour: str
    cx: float
    cy: float
    half: float
    position: str | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}: use one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}: use one of {tuple(COLOURS)}")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}: use one of {POSITIONS} or None")


@dataclass(frozen=True)
class Scene:
    """One or two objects on a plain background. ``layout`` says which captions fit it."""

    objects: tuple[Obj, ...]
    layout: str = "free"
    size: int = SIZE

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene holds one or two objects, got {len(self.objects)}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}: use one of {LAYOUTS}")
        if len(self.objects) == 2 and self.objects[0].colour == self.objects[1].colour:
            raise ValueError("two objects of one scene need different colours (colour names the object)")
        if self.layout == "next_to" and len(self.objects) != 2:
            raise ValueError("layout 'next_to' needs two objects")


@dataclass(frozen=True)
class ObjectWords:
    """Indices into ``Caption.words`` of the words that name one object."""

    adjective: int
    noun: int
    position: int | None = None


@dataclass(frozen=True)
class Caption:
    """A caption, its whitespace-split words, and for each scene object the words naming it."""

    text: str
    objects: tuple[ObjectWords, ...]

    @property
    def words(self) -> list[str]:
        return self.text.split(" ")


@dataclass
class Sample:
    """A rendered scene with one caption. ``image``: (H, W, 3) uint8; ``masks[i]``: (H, W) bool."""

    scene: Scene
    caption: Caption
    image: np.ndarray
    masks: list[np.ndarray] = field(default_factory=list)


# --------------------------------------------------------------------------- rendering

def object_mask(obj: Obj, size: int = SIZE) -> np.ndarray:
    """(size, size) bool mask of one shape, sampled at pixel centres (no anti-aliasing)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy, h = xs - obj.cx, ys - obj.cy, obj.half
    if obj.shape == "circle":
        return dx * dx + dy * dy <= h * h
    if obj.shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    # triangle pointing up: apex (cx, cy - h), base from (cx - h, cy + h) to (cx + h, cy + h)
    t = (dy + h) / (2 * h)  # 0 at the apex row, 1 at the base row
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= h * t)


def render(scene: Scene) -> tuple[np.ndarray, list[np.ndarray]]:
    """Draw a scene. Returns the (H, W, 3) uint8 image and one (H, W) bool mask per object.

    Masks are the visible pixels: where a later object covers an earlier one, the earlier mask loses them.
    """
    n = scene.size
    image = np.empty((n, n, 3), np.uint8)
    image[:] = BACKGROUND
    masks = [object_mask(o, n) for o in scene.objects]
    for i, (o, m) in enumerate(zip(scene.objects, masks)):
        image[m] = COLOURS[o.colour]
        for j in range(i):
            masks[j] = masks[j] & ~m
    return image, masks


# --------------------------------------------------------------------------- sampling scenes

def _slot(position: str, half: float, size: int, rng: np.random.Generator) -> tuple[float, float]:
    """A centre inside the named region: left/right third columns, top/bottom third rows, jittered."""
    q = size / 4  # 8 px at size 32
    along = rng.uniform(-0.1, 0.1) * size  # jitter across the axis, ±3 px at 32
    shift = rng.uniform(-1, 1) * size / 32  # jitter along the axis, ±1 px at 32
    c = size / 2 + along
    if position == "left":
        return q + shift, c
    if position == "right":
        return size - q + shift, c
    if position == "top":
        return c, q + shift
    return c, size - q + shift


def _free_centre(half: float, size: int, rng: np.random.Generator) -> tuple[float, float]:
    return rng.uniform(half + 0.5, size - half - 0.5), rng.uniform(half + 0.5, size - half - 0.5)


def _free_pair(halves: list[float], size: int, rng: np.random.Generator,
               gap: float = 2.0) -> list[tuple[float, float]]:
    """Two centres anywhere with the bounding boxes at least ``gap`` px apart along a random axis."""
    ha, hb = halves
    lo_a, hi_a = ha + 0.5, size - 0.5 - 2 * hb - ha - gap
    a = rng.uniform(lo_a, max(lo_a, hi_a))
    b = rng.uniform(a + ha + hb + gap, max(a + ha + hb + gap, size - hb - 0.5))
    oa, ob = rng.uniform(ha + 0.5, size - ha - 0.5), rng.uniform(hb + 0.5, size - hb - 0.5)
    return [(a, oa), (b, ob)] if rng.random() < 0.5 else [(oa, a), (ob, b)]


def random_scene(rng: np.random.Generator, size: int = SIZE, n_objects: int | None = None,
                 layout: str | None = None) -> Scene:
    """Draw a scene: 1 or 2 objects, layout 'named' (in named regions), 'free' or 'next_to' (side by side)."""
    if n_objects is None:
        n_objects = 1 if rng.random() < 0.4 else 2
    if n_objects not in (1, 2):
        raise ValueError(f"n_objects must be 1 or 2, got {n_objects}")
    if layout is None:
        layout = ("named", "free")[int(rng.random() < 0.35)] if n_objects == 1 else \
            ("named", "free", "next_to")[int(rng.choice(3, p=[0.55, 0.2, 0.25]))]
    if layout not in LAYOUTS or (layout == "next_to" and n_objects != 2):
        raise ValueError(f"layout {layout!r} does not fit {n_objects} object(s): use one of {LAYOUTS}")
    scale = size / SIZE
    colours = [str(c) for c in rng.choice(list(COLOURS), size=n_objects, replace=False)]
    shapes = [str(s) for s in rng.choice(SHAPES, size=n_objects)]
    halves = [float(rng.integers(_MIN_HALF, _MAX_HALF + 1)) * scale for _ in range(n_objects)]

    if layout == "named":
        first = str(rng.choice(POSITIONS))
        positions: list[str | None] = [first, OPPOSITE[first]][:n_objects]
        centres = [_slot(p, h, size, rng) for p, h in zip(positions, halves)]
    elif layout == "next_to":
        first = str(rng.choice(("left", "right")))
        positions = [first, OPPOSITE[first]]
        centres = [_slot(p, h, size, rng) for p, h in zip(positions, halves)]
        y = (centres[0][1] + centres[1][1]) / 2  # same row, as "next to" suggests
        centres = [(c[0], y) for c in centres]
    else:
        positions = [None] * n_objects
        centres = _free_pair(halves, size, rng) if n_objects == 2 else [_free_centre(halves[0], size, rng)]
    objects = tuple(Obj(s, c, float(x), float(y), h, p)
                    for s, c, (x, y), h, p in zip(shapes, colours, centres, halves, positions))
    return Scene(objects, layout, size)


# --------------------------------------------------------------------------- captions

def caption(scene: Scene, rng: np.random.Generator) -> Caption:
    """A caption for the scene, from the grammar; word order and object order are drawn from ``rng``.

    Grammar (``NP`` = "a <colour> <shape>", ``P`` = "on the left" | "on the right" | "at the top" | "at the bottom"):
    one object: ``NP`` (free) | ``NP P`` | ``P NP`` (named); two objects: ``NP and NP`` (free),
    ``NP next to NP`` (next_to), ``X and Y`` with X, Y each ``NP P`` or ``P NP`` (named).
    """
    order = list(range(len(scene.objects)))
    if len(order) == 2 and rng.random() < 0.5:
        order.reverse()
    words: list[str] = []
    spans: dict[int, ObjectWords] = {}
    for k, i in enumerate(order):
        o = scene.objects[i]
        if k == 1:
            words += ["next", "to"] if scene.layout == "next_to" else ["and"]
        named = scene.layout == "named" and o.position is not None
        before = named and rng.random() < 0.5
        pos_idx = None
        if before:
            words += POSITION_PHRASE[o.position].split(" ")
            pos_idx = len(words) - 1
        words += ["a", o.colour, o.shape]
        adj, noun = len(words) - 2, len(words) - 1
        if named and not before:
            words += POSITION_PHRASE[o.position].split(" ")
            pos_idx = len(words) - 1
        spans[i] = ObjectWords(adj, noun, pos_idx)
    return Caption(" ".join(words), tuple(spans[i] for i in range(len(scene.objects))))


# --------------------------------------------------------------------------- the public short paths

def sample(seed: int, size: int = SIZE, **scene_kwargs) -> Sample:
    """One captioned, rendered scene, fully determined by ``seed``."""
    rng = np.random.default_rng(seed)
    scene = random_scene(rng, size, **scene_kwargs)
    cap = caption(scene, rng)
    image, masks = render(scene)
    return Sample(scene, cap, image, masks)


def dataset(n: int, seed: int = 0, size: int = SIZE, **scene_kwargs) -> list[Sample]:
    """``n`` samples; sample ``i`` is ``sample(seed * 1_000_003 + i)`` so any prefix is stable."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [sample(seed * 1_000_003 + i, size, **scene_kwargs) for i in range(n)]


def to_tensor_range(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 → (3, H, W) float32 in [-1, 1], the range the VAE works in."""
    return image.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
