"""Per-word heat maps from a :class:`~promptcontrol.recording.Recording`: words → maps, normalisation, pictures.

Pictures and files come from :mod:`promptcontrol.images`. How a word's map is made (each step a parameter of
:func:`build_heatmaps` / ``tr.heatmaps``; ``docs/inspect.md`` has the measurements behind the defaults):

1.–3. **Per site, per level, across levels** (:mod:`promptcontrol.heatmap_aggregate`, which documents them): the
   mean over the recorded steps and heads (``steps=``, ``heads=``) of the sites ``sites=`` picks (by default every
   recorded site but the mid block's, as DAAM), the plain mean per level, the levels averaged with ``weighting``
   (``"level"``, the default; ``"resolution"``, ``"layer"`` or a ``{level: weight}`` dict).
4. **Word**: the sum of the maps of its token positions (a multi-token word is the union of its pieces, a phrase
   of its words, a repeated word of all its occurrences unless ``occurrence=`` picks one); each token is
   upsampled on its own, so a word's map is exactly the sum of its tokens' maps. SD3 with a T5 encoder: its
   tokens in both text segments (CLIP's and T5's) by default; ``segment="clip" | "t5" | "both"`` picks.
5. **Upsampling**: ``F.interpolate(..., align_corners=False)`` to the image's pixel size (any aspect),
   ``interpolation="bicubic"`` (default, as DAAM; each token map clamped at 0) or ``"bilinear"`` (a convex mix).
6. **Normalisation** ``normalize=``: ``"word"`` (default, each map min-max scaled on its own), ``"global"`` (all
   divided by the largest word map's peak, so words compare; 0 stays 0) or ``None`` (the raw attention mass).

The start token, the end token and the padding are never part of a word: :meth:`HeatMaps.special`,
:meth:`HeatMaps.token`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import images
from .heatmap_aggregate import INTERPOLATION, NORMALIZE, WEIGHTING, Level, aggregate, chosen_sites, combine
from .heatmap_aggregate import check_options as _check  # also imported from here by controllers/concept.py
from .heatmap_aggregate import level_weights, min_max, output_size, pick_segment, recording_levels, upsample
from .heatmap_aggregate import without_mid_block
from .recording import Recording, fold_place_level, truncation_message
from .sites import AttentionSite
from .tokens import PromptTokens, Word

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

__all__ = [  # the face, and the names that moved to heatmap_aggregate (and recording), still importable from here
    "HeatMap", "HeatMaps", "build_heatmaps", "pick_segment", "INTERPOLATION", "NORMALIZE", "WEIGHTING", "Level",
    "aggregate", "combine", "level_weights", "min_max", "upsample", "without_mid_block", "truncation_message",
]


class HeatMap:
    """One heat map: ``tensor`` (H, W) float32 on the CPU, with the label and token positions it came from."""

    def __init__(self, tensor: torch.Tensor, label: str, positions: tuple[int, ...], normalize: str | None):
        self.tensor = tensor
        self.label = label
        self.positions = positions
        self.normalize = normalize

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    def to_tensor(self) -> torch.Tensor:
        """The map as a float32 tensor (H, W)."""
        return self.tensor

    def numpy(self) -> np.ndarray:
        return self.tensor.numpy()

    def __array__(self, dtype=None, copy=None):
        arr = self.tensor.numpy()
        return arr.astype(dtype) if dtype is not None else arr

    def overlay(self, image: Any = None, *, cmap: str = "jet", alpha: float = 0.5, legend: bool = False) -> "Image.Image":
        """The map in colour over ``image`` (PIL / array / tensor; resized to the image), or alone without one.

        ``legend=False`` gives a picture of exactly the image's size; ``legend=True`` a labelled figure with a
        colour bar.
        """
        label = self.label if legend else None
        return images.overlay(self.tensor, image, self.normalize, cmap=cmap, alpha=alpha, label=label)

    def save(self, path: str | Path, image: Any = None, **overlay_options) -> Path:
        """Save as a picture (``.png``/``.jpg``: :meth:`overlay`) or as data (``.safetensors``, ``.npz``, ``.npy``, ``.pt``)."""
        path = Path(path)
        if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
            self.overlay(image, **overlay_options).save(path)
        else:
            images.save_tensors(path, {"map": self.tensor}, {"label": self.label, "normalize": str(self.normalize)})
        return path

    def __repr__(self) -> str:
        h, w = self.tensor.shape
        return f"HeatMap({self.label!r}, {h}x{w}, positions={list(self.positions)}, normalize={self.normalize!r})"


class HeatMaps:
    """The heat maps of one image's prompt: index by word or phrase, render, export.

    ``maps["circle"]``, ``maps.word("circle", occurrence=2)``, ``maps.special("start")``, ``maps.token(5)``,
    ``maps.words``, ``maps.grid(image)``, ``maps.strip("circle", image)``, ``maps.to_tensor()``, ``maps.save(path)``.
    """

    def __init__(
        self,
        levels: list[Level],
        tokens: PromptTokens,
        size: tuple[int, int],
        *,
        interpolation: str = "bicubic",
        normalize: str | None = "word",
        sites: list[AttentionSite] | None = None,
        steps: list[int] | None = None,
        image_index: int | None = None,
        step_levels: Callable[[int], list[Level]] | None = None,
        recorded_steps: list[int] | None = None,
        pick_steps: Callable[[Any], list[int]] | None = None,
    ):
        _check(interpolation=interpolation, normalize=normalize)
        self.levels = levels
        self.tokens = tokens
        self.size = (int(size[0]), int(size[1]))
        self.interpolation = interpolation
        self.normalize = normalize
        self.sites = sites or []
        self.steps = steps
        self.image_index = image_index
        self._step_levels = step_levels
        self._recorded_steps = recorded_steps or []
        self._pick_steps = pick_steps if pick_steps is not None else list  # a steps= spec -> step indices
        self._raw: dict[tuple[int, ...], torch.Tensor] = {}
        self._global: float | None = None

    # ---- what is there ---------------------------------------------------------------------------------
    @property
    def prompt(self) -> str:
        return self.tokens.prompt

    @property
    def num_tokens(self) -> int:
        return int(self.levels[0][1].shape[0])

    @property
    def word_list(self) -> list[Word]:
        """The prompt's words that have a map (words cut off by the token limit have none), in order."""
        return [w for w in self.tokens.words if w.tokens]

    @property
    def words(self) -> list[str]:
        """The texts of the prompt's words that have a map, in order (repeats included)."""
        return [w.text for w in self.word_list]

    @property
    def level_weights(self) -> list[tuple[float, tuple[int, int]]]:
        """(weight, (h, w)) of each level that went into the maps."""
        return [(w, tuple(m.shape[-2:])) for w, m in self.levels]

    def __contains__(self, query: str) -> bool:
        try:
            return bool(self.tokens.positions(query))
        except KeyError:
            return False

    def __len__(self) -> int:
        return len(self.word_list)

    def __iter__(self):
        return iter(self.words)

    # ---- maps --------------------------------------------------------------------------------------------
    def raw(self, positions: Iterable[int]) -> torch.Tensor:
        """Unnormalised map (H, W) of the sum of the token maps at ``positions`` (cached)."""
        key = tuple(sorted(set(int(p) for p in positions)))
        if not key:
            raise KeyError("no token positions given")
        bad = [p for p in key if not 0 <= p < self.num_tokens]
        if bad:
            raise KeyError(f"token positions {bad} out of range 0..{self.num_tokens - 1}")
        if key not in self._raw:
            self._raw[key] = combine(self.levels, key, self.size, self.interpolation)
        return self._raw[key]

    def _global_scale(self) -> float:
        if self._global is None:
            peaks = [float(self.raw(w.tokens).max()) for w in self.word_list]
            self._global = max(peaks) if peaks and max(peaks) > 0 else 1.0
        return self._global

    def _normalised(self, raw: torch.Tensor, normalize: str | None) -> torch.Tensor:
        if normalize == "word":
            return min_max(raw)
        if normalize == "global":
            return raw / self._global_scale()
        return raw.clone()

    def _map(self, positions: Iterable[int], label: str, normalize="default") -> HeatMap:
        normalize = self.normalize if normalize == "default" else normalize
        _check(normalize=normalize)
        positions = tuple(sorted(set(positions)))
        return HeatMap(self._normalised(self.raw(positions), normalize), label, positions, normalize)

    def _positions(self, query: str, occurrence: int | None) -> tuple[int, ...]:
        found = self.tokens.find(query, occurrence)  # KeyError listing the words and the closest match
        positions = tuple(sorted({p for w in found for p in w.tokens}))
        if not positions:
            raise KeyError(
                f"{query!r} was cut off: the prompt is longer than the tokenizer's limit of {self.tokens.max_length} "
                "tokens, so it has no map"
            )
        return positions

    def word(self, query: str, occurrence: int | None = None, *, normalize="default") -> HeatMap:
        """Map of a word or phrase (the sum of its tokens); ``occurrence`` (1-based) picks one of its repeats."""
        label = query if occurrence is None else f"{query} ({occurrence})"
        return self._map(self._positions(query, occurrence), label, normalize)

    def __getitem__(self, query: str) -> HeatMap:
        if not isinstance(query, str):
            raise TypeError(f"index heat maps by a word or phrase (str); use .token({query!r}) for a token position")
        return self.word(query)

    def token(self, position: int, *, normalize="default") -> HeatMap:
        """Map of one token position (0 is the start token; see ``maps.tokens`` for the layout)."""
        return self._map((position,), f"token {position}", normalize)

    def special(self, which: str, *, normalize="default") -> HeatMap:
        """Map of the ``"start"`` token, the ``"end"`` token or all ``"padding"`` positions together."""
        if which == "start":
            if self.tokens.prompt_start == 0:
                raise KeyError("this tokenizer puts no start token before the prompt (T5): position 0 is its first word")
            positions = (self.tokens.start_position,)
        elif which == "end":
            if self.tokens.end_count == 0:
                raise KeyError("this tokenizer puts no end token after the prompt (Gemma): padding follows it")
            positions = (self.tokens.end_position,)
        elif which == "padding":
            positions = tuple(p for p in self.tokens.padding_positions if p < self.num_tokens)
            if not positions:
                raise KeyError("the prompt fills every token position: there is no padding")
        else:
            raise KeyError(f"special token must be 'start', 'end' or 'padding'; got {which!r}")
        return self._map(positions, f"<{which}>", normalize)

    def maps(self, *, normalize="default") -> list[HeatMap]:
        """One map per word (repeats separately), in prompt order."""
        labels = self._labels()
        return [self._map(w.tokens, label, normalize) for w, label in zip(self.word_list, labels)]

    def _labels(self) -> list[str]:
        texts = [w.text for w in self.word_list]
        seen: dict[str, int] = {}
        labels = []
        for t in texts:
            seen[t.lower()] = seen.get(t.lower(), 0) + 1
            repeated = sum(x.lower() == t.lower() for x in texts) > 1
            labels.append(f"{t} ({seen[t.lower()]})" if repeated else t)
        return labels

    # ---- export ------------------------------------------------------------------------------------------
    def to_tensor(self, *, normalize="default") -> torch.Tensor:
        """All word maps stacked: (n_words, H, W) float32, in the order of :attr:`words`."""
        maps = self.maps(normalize=normalize)
        return torch.stack([m.tensor for m in maps]) if maps else torch.zeros(0, *self.size)

    def save(self, path: str | Path, *, normalize="default") -> Path:
        """Save every word map: ``.safetensors`` / ``.npz`` / ``.pt`` with keys ``"{i:02d}_{word}"`` and metadata
        (prompt, words, normalisation, size)."""
        path = Path(path)
        maps = self.maps(normalize=normalize)
        tensors = {f"{i:02d}_{w.text}": m.tensor for i, (w, m) in enumerate(zip(self.word_list, maps))}
        metadata = {
            "prompt": self.prompt,
            "words": json.dumps(self.words),
            "normalize": str(maps[0].normalize if maps else self.normalize),
            "size": json.dumps(list(self.size)),
        }
        images.save_tensors(path, tensors, metadata)
        return path

    # ---- pictures ------------------------------------------------------------------------------------------
    def grid(
        self,
        image: Any = None,
        *,
        words: Iterable[str] | None = None,
        cols: int | None = None,
        cmap: str = "jet",
        alpha: float = 0.5,
        legend: bool = True,
        normalize="default",
    ) -> "Image.Image":
        """One picture: the image (when given) and one labelled overlay per word, with a colour bar."""
        if words is None:
            maps = self.maps(normalize=normalize)
        else:
            maps = [self.word(w, normalize=normalize) for w in words]
        if not maps:
            raise ValueError("the prompt has no words to draw")
        norm, peak = maps[0].normalize, max(float(m.tensor.max()) for m in maps)
        vmax = 1.0 if norm == "word" else max(1.0, peak) if norm == "global" else peak
        cols = cols or min(len(maps) + (image is not None), 6)
        labelled = [(m.label, m.tensor) for m in maps]
        return images.heat_panels(labelled, image, vmax, cmap=cmap, alpha=alpha, legend=legend, cols=cols, show_image=True)

    def step_maps(self, query: str, occurrence: int | None = None, *, steps: Any = None) -> list[tuple[int, torch.Tensor]]:
        """Raw maps (H, W) of a word at each recorded step (``steps``: a ``steps=`` spec among them): [(step, map)]
        (needs ``per_step=True``)."""
        if self._step_levels is None:
            raise ValueError(
                "no per-step maps for these heat maps: record with pc.trace(pipe, per_step=True) for the per-step "
                "strip (per_step='level' keeps them for whole levels only, not for a choice of places, sites or heads)"
            )
        positions = self._positions(query, occurrence)
        chosen = list(self._recorded_steps) if steps is None else self._pick_steps(steps)
        missing = [s for s in chosen if s not in self._recorded_steps]
        if missing:
            raise ValueError(f"steps {missing} were not recorded; recorded steps: {self._recorded_steps}")
        return [(s, combine(self._step_levels(s), positions, self.size, self.interpolation)) for s in chosen]

    def strip(
        self,
        query: str,
        image: Any = None,
        *,
        occurrence: int | None = None,
        steps: Any = None,
        cmap: str = "jet",
        alpha: float = 0.5,
        legend: bool = True,
        cols: int | None = None,
    ) -> "Image.Image":
        """How a word's map grows over denoising: one panel per recorded step (needs ``per_step=True``).

        All panels share one scale (``normalize="word"``/``"global"``: min-max over the whole strip; ``None``:
        raw attention mass), so a map that strengthens over the steps shows it.
        """
        frames = self.step_maps(query, occurrence, steps=steps)
        stacked = torch.stack([m for _, m in frames])  # (steps, H, W)
        if self.normalize is not None:
            stacked = min_max(stacked)  # one min and max for the whole strip
        vmax = 1.0 if self.normalize is not None else max(float(stacked.max()), 1e-12)
        labelled = [(f"{query} · step {s}", m) for (s, _), m in zip(frames, stacked)]
        cols = cols or min(len(labelled), 8)
        return images.heat_panels(labelled, image, vmax, cmap=cmap, alpha=alpha, legend=legend, cols=cols, show_image=False)

    def __repr__(self) -> str:
        h, w = self.size
        return f"HeatMaps({self.prompt!r}, {h}x{w}, words={self.words}, normalize={self.normalize!r})"


# ---- from a recording ------------------------------------------------------------------------------------------
def build_heatmaps(
    recording: Recording,
    *,
    prompt: str | None = None,
    tokenizer=None,
    steps: Any = None,
    heads: Iterable[int] | None = None,
    sites: Any = None,
    weighting: str | dict[int, float] = "level",
    size: int | tuple[int, int] | None = None,
    interpolation: str = "bicubic",
    normalize: str | None = "word",
    places: Iterable[str] | None = None,
    levels: Iterable[int] | None = None,
    segment: str | None = None,
) -> HeatMaps:
    """The :class:`HeatMaps` of one recorded image, from its :class:`Recording` alone (see the module docstring).

    ``prompt``: needed when the pipeline got embeddings only (else the image's own prompt is used).
    ``steps``: a ``steps=`` spec among the recorded steps (:func:`promptcontrol.schedule.step_filter`).
    ``sites``: a ``sites=`` spec (:func:`promptcontrol.schedule.site_filter`); default every recorded site but the
    mid block's (:func:`without_mid_block`); ``sites=["down", "mid", "up"]`` takes it too. ``places`` /
    ``levels``: the old spelling of ``sites={"places": ..., "levels": ...}`` (``DeprecationWarning``).
    ``size``: output (height, width) or one int for a square; default the image's pixel size (latent size × the
    VAE's scale factor).
    ``segment`` (SD3): which text segment a word's map sums — ``"both"`` (default when a T5 encoder is loaded: its
    CLIP and its T5 tokens), ``"clip"`` (default without T5) or ``"t5"`` (an error without a T5 encoder: that
    segment is zeros); see :func:`pick_segment`.
    """
    _check(interpolation=interpolation, normalize=normalize)
    tokens = pick_segment(recording, recording.prompt_tokens(prompt, tokenizer, stacklevel=3), segment)
    sites = fold_place_level(sites, places, levels, "heatmaps", stacklevel=3)
    chosen = chosen_sites(recording, sites)
    steps = None if steps is None else recording.select_steps(steps, stacklevel=3)
    aggregated = recording_levels(recording, chosen, sites=sites, steps=steps, heads=heads, weighting=weighting)
    k = aggregated.levels[0][1].shape[0]
    joint = any(s.kind == "joint" for s in chosen)  # SD3: the CLIP tokens first, then the T5 segment's keys
    if tokens.max_length > k or (tokens.max_length != k and not joint):
        warnings.warn(
            f"the tokenizer pads to {tokens.max_length} tokens but the UNet attended over {k}; token positions "
            "may not line up",
            stacklevel=3,
        )
    return HeatMaps(
        aggregated.levels,
        tokens,
        output_size(recording, size),
        interpolation=interpolation,
        normalize=normalize,
        sites=chosen,
        steps=steps,
        image_index=recording.index,
        step_levels=aggregated.step_levels,
        recorded_steps=list(recording.steps),
        pick_steps=recording.select_steps,
    )

