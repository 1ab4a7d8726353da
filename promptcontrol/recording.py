"""``Recording``: what one recorded image holds, read by heat maps; no session, no pipeline, only tensors and facts.

The store (:class:`~promptcontrol.controllers.store.AttentionStore`) writes; ``store.recording(i)`` hands out image
``i`` as a ``Recording``, and :func:`promptcontrol.heatmap.build_heatmaps` reads nothing else. A test can build one
from tensors it writes itself. Shapes (K: token positions, (h, w): a site's grid, (h', w'): after the store's
``max_side`` cap, Q = h·w queries in row-major order):

    sums[key]                 (Q, K) float32: attention summed over the recorded steps and heads
    counts[key]               how many (step × head) maps went into ``sums[key]``
    head_sums[key]            (heads, K, h', w') float32: summed over steps, per head (``per_head``)
    head_counts[key]          how many steps went into ``head_sums[key]``
    step_maps[step][key]      (K, h', w'): one step's map, mean over heads (``per_step="site"``)
    level_steps[step][level]  (K, h', w'): one step's mean over heads and the level's sites (``per_step="level"``)
    level_sites[level]        how many sites went into each level map

Also here: the old spellings of the ``steps=`` / ``sites=`` vocabulary that the store, ``pc.trace`` and heat maps
still take for one release (``places=``, ``levels=``, a tuple of step indices), each with a ``DeprecationWarning``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .context import BatchLayout, StepContext
from .schedule import site_filter, step_filter
from .sites import AttentionSite
from .tokens import PromptTokens, SegmentedTokenizer, tokenize

PER_STEP = (None, "site", "level")
_ONE_ROW = BatchLayout(cond_rows=(0,), uncond_rows=(), prompt_of_row=(0,), image_of_row=(0,))


def to_grid(maps: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """``maps`` (..., Q, K) → (..., K, h, w)."""
    *lead, q, k = maps.shape
    return maps.transpose(-1, -2).reshape(*lead, k, hw[0], hw[1])


# ---- old spellings, kept for one release ----------------------------------------------------------------------
def old_step_tuple(spec: Any, what: str = "steps", stacklevel: int = 2) -> Any:
    """A tuple of step indices still means exactly those steps (as a list), with a ``DeprecationWarning``; any
    other spec is returned as it is. ``stacklevel`` counts from the caller of this function."""
    if not (isinstance(spec, tuple) and spec and all(isinstance(s, int) and not isinstance(s, bool) for s in spec)):
        return spec
    warnings.warn(
        f"{what}={spec!r}: a tuple of step indices still means exactly those steps, for one release; pass a list "
        f"({what}={list(spec)!r}). A tuple will mean the window start <= step < end, as in pc.Reweight",
        DeprecationWarning,
        stacklevel=stacklevel + 1,
    )
    return list(spec)


def fold_place_level(sites: Any, places: Any, levels: Any, owner: str, stacklevel: int = 2) -> Any:
    """The old ``places=`` / ``levels=`` options folded into one ``sites=`` spec, with a ``DeprecationWarning``.

    ``sites`` None or a dict: the dict gains ``places`` / ``levels``; any other ``sites`` (names, a function):
    a function that asks both. ``stacklevel`` counts from the caller of this function.
    """
    old = {key: value for key, value in (("places", places), ("levels", levels)) if value is not None}
    if not old:
        return sites
    warnings.warn(
        f"{owner}: {' and '.join(f'{k}=' for k in old)} is the old spelling; pass sites={old!r} "
        "(the one sites= vocabulary, promptcontrol.schedule.site_filter; the old keywords work for one more release)",
        DeprecationWarning,
        stacklevel=stacklevel + 1,
    )
    if sites is None:
        return old
    if isinstance(sites, Mapping):
        both = sorted(set(old) & {k for k, v in sites.items() if v is not None})
        if both:
            raise ValueError(f"{owner}: {', '.join(both)} given both as keywords and in sites=; give them in sites= only")
        return {**sites, **old}
    by_old, by_new = site_filter(old), site_filter(sites)
    return lambda site: by_old(site) and by_new(site)


# ---- words ----------------------------------------------------------------------------------------------------
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


# ---- the read API ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recording:
    """One recorded image: its prompt, the sites and steps recorded and their maps (shapes in the module docstring).

    sites:        the recorded cross-attention sites, in the denoiser's order
    grids:        each site's (h, w); ``latent_hw``: the latent's (h, w) (the grid of level 0)
    steps:        the recorded step indices; ``timesteps[step]`` the scheduler's value; ``total`` the run's length
    prompt:       the image's prompt (``None`` when the pipeline got embeddings only); ``prompt_3``: SD3's T5
                  prompt when given; ``prompt_2``: SDXL's second
    tokenizer:    the session's tokenizer (``None`` on a bare denoiser)
    scale_factor: pixels per latent cell (the VAE's scale factor)
    index:        the image's index in its store
    per_step:     how step maps were kept: ``None``, ``"site"`` or ``"level"``; ``per_head``: whether heads were
    """

    sites: tuple[AttentionSite, ...]
    grids: Mapping[str, tuple[int, int]]
    sums: Mapping[str, torch.Tensor]
    counts: Mapping[str, int]
    latent_hw: tuple[int, int]
    steps: tuple[int, ...]
    prompt: str | None = None
    prompt_2: str | None = None
    prompt_3: str | None = None  # SD3's T5 prompt, when the call gave one
    tokenizer: Any = None
    scale_factor: int = 8
    index: int = 0
    total: int | None = None
    timesteps: Mapping[int, float] = field(default_factory=dict)
    per_step: str | None = None
    step_maps: Mapping[int, Mapping[str, torch.Tensor]] = field(default_factory=dict)
    level_steps: Mapping[int, Mapping[int, torch.Tensor]] = field(default_factory=dict)
    level_sites: Mapping[int, int] = field(default_factory=dict)
    per_head: bool = False
    head_sums: Mapping[str, torch.Tensor] = field(default_factory=dict)
    head_counts: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if self.per_step not in PER_STEP:
            raise ValueError(f"Recording: per_step must be None, 'site' or 'level'; got {self.per_step!r}")
        for site in self.sites:
            key = site.key
            if key not in self.sums or key not in self.counts or key not in self.grids:
                raise ValueError(f"Recording: site {key} needs sums[key], counts[key] and grids[key]")
            h, w = self.grids[key]
            if self.sums[key].ndim != 2 or self.sums[key].shape[0] != h * w:
                raise ValueError(
                    f"Recording: sums[{key!r}] must be (h·w, K) = ({h * w}, K) for grid {(h, w)}; "
                    f"got {tuple(self.sums[key].shape)}"
                )

    @property
    def num_tokens(self) -> int:
        """K: the token positions the sites attended over."""
        return int(next(iter(self.sums.values())).shape[-1])

    def _text_length(self) -> int | None:
        """The text's sequence length when every recorded site's text keys are one tokenizer's tokens (cross-attention,
        Flux's joint attention: a pipeline's ``max_sequence_length`` on PixArt / Sana / Flux, 77 on CLIP UNets); ``None`` (the tokenizer's
        ``model_max_length``) otherwise."""
        if self.sums and all(site.kind == "cross" or site.text_keys == "before" for site in self.sites):
            return self.num_tokens  # cross-attention, or Flux's joint attention (its keys: the T5 tokens alone)
        return None

    def prompt_tokens(self, prompt: str | None = None, tokenizer: Any = None, stacklevel: int = 2) -> PromptTokens:
        """The tokens the word maps follow: the image's prompt (or ``prompt``, the text embeddings were made from)
        by its tokenizer (or ``tokenizer``); on SD3 with T5 (a :class:`~promptcontrol.tokens.SegmentedTokenizer`)
        both segments, the T5 one as long as the recorded keys leave it. Warns when the token limit cut words (per
        segment) and when SDXL's ``prompt_2`` differed; ``stacklevel`` counts from the caller of this method."""
        text = prompt if prompt is not None else self.prompt
        if text is None:
            raise ValueError(
                f"image {self.index} was generated from prompt embeddings, so its prompt is unknown: "
                "pass heatmaps(prompt='...') with the text the embeddings were made from"
            )
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is None:
            raise ValueError("no tokenizer: pass heatmaps(tokenizer=...) (a bare UNet session has none of its own)")
        if isinstance(tokenizer, SegmentedTokenizer):  # SD3 with T5: [CLIP 77 | T5 max_sequence_length] keys
            tokens = tokenizer.tokenize(text, text_length=self.num_tokens if self.sums else None)
            for segment in tokens.segments:
                if segment.tokens.truncated:
                    message = truncation_message(segment.tokens)
                    warnings.warn(f"{segment.name} segment: {message}", stacklevel=stacklevel + 1)
        else:
            tokens = tokenize(tokenizer, text, max_length=self._text_length())
            if tokens.truncated:
                warnings.warn(truncation_message(tokens), stacklevel=stacklevel + 1)
        if self.prompt_2 is not None and prompt is None and self.prompt_2 != self.prompt:
            warnings.warn(
                "this SDXL image had a different prompt_2; its token positions mix both prompts, and the word maps "
                "follow the first prompt's tokenization",
                stacklevel=stacklevel + 1,
            )
        if self.prompt_3 is not None and prompt is None and self.prompt_3 != self.prompt and hasattr(tokens, "segments"):
            warnings.warn(
                f"this SD3 image had a different prompt_3 ({self.prompt_3!r}) for its T5 encoder; the T5 segment's "
                "word positions follow prompt's tokens, so T5 word maps may be off: use segment='clip', or call the "
                "pipeline with prompt_3 equal to prompt",
                stacklevel=stacklevel + 1,
            )
        return tokens

    def sites_for(self, spec: Any) -> list[AttentionSite]:
        """The recorded sites a ``sites=`` spec picks (:func:`promptcontrol.schedule.site_filter`), in order."""
        keep = site_filter(spec)
        return [s for s in self.sites if keep(s)]

    def select_steps(self, spec: Any, stacklevel: int = 2) -> list[int]:
        """The step indices a ``steps=`` spec names (:func:`promptcontrol.schedule.step_filter`): a list / range /
        set exactly (whether they were recorded is checked by the read), a window or a function among the
        recorded steps. A tuple of ints still means exact steps for one release (``DeprecationWarning``)."""
        spec = old_step_tuple(spec, stacklevel=stacklevel + 1)
        keep = step_filter(spec)
        if isinstance(spec, (list, range)):
            return list(spec)
        if isinstance(spec, (set, frozenset)):
            return sorted(spec)
        chosen = [s for s in self.steps if keep(self._context(s))]
        if not chosen:
            raise ValueError(f"steps={spec!r} selects none of the recorded steps {list(self.steps)}")
        return chosen

    def _context(self, step: int) -> StepContext:
        """The facts of a recorded step that a ``steps=`` filter may read (index, timestep, total)."""
        timestep = self.timesteps.get(step, float("nan"))
        return StepContext(step, timestep, self.total, tuple(self.latent_hw), _ONE_ROW)

    def site_map(self, site: AttentionSite | str, *, steps: Any = None, heads: Any = None) -> torch.Tensor:
        """Mean attention map (K, h, w) float32 at ``site`` (a site or its key), over recorded steps and heads.

        Every spatial position's values sum to 1 over the K tokens (a mean of softmax rows). ``steps`` needs
        ``per_step="site"`` and ``heads`` needs ``per_head`` (those maps are at the capped resolution).
        """
        key = site if isinstance(site, str) else site.key
        if key not in self.sums:
            recorded = ", ".join(s.module_path for s in self.sites) or "none"
            raise KeyError(f"no data for site {key} in image {self.index}; recorded sites: {recorded}")
        if steps is not None and heads is not None:
            raise ValueError("choose steps or heads, not both: per-step maps are kept as the mean over heads")
        if steps is not None:
            return self._steps_mean(key, steps)
        if heads is not None:
            return self._heads_mean(key, heads)
        mean = self.sums[key] / self.counts[key]  # (Q, K)
        return to_grid(mean.float(), self.grids[key])

    def _steps_mean(self, key: str, steps: Any) -> torch.Tensor:
        if self.per_step == "level":
            raise ValueError(
                "per-step maps were kept per level (per_step='level'): use level_map(level, steps) or record with "
                "per_step=True to keep them per site"
            )
        if not self.per_step:
            raise ValueError(
                "selecting steps after the run needs per-step maps: record with pc.trace(pipe, per_step=True) "
                "(or choose the steps when recording: pc.trace(pipe, steps=range(...)))"
            )
        steps = self.select_steps(steps, stacklevel=4)
        missing = [s for s in steps if s not in self.step_maps or key not in self.step_maps[s]]
        if missing or not steps:
            raise ValueError(f"steps {missing or steps} were not recorded; recorded steps: {list(self.steps)}")
        return torch.stack([self.step_maps[s][key].float() for s in steps]).mean(dim=0)  # (K, h', w')

    def _heads_mean(self, key: str, heads: Any) -> torch.Tensor:
        if not self.per_head:
            raise ValueError("selecting heads needs per-head maps: record with pc.trace(pipe, per_head=True)")
        heads = list(heads)
        total = self.head_sums[key].shape[0]
        bad = [h for h in heads if not 0 <= h < total]
        if bad or not heads:
            raise ValueError(f"heads {bad or heads} out of range: site {key} has heads 0..{total - 1}")
        return self.head_sums[key][heads].mean(dim=0) / self.head_counts[key]  # (K, h', w')

    def level_map(self, level: int, steps: Any) -> torch.Tensor:
        """Mean map (K, h', w') float32 at ``level`` over ``steps``, from per-level step maps (``per_step="level"``)."""
        if self.per_step != "level":
            raise ValueError("level_map needs per-step maps kept per level: record with per_step='level'")
        steps = self.select_steps(steps)
        missing = [s for s in steps if level not in self.level_steps.get(s, {})]
        if missing or not steps:
            raise ValueError(
                f"steps {missing or steps} were not recorded at level {level}; recorded steps: {list(self.steps)}"
            )
        return torch.stack([self.level_steps[s][level].float() for s in steps]).mean(dim=0)

    def __repr__(self) -> str:
        return (
            f"Recording(image {self.index}, prompt={self.prompt!r}, {len(self.sites)} sites, steps={list(self.steps)}, "
            f"per_step={self.per_step!r}, per_head={self.per_head})"
        )
