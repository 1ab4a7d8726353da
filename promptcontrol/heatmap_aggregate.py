"""From a :class:`~promptcontrol.recording.Recording` to the per-level token maps that heat maps are made of.

Steps 1–3 and 5 of :mod:`promptcontrol.heatmap`'s recipe (words, normalisation and pictures stay there), plus which
text keys make the words (SD3's segments) and the output size:

1. **Per site**: the mean of the recorded maps over steps and heads, (K, h, w), whose K token values sum to 1 at
   every position. ``steps=`` (needs ``per_step=True``) and ``heads=`` (needs ``per_head=True``) restrict the
   mean; ``sites=`` (:func:`promptcontrol.schedule.site_filter`) picks the sites: by default every recorded site
   but the mid block's (as DAAM). The mid block stays when nothing else was recorded, when ``sites=`` says more
   than levels (a place, a name, a function) and for ``per_step="level"`` recordings.
2. **Per level**: the plain mean of the level's site maps, at the level's own resolution.
3. **Across levels**: each level upsampled to the output size, averaged with ``weighting``: ``"level"`` (default,
   every level the same, so SDXL's sixty 32×32 layers do not outvote its ten 64×64 ones), ``"resolution"``
   (∝ the level's h·w, 4^-level), ``"layer"`` (every site the same) or a ``{level: weight}`` dict; normalised to
   sum to 1 (DAAM 0.2's (site, head) mean is ``{level: heads summed over the level's sites}``).
5. **Upsampling**: ``F.interpolate(..., align_corners=False)`` to the image's pixel size (any aspect),
   ``interpolation="bicubic"`` (default, as DAAM; each token map clamped at 0) or ``"bilinear"`` (a convex mix).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .recording import Recording
from .sites import AttentionSite
from .tokens import SEGMENTS, PromptTokens, SegmentedTokens, no_t5_message

NORMALIZE = ("word", "global", None)
INTERPOLATION = ("bilinear", "bicubic")
WEIGHTING = ("level", "resolution", "layer")
Level = tuple[float, torch.Tensor]  # (weight, (K, h, w) float32)


def check_options(*, interpolation: str = "bicubic", normalize: str | None = "word") -> None:
    """Refuse an unknown ``interpolation`` or ``normalize``, naming the choices."""
    if interpolation not in INTERPOLATION:
        raise ValueError(f"interpolation must be one of {INTERPOLATION}; got {interpolation!r}")
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be 'word', 'global' or None; got {normalize!r}")


# ---- pure tensor functions ---------------------------------------------------------------------------------
def level_weights(
    groups: dict[int, list[torch.Tensor]], weighting: str | dict[int, float] = "level"
) -> dict[int, float]:
    """Weight of each level (summing to 1) for ``groups`` {level: [site maps (K, h, w)]} under ``weighting``."""
    if isinstance(weighting, dict):
        raw = {lv: float(weighting.get(lv, 0.0)) for lv in groups}
        if any(w < 0 for w in raw.values()) or sum(raw.values()) <= 0:
            raise ValueError(
                f"weighting {weighting} gives no positive weight to the recorded levels {sorted(groups)}"
            )
    elif weighting == "level":
        raw = {lv: 1.0 for lv in groups}
    elif weighting == "layer":
        raw = {lv: float(len(maps)) for lv, maps in groups.items()}
    elif weighting == "resolution":
        raw = {lv: 4.0**-lv for lv in groups}  # ∝ the level's grid h·w (each level halves both sides), even for capped maps
    else:
        raise ValueError(f"weighting must be one of {WEIGHTING} or a {{level: weight}} dict; got {weighting!r}")
    total = sum(raw.values())
    return {lv: w / total for lv, w in raw.items()}


def aggregate(
    site_maps: list[tuple[AttentionSite, torch.Tensor]], weighting: str | dict[int, float] = "level"
) -> list[Level]:
    """Per-level means of site maps (K, h, w), with the weights of ``weighting``: [(weight, (K, h, w))]."""
    groups: dict[int, list[torch.Tensor]] = {}
    for site, m in site_maps:
        groups.setdefault(site.level, []).append(m)
    weights = level_weights(groups, weighting)
    return [(weights[lv], torch.stack(maps).mean(dim=0)) for lv, maps in sorted(groups.items()) if weights[lv] > 0]


def upsample(maps: torch.Tensor, size: tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """``maps`` (n, h, w) → (n, H, W) with ``F.interpolate(mode=interpolation, align_corners=False)``."""
    check_options(interpolation=interpolation)
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    out = F.interpolate(maps[None].float(), size=tuple(size), mode=interpolation, align_corners=False)[0]
    return out.clamp_min(0) if interpolation == "bicubic" else out


def combine(levels: list[Level], positions: Iterable[int], size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Raw map (H, W): sum over levels of weight × the sum of the upsampled token maps at ``positions``."""
    positions = list(positions)
    out = torch.zeros(size, dtype=torch.float32)
    for weight, m in levels:
        # sums recorded on a GPU stay there during the run; maps are drawn on the CPU, after it
        out += weight * upsample(m[positions].cpu(), size, interpolation).sum(dim=0)  # (n, H, W) -> (H, W)
    return out


def min_max(m: torch.Tensor) -> torch.Tensor:
    """``m`` scaled to [0, 1] by its own minimum and maximum (a constant map gives zeros)."""
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)


# ---- which sites -----------------------------------------------------------------------------------------------
def without_mid_block(sites: list[AttentionSite]) -> list[AttentionSite]:
    """The default site choice: ``sites`` but the mid block's, unless the mid block is all there is."""
    rest = [s for s in sites if s.place != "mid"]
    return rest or sites


def by_level_only(spec: Any) -> bool:
    """Whether a ``sites=`` spec picks by level alone (``None`` or a dict of ``levels`` only): then the mid block
    is left out by default, and per-level step maps (whole levels) fit it."""
    return spec is None or (isinstance(spec, Mapping) and all(v is None for k, v in spec.items() if k != "levels"))


def chosen_sites(recording: Recording, sites: Any) -> list[AttentionSite]:
    """The recorded sites a ``sites=`` spec picks (default: all but the mid block's, see :func:`without_mid_block`)."""
    chosen = recording.sites_for(sites)
    if by_level_only(sites) and recording.per_step != "level":
        chosen = without_mid_block(chosen)
    if not chosen:
        recorded = sorted({(s.place, s.level) for s in recording.sites})
        raise ValueError(f"no recorded site matches sites={sites!r}; recorded (place, level): {recorded}")
    return chosen


# ---- which text keys (SD3: CLIP | T5) -------------------------------------------------------------------------
def _zero_t5_segment(recording: Recording, tokens: PromptTokens) -> bool:
    """Whether the recording's text keys are SD3's [CLIP | T5] with one tokenizer's words: joint sites with the
    text after the image and more keys than the tokenizer's (the T5 segment: zeros, no T5 encoder loaded)."""
    joint = bool(recording.sites) and all(s.kind == "joint" and s.text_keys == "after" for s in recording.sites)
    return joint and bool(recording.sums) and recording.num_tokens > tokens.max_length


def pick_segment(recording: Recording, tokens: PromptTokens, segment: str | None) -> PromptTokens:
    """The tokens whose maps make the words under ``segment=`` (SD3): ``"both"`` (default with a T5 encoder),
    ``"clip"`` (default without one) or ``"t5"``; ``None`` is the default. Other backbones take ``None`` only."""
    if segment is not None and segment not in SEGMENTS:
        raise ValueError(f"segment must be one of {SEGMENTS} or None (the default); got {segment!r}")
    if isinstance(tokens, SegmentedTokens):
        return tokens if segment in (None, "both") else tokens.only(segment)
    if segment is None:
        return tokens
    if _zero_t5_segment(recording, tokens):
        if segment == "clip":
            return tokens
        raise ValueError(no_t5_message(f"heatmaps(segment={segment!r})"))
    raise ValueError(
        f"segment={segment!r} picks a segment of SD3's text keys (CLIP | T5); this recording's text keys are one "
        "tokenizer's tokens: leave segment out"
    )


# ---- levels of a recording -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecordingLevels:
    """What the aggregation of one recording gives: ``levels`` [(weight, (K, h, w))] over the chosen steps, and
    ``step_levels(step)`` the same for one recorded step (``None`` without per-step maps that fit the choice)."""

    levels: list[Level]
    step_levels: Callable[[int], list[Level]] | None


def level_step_maps(recording: Recording, chosen: list[AttentionSite], steps: list[int], weighting) -> list[Level]:
    """Levels from per-level step maps (``per_step="level"``): each level's stored mean, weighted as usual."""
    groups: dict[int, list[torch.Tensor]] = {}
    for site in chosen:
        groups.setdefault(site.level, [])
    for level in groups:
        m = recording.level_map(level, steps)
        n = recording.level_sites.get(level, 1)
        groups[level] = [m] * n  # the same mean once per site, so that weighting="layer" counts sites
    weights = level_weights(groups, weighting)
    return [(weights[lv], maps[0]) for lv, maps in sorted(groups.items()) if weights[lv] > 0]


def recording_levels(
    recording: Recording,
    chosen: list[AttentionSite],
    *,
    sites: Any,
    steps: list[int] | None,
    heads: Iterable[int] | None,
    weighting: str | dict[int, float],
) -> RecordingLevels:
    """The weighted levels of ``chosen`` (:func:`chosen_sites` of the ``sites=`` spec ``sites``) over ``steps``
    (recorded step indices, ``None`` for all) and ``heads``, and the per-step levels where the recording has them."""
    # per-level step maps mix every recorded site of a level: a choice of places/sites cannot apply to them
    by_level = recording.per_step == "level" and by_level_only(sites)
    if steps is not None and recording.per_step == "level" and not by_level:
        raise ValueError(
            "per-step maps were kept per level (per_step='level'), so steps= needs whole levels: sites=None or "
            "sites={'levels': [...]}; choose sites when recording (pc.trace(pipe, sites=...)) or use per_step=True"
        )
    if by_level and steps is not None:
        levels = level_step_maps(recording, chosen, steps, weighting)
    else:
        levels = aggregate([(s, recording.site_map(s, steps=steps, heads=heads)) for s in chosen], weighting)
    return RecordingLevels(levels, _step_levels(recording, chosen, by_level, heads, weighting))


def _step_levels(recording: Recording, chosen, by_level: bool, heads, weighting) -> Callable[[int], list[Level]] | None:
    """``step -> levels`` of that one step, from per-site or per-level step maps (``None`` when there are none
    for this choice, or when ``heads=`` picks heads: step maps are means over heads)."""
    if heads is not None:
        return None
    if recording.per_step == "site":
        return lambda step: aggregate([(s, recording.site_map(s, steps=[step])) for s in chosen], weighting)
    if by_level:
        return lambda step: level_step_maps(recording, chosen, [step], weighting)
    return None


# ---- output size -----------------------------------------------------------------------------------------------
def output_size(recording: Recording, size: int | tuple[int, int] | None) -> tuple[int, int]:
    """The maps' (height, width): ``size`` (one int: a square), by default the image's pixel size."""
    if size is None:
        h, w = recording.latent_hw
        return (h * recording.scale_factor, w * recording.scale_factor)
    if isinstance(size, int):
        return (size, size)
    return size
