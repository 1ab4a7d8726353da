"""Per-word heat maps from recorded cross-attention: aggregation, upsampling, normalisation, pictures, export.

How a word's map is made (every step is a parameter of :func:`build_heatmaps` / ``tr.heatmaps``):

1. **Per site**: the mean of the recorded attention maps over steps and heads (``(K, h, w)``; at every position the
   K token values sum to 1). ``steps=`` (needs ``per_step=True``) and ``heads=`` (needs ``per_head=True``) restrict
   the mean; ``places=``, ``levels=`` and ``sites=`` choose the sites. By default every recorded site but the mid
   block's (as DAAM, whose hooks skip it): on the embedded model its colour-word maps are poor (see
   ``docs/inspect.md``). It stays when nothing else was recorded, when ``places=``/``sites=`` name it, and for
   ``per_step="level"`` recordings (whose per-step maps mix every site of a level).
2. **Per level** (resolution): the plain mean of the site maps of that level, at the level's own resolution.
3. **Across levels**: each level's map is upsampled to the output size and the levels are averaged with weights
   set by ``weighting``: ``"level"`` (default) — every level counts the same, so SDXL's sixty 32×32 layers do not
   outvote its ten 64×64 ones; ``"resolution"`` — weight ∝ the level's grid h·w, i.e. 4^-level (favours the
   sharp maps); ``"layer"`` — every site counts the same; or a ``{level: weight}`` dict. Weights are normalised to
   sum to 1. (DAAM 0.2 averages every (site, head) pair: ``{level: heads summed over the level's sites}``.)
4. **Word**: the sum of the token maps of the word's token positions (a multi-token word such as
   "photorealistic" is the union of its pieces; a phrase the union of its words; a repeated word all its
   occurrences unless ``occurrence=`` picks one). Each token is upsampled on its own, so a word's map is exactly
   the sum of its tokens' maps.
5. **Upsampling**: ``torch.nn.functional.interpolate`` to the image's pixel size (height × width, any aspect),
   ``interpolation="bicubic"`` (default, as DAAM; sharper; each token map clamped at 0) or ``"bilinear"`` (a convex
   mix: the token values still sum to 1 at every pixel), ``align_corners=False``.
6. **Normalisation** ``normalize=``: ``"word"`` (default) — each map min-max scaled to [0, 1] on its own;
   ``"global"`` — every map divided by the largest value over the prompt's word maps, so words can be compared
   (0 stays 0; a phrase, being a sum of words, can exceed 1); ``None`` — the raw attention mass (mean
   probability summed over the word's tokens, in [0, 1]).

The start token, the end token and the padding are never part of a word; ask for them with
:meth:`HeatMaps.special` or :meth:`HeatMaps.token`.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from .sites import AttentionSite
from .tokens import PromptTokens, Word, tokenize

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from .controllers.store import AttentionStore

NORMALIZE = ("word", "global", None)
INTERPOLATION = ("bilinear", "bicubic")
WEIGHTING = ("level", "resolution", "layer")
Level = tuple[float, torch.Tensor]  # (weight, (K, h, w) float32)


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
    if interpolation not in INTERPOLATION:
        raise ValueError(f"interpolation must be one of {INTERPOLATION}; got {interpolation!r}")
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    out = F.interpolate(maps[None].float(), size=tuple(size), mode=interpolation, align_corners=False)[0]
    return out.clamp_min(0) if interpolation == "bicubic" else out


def combine(levels: list[Level], positions: Iterable[int], size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Raw map (H, W): sum over levels of weight × the sum of the upsampled token maps at ``positions``."""
    positions = list(positions)
    out = torch.zeros(size, dtype=torch.float32)
    for weight, m in levels:
        out += weight * upsample(m[positions], size, interpolation).sum(dim=0)  # (n, H, W) -> (H, W)
    return out


def min_max(m: torch.Tensor) -> torch.Tensor:
    """``m`` scaled to [0, 1] by its own minimum and maximum (a constant map gives zeros)."""
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)


# ---- pictures ----------------------------------------------------------------------------------------------
def _image_array(image: Any) -> np.ndarray:
    """An image (PIL, HWC uint8/float array, CHW/HWC tensor) as float32 RGB (H, W, 3) in [0, 1]."""
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    arr = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image (PIL, H×W×3 array or tensor); got shape {arr.shape}")
    arr = arr[..., :3].astype(np.float32)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.max() > 1.0:
        arr = arr / 255.0
    return np.clip(arr, 0.0, 1.0)


def _colour(heat: np.ndarray, cmap: str, vmin: float, vmax: float) -> np.ndarray:
    import matplotlib

    scaled = np.clip((heat - vmin) / (vmax - vmin), 0.0, 1.0) if vmax > vmin else np.zeros_like(heat)
    return matplotlib.colormaps[cmap](scaled)[..., :3].astype(np.float32)


def _resize(heat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return upsample(heat[None], size, "bilinear")[0] if tuple(heat.shape) != tuple(size) else heat


def _blend(heat: torch.Tensor, image: Any, cmap: str, alpha: float, vmin: float, vmax: float) -> np.ndarray:
    """RGB (H, W, 3) in [0, 1]: the colour-mapped heat over the image (or alone when ``image`` is None)."""
    if image is None:
        return _colour(heat.numpy(), cmap, vmin, vmax)
    base = _image_array(image)
    heat = _resize(heat, base.shape[:2])
    return (1.0 - alpha) * base + alpha * _colour(heat.numpy(), cmap, vmin, vmax)


def _to_pil(rgb: np.ndarray) -> "Image.Image":
    from PIL import Image

    return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))


def _figure_to_pil(fig) -> "Image.Image":
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def _panels(
    panels: list[tuple[str, np.ndarray]], cmap: str, vmin: float, vmax: float, legend: bool, cols: int | None
) -> "Image.Image":
    """One picture of labelled panels (RGB arrays) in a grid, with a colour bar for the heat scale."""
    from matplotlib import cm, colors
    from matplotlib.figure import Figure

    n = len(panels)
    cols = max(1, min(cols or n, n))
    rows = math.ceil(n / cols)
    h, w = panels[0][1].shape[:2]
    cell = 2.0
    aspect = w / h
    fig = Figure(figsize=(cols * cell * aspect + (0.8 if legend else 0.0), rows * (cell + 0.35)), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            label, rgb = panels[i]
            ax.imshow(rgb, interpolation="nearest")
            ax.set_title(label, fontsize=9)
    if legend:
        mappable = cm.ScalarMappable(norm=colors.Normalize(vmin=vmin, vmax=vmax), cmap=cmap)
        fig.colorbar(mappable, ax=axes.ravel().tolist(), fraction=0.04, pad=0.02)
    return _figure_to_pil(fig)


# ---- export ------------------------------------------------------------------------------------------------
def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    elif suffix == ".npz":
        arrays = {k: v.numpy() for k, v in tensors.items()}
        np.savez(path, **arrays, **{f"meta_{k}": np.array(v) for k, v in metadata.items()})
    elif suffix == ".npy" and len(tensors) == 1:
        np.save(path, next(iter(tensors.values())).numpy())
    elif suffix == ".pt":
        torch.save({"maps": tensors, "metadata": metadata}, path)
    else:
        raise ValueError(f"cannot save heat maps as {suffix or 'a file without suffix'}: use .safetensors, .npz, .pt or .png")


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

    def _range(self) -> tuple[float, float]:
        """Colour scale (vmin, vmax): [0, 1] for normalised maps (wider if a global-scaled phrase exceeds 1)."""
        peak = float(self.tensor.max())
        if self.normalize == "word":
            return 0.0, 1.0
        if self.normalize == "global":
            return 0.0, max(1.0, peak)
        return 0.0, max(peak, 1e-12)

    def overlay(self, image: Any = None, *, cmap: str = "jet", alpha: float = 0.5, legend: bool = False) -> "Image.Image":
        """The map in colour over ``image`` (PIL / array / tensor; resized to the image), or alone without one.

        ``legend=False`` gives a picture of exactly the image's size; ``legend=True`` a labelled figure with a
        colour bar.
        """
        vmin, vmax = self._range()
        rgb = _blend(self.tensor, image, cmap, alpha, vmin, vmax)
        if not legend:
            return _to_pil(rgb)
        return _panels([(self.label, rgb)], cmap, vmin, vmax, True, 1)

    def save(self, path: str | Path, image: Any = None, **overlay_options) -> Path:
        """Save as a picture (``.png``/``.jpg``: :meth:`overlay`) or as data (``.safetensors``, ``.npz``, ``.npy``, ``.pt``)."""
        path = Path(path)
        if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
            self.overlay(image, **overlay_options).save(path)
        else:
            _save_tensors(path, {"map": self.tensor}, {"label": self.label, "normalize": str(self.normalize)})
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
    ):
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be 'word', 'global' or None; got {normalize!r}")
        if interpolation not in INTERPOLATION:
            raise ValueError(f"interpolation must be one of {INTERPOLATION}; got {interpolation!r}")
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
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be 'word', 'global' or None; got {normalize!r}")
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
            positions = (self.tokens.start_position,)
        elif which == "end":
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
        _save_tensors(path, tensors, metadata)
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
        norm = maps[0].normalize
        vmax = 1.0 if norm is not None else max(float(m.tensor.max()) for m in maps)
        if norm == "global":
            vmax = max(1.0, max(float(m.tensor.max()) for m in maps))
        panels = [] if image is None else [("image", _image_array(image))]
        base = panels[0][1] if panels else None
        for m in maps:
            panels.append((m.label, _blend(m.tensor, base, cmap, alpha, 0.0, vmax)))
        return _panels(panels, cmap, 0.0, vmax, legend, cols or min(len(panels), 6))

    def step_maps(self, query: str, occurrence: int | None = None, *, steps: Iterable[int] | None = None) -> list[tuple[int, torch.Tensor]]:
        """Raw maps (H, W) of a word at each recorded step: [(step, map)] (needs ``per_step=True``)."""
        if self._step_levels is None:
            raise ValueError(
                "no per-step maps for these heat maps: record with pc.trace(pipe, per_step=True) for the per-step "
                "strip (per_step='level' keeps them for whole levels only, not for a choice of places, sites or heads)"
            )
        positions = self._positions(query, occurrence)
        chosen = list(self._recorded_steps if steps is None else steps)
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
        steps: Iterable[int] | None = None,
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
        base = None if image is None else _image_array(image)
        panels = [(f"{query} · step {s}", _blend(m, base, cmap, alpha, 0.0, vmax)) for (s, _), m in zip(frames, stacked)]
        return _panels(panels, cmap, 0.0, vmax, legend, cols or min(len(panels), 8))

    def __repr__(self) -> str:
        h, w = self.size
        return f"HeatMaps({self.prompt!r}, {h}x{w}, words={self.words}, normalize={self.normalize!r})"


# ---- from a store --------------------------------------------------------------------------------------------
def _site_selection(sites, places, levels) -> Callable[[AttentionSite], bool]:
    names = None if sites is None or callable(sites) else ({sites} if isinstance(sites, str) else set(sites))

    def keep(site: AttentionSite) -> bool:
        if places is not None and site.place not in places:
            return False
        if levels is not None and site.level not in levels:
            return False
        if names is not None:
            return site.key in names or site.module_path in names
        if callable(sites):
            return bool(sites(site))
        return True

    return keep


def without_mid_block(sites: list[AttentionSite]) -> list[AttentionSite]:
    """The default site choice: ``sites`` but the mid block's, unless the mid block is all there is."""
    rest = [s for s in sites if s.place != "mid"]
    return rest or sites


def _level_step_maps(store, index: int, chosen: list[AttentionSite], steps: list[int], weighting) -> list[Level]:
    """Levels from per-level step maps (``per_step="level"``): each level's stored mean, weighted as usual."""
    groups: dict[int, list[torch.Tensor]] = {}
    for site in chosen:
        groups.setdefault(site.level, [])
    for level in groups:
        m = store.level_map(index, level, steps)
        n = store.image(index).run.level_sites.get(level, 1)
        groups[level] = [m] * n  # the same mean once per site, so that weighting="layer" counts sites
    weights = level_weights(groups, weighting)
    return [(weights[lv], maps[0]) for lv, maps in sorted(groups.items()) if weights[lv] > 0]


def _listing(words: Iterable[str]) -> str:
    """Each text once (first spelling, ignoring case), quoted, in prompt order."""
    unique: dict[str, str] = {}
    for w in words:
        unique.setdefault(w.lower(), w)
    return ", ".join(repr(w) for w in unique.values())


def truncation_message(tokens: PromptTokens) -> str:
    """What the token limit cut from a prompt's maps: words with no token left (no map), later occurrences of
    words that keep a map, and words cut partly (their map holds only the tokens before the limit)."""
    mapped = {w.text.lower() for w in tokens.words if w.tokens}
    gone = [w.text for w in tokens.truncated if not w.tokens and w.text.lower() not in mapped]
    repeats = [w.text for w in tokens.truncated if not w.tokens and w.text.lower() in mapped]
    partly = [w.text for w in tokens.truncated if w.tokens]
    parts = []
    if gone:
        parts.append(f"the words cut off have no map: {_listing(gone)}")
    if repeats:
        parts.append(f"occurrences past the limit are not in the maps of {_listing(repeats)} (their earlier ones are)")
    if partly:
        parts.append(f"cut partly, mapped by their tokens before the limit only: {_listing(partly)}")
    return f"the prompt is longer than the tokenizer's limit of {tokens.max_length} tokens; " + "; ".join(parts)


def build_heatmaps(
    store: "AttentionStore",
    image_index: int = 0,
    *,
    prompt: str | None = None,
    tokenizer=None,
    steps: Iterable[int] | None = None,
    heads: Iterable[int] | None = None,
    places: Iterable[str] | None = None,
    levels: Iterable[int] | None = None,
    sites=None,
    weighting: str | dict[int, float] = "level",
    size: int | tuple[int, int] | None = None,
    interpolation: str = "bicubic",
    normalize: str | None = "word",
) -> HeatMaps:
    """The :class:`HeatMaps` of recorded image ``image_index`` (see the module docstring for each choice).

    ``prompt``: needed when the pipeline got embeddings only (else the image's own prompt is used).
    ``places`` / ``sites``: default every recorded site but the mid block's (:func:`without_mid_block`);
    ``places=("down", "mid", "up")`` takes it too. ``size``: output (height, width) or one int for a square;
    default the image's pixel size (latent size × the VAE's scale factor).
    """
    image = store.image(image_index)
    if interpolation not in INTERPOLATION:
        raise ValueError(f"interpolation must be one of {INTERPOLATION}; got {interpolation!r}")
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be 'word', 'global' or None; got {normalize!r}")
    text = prompt if prompt is not None else image.prompt
    if text is None:
        raise ValueError(
            f"image {image.index} was generated from prompt embeddings, so its prompt is unknown: "
            "pass heatmaps(prompt='...') with the text the embeddings were made from"
        )
    tokenizer = tokenizer if tokenizer is not None else store.tokenizer
    if tokenizer is None:
        raise ValueError("no tokenizer: pass heatmaps(tokenizer=...) (a bare UNet session has none of its own)")
    tokens = tokenize(tokenizer, text)
    if tokens.truncated:
        warnings.warn(truncation_message(tokens), stacklevel=3)
    if image.prompt_2 is not None and prompt is None and image.prompt_2 != image.prompt:
        warnings.warn(
            "this SDXL image had a different prompt_2; its token positions mix both prompts, and the word maps "
            "follow the first prompt's tokenization",
            stacklevel=3,
        )
    keep = _site_selection(sites, None if places is None else tuple(places), None if levels is None else tuple(levels))
    chosen = [s for s in store.recorded_sites(image.index) if keep(s)]
    if places is None and sites is None and store.per_step != "level":
        chosen = without_mid_block(chosen)
    if not chosen:
        recorded = sorted({(s.place, s.level) for s in store.recorded_sites(image.index)})
        raise ValueError(f"no recorded site matches places={places}, levels={levels}, sites={sites}; recorded (place, level): {recorded}")
    steps = None if steps is None else list(steps)
    # per-level step maps mix every recorded site of a level: a choice of places/sites cannot apply to them
    by_level = store.per_step == "level" and places is None and sites is None
    if steps is not None and store.per_step == "level" and not by_level:
        raise ValueError(
            "per-step maps were kept per level (per_step='level'), so steps= cannot be combined with places= or "
            "sites=; choose places/sites when recording (pc.trace(pipe, places=...)) or use per_step=True"
        )
    if by_level and steps is not None:
        levels_ = _level_step_maps(store, image.index, chosen, steps, weighting)
    else:
        site_maps = [(s, store.site_map(image.index, s, steps=steps, heads=heads)) for s in chosen]
        levels_ = aggregate(site_maps, weighting)
    k = levels_[0][1].shape[0]
    if tokens.max_length != k:
        warnings.warn(
            f"the tokenizer pads to {tokens.max_length} tokens but the UNet attended over {k}; token positions "
            "may not line up",
            stacklevel=3,
        )
    if size is None:
        h, w = image.latent_hw
        size = (h * store.scale_factor, w * store.scale_factor)
    elif isinstance(size, int):
        size = (size, size)
    step_levels = None
    recorded_steps = image.run.steps
    if store.per_step == "site" and heads is None:

        def step_levels(step: int) -> list[Level]:
            return aggregate([(s, store.site_map(image.index, s, steps=[step])) for s in chosen], weighting)

    elif by_level and heads is None:

        def step_levels(step: int) -> list[Level]:
            return _level_step_maps(store, image.index, chosen, [step], weighting)

    return HeatMaps(
        levels_,
        tokens,
        size,
        interpolation=interpolation,
        normalize=normalize,
        sites=chosen,
        steps=steps,
        image_index=image.index,
        step_levels=step_levels,
        recorded_steps=recorded_steps,
    )
