"""Local-blend colour swaps, measured: does ``pc.edit(..., blend=...)`` keep what lies outside the edited object?

Two kinds of scene, each a two-object world caption whose object 0 changes colour (to a colour the scene does not
use), edited with ``pc.edit(src, dst, cross_steps=0.8, self_steps=0.4, blend=[[src phrase], [dst phrase]])``
where the phrase is the object's adjective and noun (``"red circle"`` → ``"green circle"``: unique in the
caption, as colours never repeat):

The blend mask's rule is a :class:`BlendRule` (threshold, levels; default prompt-to-prompt's: 0.3 on the
coarsest level, as ``pc.LocalBlend``'s defaults).

* **generated**: ``world.dataset(n, blend_seed, n_objects=2)``, swap ``j`` from generator seed
  ``blend_seed + j``; the edit is compared with the source image it was made beside;
* **inverted**: ``world.dataset(n, invert_seed, n_objects=2)`` rendered by ``world.render`` (not generated),
  inverted with ``pc.invert`` (null-text, the measurement's steps, guidance 7.5) under its caption, edited from
  the inversion; the edit is compared with the inversion's reconstruction. Only on UNet models (``pc.invert``
  does not invert flow-matching transformers): elsewhere the inverted rows are ``nan`` and say why.

Per swap: the **object mask** is the union of the edited object's segment in the source (its old colour; for an
inverted scene, the rendered image) and in the edit (its new colour), from :func:`~.segment.segment`;
**PSNR outside** is over the pixels outside that mask; **mask IoU** is the IoU of the blend mask ``pc.edit``
used on its last blended step (``LocalBlend.last_mask``, source OR edit, nearest-upsampled from the latent to
the image) with the object mask.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import world
from .segment import iou, segment

PSNR_TARGET = ">= 30 dB"
NOT_INVERTED = "not measured: pc.invert (DDIM, null-text) needs a UNet model; flow-matching models are not inverted"


# --------------------------------------------------------------------------- metrics on arrays

def as_unit_float(image) -> np.ndarray:
    """(H, W, 3) float64 in [0, 1] from a uint8 array, a [0, 1] float array or a PIL image."""
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    return np.clip(array.astype(np.float64), 0.0, 1.0)


def as_uint8(image) -> np.ndarray:
    """(H, W, 3) uint8 from a uint8 array, a [0, 1] float array or a PIL image (what ``segment`` reads)."""
    array = np.asarray(image)
    return array if array.dtype == np.uint8 else (as_unit_float(array) * 255).round().astype(np.uint8)


def psnr_outside(a, b, mask: np.ndarray) -> float:
    """PSNR (dB, peak 1) between images ``a`` and ``b`` over the pixels where ``mask`` (H, W) is False.

    Images as :func:`as_unit_float` reads them; identical outside gives ``inf``; a mask covering every pixel
    leaves nothing to compare and gives ``nan``.
    """
    x, y = as_unit_float(a), as_unit_float(b)
    if x.shape != y.shape:
        raise ValueError(f"psnr_outside needs images of one shape, got {x.shape} and {y.shape}")
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match the images' {x.shape[:2]}")
    outside = ~mask.astype(bool)
    if not outside.any():
        return float("nan")
    mse = float(np.mean((x[outside] - y[outside]) ** 2))  # over outside pixels × 3 channels
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def upsample_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) bool → (H, W) bool by nearest upsampling; H, W must be multiples of h, w (the VAE factor)."""
    h, w = mask.shape
    if size[0] % h or size[1] % w:
        raise ValueError(f"image size {size} is not a multiple of the mask's {mask.shape}")
    return np.repeat(np.repeat(mask.astype(bool), size[0] // h, axis=0), size[1] // w, axis=1)


def blend_mask_iou(latent_mask: np.ndarray, object_mask: np.ndarray) -> float:
    """IoU of a latent-grid blend mask (h, w), nearest-upsampled to the image, with an (H, W) object mask."""
    return iou(upsample_mask(latent_mask, object_mask.shape), object_mask.astype(bool))


def object_mask(before: np.ndarray, after: np.ndarray, old: str, new: str) -> np.ndarray:
    """(H, W) bool: the edited object's segment in ``before`` (colour ``old``) OR in ``after`` (colour ``new``);
    empty where neither is drawn."""
    return _union(segment(as_uint8(before)).get(old), segment(as_uint8(after)).get(new), before.shape[:2])


def _union(a, b, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: segment ``a``'s mask OR segment ``b``'s (either may be ``None``)."""
    mask = np.zeros(shape, bool)
    for seg in (a, b):
        if seg is not None:
            mask |= seg.mask
    return mask


# --------------------------------------------------------------------------- the swaps

@dataclass(frozen=True)
class BlendRule:
    """The local-blend mask rule a measurement uses: ``pc.LocalBlend(words, threshold, levels=levels)``
    (``levels=None``: LocalBlend's default, the coarsest cross-attention level). Prints as ``0.3@default``."""

    threshold: float = 0.3
    levels: tuple[int, ...] | None = None

    def controller(self, words):
        from ..controllers.blend import LocalBlend

        return LocalBlend(words, self.threshold, levels=self.levels)

    def __str__(self) -> str:
        levels = "default" if self.levels is None else "+".join(str(v) for v in self.levels)
        return f"{self.threshold:g}@{levels}"

    def with_options(self, threshold: float | None = None, levels: list[str] | None = None) -> "BlendRule":
        """This rule with ``--blend-threshold`` and / or ``--blend-levels`` (ints >= 0) put in; ``None`` keeps
        this rule's part. ``ValueError`` names a bad one."""
        if levels is not None and not all(v.isdigit() for v in levels):
            raise ValueError(f"blend levels {levels} are not levels (ints 0, 1, ...), e.g. 0 1")
        if threshold is not None and not 0.0 <= threshold < 1.0:
            raise ValueError(f"blend threshold {threshold} is not a share of the map's maximum in [0, 1)")
        return BlendRule(self.threshold if threshold is None else float(threshold),
                         self.levels if levels is None else tuple(int(v) for v in levels))


@dataclass(frozen=True)
class BlendSwap:
    """One local-blend colour swap: prompts, the edited object's colours and its phrase in each prompt."""

    source: str
    edited: str
    old: str
    new: str
    source_phrase: str  # e.g. "red circle"
    edited_phrase: str  # e.g. "green circle"


def blend_swap(sample: world.Sample) -> BlendSwap:
    """Object 0's colour word → the first world colour the scene does not use."""
    words = sample.caption.words
    ow = sample.caption.objects[0]
    old = sample.scene.objects[0].colour
    new = next(c for c in world.COLOURS if c not in {o.colour for o in sample.scene.objects})
    edited = list(words)
    edited[ow.adjective] = new
    noun = words[ow.noun]
    return BlendSwap(sample.caption.text, " ".join(edited), old, new, f"{old} {noun}", f"{new} {noun}")


def blend_samples(n: int, seed: int) -> list[world.Sample]:
    """``n`` two-object world scenes (something outside the edited object to keep); scene i from world seed
    ``seed * 1_000_003 + i``."""
    return world.dataset(n, seed, n_objects=2)


@dataclass
class BlendScores:
    """Per-swap numbers of one kind of scene, the scenes they were measured on, and their summary."""

    psnr: tuple[float, ...]  # dB outside the object, per swap
    mask_iou: tuple[float, ...]  # blend mask vs object mask, per swap (nan when no mask was made)
    scenes: str  # which scenes and seeds, e.g. "world.dataset(8, 2024, n_objects=2), generator seeds 2024..2031"
    recoloured: tuple[bool, ...] = ()  # per swap: the edit drew the object's new colour (else PSNR says nothing)

    @property
    def n(self) -> int:
        return len(self.psnr)

    @property
    def mean_psnr(self) -> float:
        return float(np.mean(self.psnr)) if self.psnr else float("nan")

    @property
    def min_psnr(self) -> float:
        return float(np.min(self.psnr)) if self.psnr else float("nan")

    @property
    def recoloured_share(self) -> float:
        return float(np.mean(self.recoloured)) if self.recoloured else float("nan")

    @property
    def mean_mask_iou(self) -> float:
        return float(np.mean(self.mask_iou)) if self.mask_iou else float("nan")


@dataclass
class BlendTruth:
    """Local-blend colour swaps on generated scenes and on inverted world images."""

    generated: BlendScores
    inverted: BlendScores
    reconstruction_psnr: tuple[float, ...]  # whole-image PSNR of each inversion's reconstruction vs its input


def _last_blend_mask(result) -> np.ndarray | None:
    """(h, w) bool: the mask ``pc.edit``'s LocalBlend applied to the edit on its last blended step (source OR
    edit, images 0 and 1), or None if it never blended."""
    from ..controllers.blend import LocalBlend

    blend = next(c for c in result.controllers if isinstance(c, LocalBlend))
    if blend.last_mask is None:
        return None
    mask = blend.last_mask  # (N_images, 1, h, w) bool
    return (mask[0, 0] | mask[1, 0]).cpu().numpy()


def _score(reference, edited, source, result, swap: BlendSwap) -> tuple[float, float, bool]:
    """(PSNR of ``edited`` against ``reference`` outside the object mask, blend mask IoU with that mask, whether
    ``edited`` drew the new colour); the mask is the object's segment in ``source`` OR in ``edited``. An edit that
    changes nothing keeps everything outside too: the recoloured flag tells it apart."""
    after = as_uint8(edited)
    drawn = segment(after).get(swap.new)  # the edited object in its new colour (None: not drawn)
    mask = _union(segment(as_uint8(source)).get(swap.old), drawn, after.shape[:2])  # object_mask, segmented once
    blend = _last_blend_mask(result)
    recoloured = drawn is not None
    iou_ = float("nan") if blend is None else blend_mask_iou(blend, mask)
    return psnr_outside(reference, edited, mask), iou_, recoloured


def _blend_edit(pipe, source, swap: BlendSwap, rule: BlendRule, **kwargs):
    """``pc.edit`` 0.8 / 0.4 with local blend (``rule``) on the edited object's phrase in each prompt (numpy
    images)."""
    from ..editing import edit

    return edit(pipe, source, swap.edited, cross_steps=0.8, self_steps=0.4,
                blend=rule.controller([[swap.source_phrase], [swap.edited_phrase]]), output_type="np", **kwargs)


@torch.no_grad()
def generated_blends(pipe, n: int, seed: int, *, steps: int = 20, rule: BlendRule = BlendRule()) -> BlendScores:
    """Local-blend swaps of generated scenes (swap j from generator seed ``seed + j``) against their source."""
    scores = []
    for j, sample in enumerate(blend_samples(n, seed)):
        swap = blend_swap(sample)
        result = _blend_edit(pipe, swap.source, swap, rule, seed=seed + j, num_inference_steps=steps)
        scores.append(_score(result.images[0], result.images[1], result.images[0], result, swap))
    scenes = f"world.dataset({n}, {seed}, n_objects=2), generator seeds {_seed_span(seed, n)}"
    return _scores(scores, scenes)


def inverted_blends(pipe, n: int, seed: int, *, steps: int = 20,
                    rule: BlendRule = BlendRule()) -> tuple[BlendScores, tuple[float, ...]]:
    """Local-blend swaps of rendered world images inverted with null-text, against the reconstruction; also the
    reconstructions' whole-image PSNR against the rendered input."""
    from ..inversion import invert, psnr

    scores, recon = [], []
    for sample in blend_samples(n, seed):
        swap = blend_swap(sample)
        inv = invert(pipe, sample.image, swap.source, steps=steps, method="null-text", progress=False)
        with torch.no_grad():
            result = _blend_edit(pipe, inv, swap, rule)
        rebuilt = as_uint8(inv.reconstruction)
        scores.append(_score(rebuilt, result.images[1], sample.image, result, swap))
        recon.append(psnr(sample.image, rebuilt))
    scenes = f"world.dataset({n}, {seed}, n_objects=2) rendered, null-text inverted"
    return _scores(scores, scenes), tuple(recon)


def _scores(per_swap: list[tuple[float, float, bool]], scenes: str) -> BlendScores:
    """:class:`BlendScores` from ``_score``'s (PSNR, mask IoU, recoloured) per swap."""
    psnrs, ious, recoloured = zip(*per_swap) if per_swap else ((), (), ())
    return BlendScores(tuple(psnrs), tuple(ious), scenes, tuple(recoloured))


def blend_truth(pipe, *, n_generated: int, n_inverted: int, blend_seed: int, invert_seed: int,
                steps: int = 20, rule: BlendRule = BlendRule()) -> BlendTruth:
    """Both kinds of local-blend swap (see the module docstring), with the blend mask of ``rule``."""
    generated = generated_blends(pipe, n_generated, blend_seed, steps=steps, rule=rule)
    if getattr(pipe, "unet", None) is None:  # pc.invert is DDIM / null-text: not on flow-matching transformers
        return BlendTruth(generated, BlendScores((), (), NOT_INVERTED), ())
    inverted, recon = inverted_blends(pipe, n_inverted, invert_seed, steps=steps, rule=rule)
    return BlendTruth(generated, inverted, recon)


def blend_rows(b: BlendTruth) -> list[tuple[str, float, str, str]]:
    """Table rows (metric, value, target, counted over) of a :class:`BlendTruth`."""
    rows = []
    for kind, s, against in (("generated", b.generated, "vs source"), ("inverted", b.inverted, "vs reconstruction")):
        over = f"{s.n} swaps {against}; {s.scenes}"
        rows += [(f"blend PSNR outside object, {kind} (mean)", s.mean_psnr, PSNR_TARGET, over),
                 (f"blend PSNR outside object, {kind} (min)", s.min_psnr, PSNR_TARGET, f"{s.n} swaps"),
                 (f"blend mask IoU with object, {kind}", s.mean_mask_iou, "reported", f"{s.n} swaps"),
                 (f"blend recoloured the object, {kind}", s.recoloured_share, "all", f"{s.n} swaps")]
    recon = float(np.mean(b.reconstruction_psnr)) if b.reconstruction_psnr else float("nan")
    rows.append(("inversion reconstruction PSNR", recon, "-", f"{len(b.reconstruction_psnr)} images vs input"))
    return rows


def _seed_span(first: int, n: int) -> str:
    """``2024..2031`` for n consecutive seeds from ``first``."""
    return str(first) if n == 1 else f"{first}..{first + n - 1}" if n else "none"
