"""``Reweight``: per-word weights in cross-attention (prompt-to-prompt's equalizer, a renormalised variant, A1111).

Three ways to weight a word ``w`` times, all on the conditional rows of the prompt that holds the word (the
unconditional rows stay as they are, as in prompt-to-prompt, unless ``negative=`` weights the negative prompt):

* ``"attention"`` (default) — the P2P equalizer: post-softmax probabilities of the word's tokens times ``w``,
  *not* renormalised (negative weights allowed). Fused: ``sdpa(q, k, v * w[token])`` since
  ``(P * w) @ V = P @ (w * V)``.
* ``"softmax"`` — renormalised: ``softmax(logits + log w)``; fused as an additive SDPA mask ``log w``
  (weights must be ≥ 0; 0 removes the token).
* ``"embedding"`` — AUTOMATIC1111's emphasis: each token's text feature times ``w``, then the whole row
  rescaled so its mean is the original mean (per text encoder for SDXL). Acts on the UNet's text input
  (``transform_context``), so every cross-attention layer sees it.

Weights are resolved to token positions once per run (at the first step, from the prompts the pipeline was
called with and the session's tokenizer) and kept in tensors ``(B, K)`` built once per run, so per-layer work
is one multiply of V (or one added mask) and changing the weights never changes a traced graph's shapes.

SD3 with its T5 encoder: the text keys are [CLIP 77 | T5 ``max_sequence_length``], and a weighted word's positions
are its tokens in both segments (the tensors span the whole text length). Token-position keys are positions of
the whole text keys (77 is T5's first token); without a T5 encoder positions past CLIP's are refused (zeros).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch

from ..context import SessionView, StepContext
from ..plan import AttentionPlan
from ..schedule import site_filter, step_filter
from ..sites import AttentionSite
from ..tokens import (
    PromptTokens, SegmentedTokenizer, SegmentedTokens, has_t5_segment, no_t5_message, t5_loaded, tokenize,
)
from .base import Controller

MODES = ("attention", "softmax", "embedding")
JOINT_EMBEDDING_WARNING = (
    "Reweight mode='embedding' on joint attention (SD3 / SD3.5 / Flux): the text stream enters every block through "
    "a LayerNorm (norm1_context after the linear context_embedder), which removes a per-token scale but for the "
    "embedder bias's share, so this mode barely changes the image (measured on toy-sd3: no colour rises; "
    "docs/embedded-model.md). Use mode='attention' or 'softmax' there"
)

Key = Union[str, int, tuple]  # a word/phrase, a token position, or (word, occurrence)
Weights = Mapping[Key, float]


# ---- argument checks --------------------------------------------------------------------------------------
def _check_key(key: Any) -> Key:
    if isinstance(key, bool):
        raise TypeError(f"Reweight: {key!r} is not a word or a token position")
    if isinstance(key, int):
        if key < 0:
            raise ValueError(f"Reweight: token position {key} is negative; positions start at 0 (the start token)")
        return key
    if isinstance(key, str):
        if not key.strip():
            raise ValueError("Reweight: an empty word was given a weight")
        return key
    if (
        isinstance(key, tuple)
        and len(key) == 2
        and isinstance(key[0], str)
        and isinstance(key[1], int)
        and not isinstance(key[1], bool)
    ):
        if key[1] < 1:
            raise ValueError(f"Reweight: occurrence {key[1]} of {key[0]!r} must be 1 or more (1 = first)")
        return key
    raise TypeError(
        f"Reweight: weights are keyed by a word or phrase (str), a token position (int) or (word, occurrence); "
        f"got {type(key).__name__}: {key!r}"
    )


def _describe(key: Key) -> str:
    """How a weight's key reads in a message: ``token position 2``, ``'red'``, ``'a' (occurrence 2)``."""
    if isinstance(key, int):
        return f"token position {key}"
    if isinstance(key, tuple):
        return f"{key[0]!r} (occurrence {key[1]})"
    return repr(key)


def _check_weight(key: Key, value: Any, mode: str) -> float:
    name = _describe(key)
    if isinstance(value, (str, bytes, bool)) or not hasattr(value, "__float__"):
        raise TypeError(f"Reweight: the weight of {name} must be a number, got {type(value).__name__}: {value!r}")
    try:
        weight = float(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"Reweight: the weight of {name} must be a single number, got {value!r}") from error
    if not math.isfinite(weight):
        raise ValueError(f"Reweight: the weight of {name} is {weight}; weights must be finite numbers")
    if mode == "softmax" and weight < 0:
        raise ValueError(
            f"Reweight: the weight of {name} is {weight}, but mode='softmax' adds log(weight) to the logits and "
            "needs weights >= 0; use mode='attention' for negative weights"
        )
    return weight


def _check_weights(weights: Any, mode: str) -> tuple[bool, list[dict[Key, float]]]:
    """(per_prompt, [weights]) — one dict for every prompt, or one dict per prompt index."""
    if isinstance(weights, Mapping):
        return False, [{_check_key(k): _check_weight(k, v, mode) for k, v in weights.items()}]
    if isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)):
        if not weights:
            raise ValueError("Reweight: an empty list of per-prompt weights; give one dict per prompt")
        per_prompt = []
        for i, item in enumerate(weights):
            if item is None:
                item = {}
            if not isinstance(item, Mapping):
                raise TypeError(f"Reweight: per-prompt weights must be dicts; item {i} is {type(item).__name__}")
            per_prompt.append({_check_key(k): _check_weight(k, v, mode) for k, v in item.items()})
        return True, per_prompt
    raise TypeError(
        "Reweight: weights must be a dict {word or token position: weight} or a list of such dicts, one per "
        f"prompt of the batch; got {type(weights).__name__}"
    )


# ---- the controller ---------------------------------------------------------------------------------------
class Reweight(Controller):
    """Weight words of the prompt in cross-attention (see the module docstring for the three modes).

    ``weights``: ``{word or phrase: w}``, ``{token position: w}``, ``{(word, occurrence): w}`` (occurrence 1 =
    first), or a list of such dicts, one per prompt index of the batch (``[{}, {"green": 1.5}]`` weights only the
    second prompt). A word or phrase means every occurrence of it; a single dict applies to every prompt and each
    of its words must be in each prompt. Words are found in the pipeline's ``prompt`` (SDXL: token positions
    are shared by both text encoders, so a different ``prompt_2`` is weighted at the same positions).
    ``steps`` and ``sites`` are the vocabulary of every controller (:func:`promptcontrol.schedule.step_filter`,
    :func:`promptcontrol.schedule.site_filter`). ``steps``: ``None`` (all), ``(start, end)`` fractions (floats) or
    step indices (ints, end excluded), a list of step indices, or a callable on the
    :class:`~promptcontrol.context.StepContext`. ``sites``: ``None``, a place, module paths or patterns, a list of
    those, a dict (``places``, ``levels``, ``blocks``, ...) or a callable on :class:`~promptcontrol.sites.AttentionSite`
    (not for ``mode="embedding"``, which acts on the UNet's text input); only cross-attention sites are weighted.

    ``negative``: weights for the *unconditional* rows (the negative prompt), as ``{token position: w}`` or a
    list of them per prompt index — token positions only, since the session does not see the negative prompt's
    text (:func:`promptcontrol.generate` computes them from the negative prompt's syntax, as A1111 weights it).

    Raises ``TypeError``/``ValueError`` for weights that are not finite numbers (at construction); ``KeyError``
    listing the prompt's words for an unknown word and ``ValueError`` for conflicting weights of one token (at
    the first step of the pipeline call); warns when a weighted word is cut off by the token limit.
    """

    plan_per_step = True  # the same plan at every site it acts at: composed once per step (see processors/attention.py)

    def __init__(
        self, weights: Any, *, mode: str = "attention", steps: Any = None, sites: Any = None, negative: Any = None
    ):
        if mode not in MODES:
            raise ValueError(f"Reweight: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode == "embedding" and sites is not None:
            raise ValueError(
                "Reweight: mode='embedding' scales the UNet's text input, which every cross-attention layer reads; "
                "a sites filter needs mode='attention' or 'softmax'"
            )
        self.mode = mode
        self.per_prompt, self.weights = _check_weights(weights, mode)
        self.negative_per_prompt, self.negative = (False, [{}]) if negative is None else _check_weights(negative, mode)
        for table in self.negative:
            for key in table:
                if not isinstance(key, int):
                    raise TypeError(
                        f"Reweight: negative weights are keyed by token position (int), got {key!r}: the session sees "
                        "the prompts' text but not the negative prompt's; pc.generate computes the positions for you"
                    )
        self.steps = steps
        self._in_window = step_filter(steps, "steps")
        self._at_site = site_filter(sites, "sites")
        self._session: SessionView | None = None
        self._reset()

    def __repr__(self) -> str:
        shown = self.weights if self.per_prompt else self.weights[0]
        negative = self.negative if self.negative_per_prompt else self.negative[0]
        extra = f", negative={negative!r}" if any(self.negative) else ""
        return f"Reweight({shown!r}, mode={self.mode!r}, steps={self.steps!r}{extra})"

    def _reset(self) -> None:
        self._run_key: Any = None
        self._row_weights: dict[int, dict[int, float]] = {}  # batch row -> {token position: weight}
        self._tensor_key: Any = None
        self._multiplier: torch.Tensor | None = None  # (B, K) weight per row and token, 1 elsewhere
        self._term: torch.Tensor | None = None  # attention: the V scale (B, K); softmax: the logit bias (B, K)
        self._rows: torch.Tensor | None = None  # embedding: rows with any weight != 1 (conditional or not)
        self._groups: list[tuple[int, int]] | None = None  # embedding: feature slices, one per text encoder
        self._active = False

    # ---- session hooks ----
    def applies_to(self, site: AttentionSite) -> bool:
        return self.mode != "embedding" and site.attends_text and bool(self._at_site(site))

    def bind(self, session: SessionView) -> None:
        self._session = session
        self._reset()
        if self.mode == "embedding" and any(site.kind == "joint" for site in session.sites):
            warnings.warn(JOINT_EMBEDDING_WARNING, UserWarning, stacklevel=2)

    def unbind(self) -> None:
        self._session = None
        self._reset()

    def begin_step(self, ctx: StepContext) -> None:
        prompts = tuple(ctx.run.prompts) if ctx.run is not None and ctx.run.prompts is not None else None
        run_key = (prompts, ctx.layout)
        if run_key != self._run_key:
            self._row_weights = self._resolve(prompts, ctx)
            self._run_key = run_key
            self._tensor_key = None
        self._active = bool(self._row_weights) and bool(self._in_window(ctx))

    def transform_context(self, ctx: StepContext, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Builds the per-run tensors from the text input's shape; in embedding mode, scales the text input."""
        if not self._row_weights:
            return encoder_hidden_states
        self._build(encoder_hidden_states)
        if self.mode != "embedding" or not self._active:
            return encoder_hidden_states
        return emphasise_embeddings(encoder_hidden_states, self._multiplier, self._rows, self._groups)

    def plan(self, site: AttentionSite, ctx: StepContext, plan: AttentionPlan) -> AttentionPlan:
        if not self._active or self._term is None:
            return plan
        if self.mode == "attention":
            return plan.scaled(self._term)
        return plan.biased(self._term)

    # ---- resolution (once per run) ----
    def _resolve(self, prompts: tuple[str, ...] | None, ctx: StepContext) -> dict[int, dict[int, float]]:
        """Token positions and weights of each conditional row of the batch."""
        layout = ctx.layout
        n_prompts = max(layout.prompt_of_row) + 1 if layout.size else 0
        if self.per_prompt and len(self.weights) != n_prompts:
            raise ValueError(
                f"Reweight got weights for {len(self.weights)} prompt(s) but this pipeline call has {n_prompts} "
                "prompt(s); give one dict per prompt (use {} for a prompt to leave as it is)"
            )
        if self.negative_per_prompt and len(self.negative) != n_prompts:
            raise ValueError(
                f"Reweight got negative weights for {len(self.negative)} prompt(s) but this pipeline call has "
                f"{n_prompts} prompt(s); give one dict per prompt"
            )
        tokenizer = self._session.tokenizer if self._session is not None else None
        pipe = self._session.pipe if self._session is not None else None
        zero_t5 = has_t5_segment(pipe) and not t5_loaded(pipe)  # SD3 without T5: keys past CLIP's are zeros
        for table in (*self.weights, *self.negative):
            _refuse_zero_t5_positions(table, tokenizer, zero_t5)
        cache: dict[int, dict[int, float]] = {}
        rows = {}
        for row in layout.cond_rows:
            p = layout.prompt_of_row[row]
            if p not in cache:
                weights = self.weights[p] if self.per_prompt else self.weights[0]
                prompt = prompts[p] if prompts is not None and p < len(prompts) else None
                cache[p] = resolve_positions(
                    weights, prompt, tokenizer, prompt_index=p if n_prompts > 1 else None, text_length=ctx.text_length
                )
            if cache[p]:
                rows[row] = cache[p]
        for row in layout.uncond_rows:
            p = layout.prompt_of_row[row]
            table = self.negative[p] if self.negative_per_prompt else self.negative[0]
            negative = {position: w for position, w in table.items() if w != 1.0}
            if negative:
                rows[row] = negative
        return rows

    # ---- tensors (once per run, on the text input's device and dtype) ----
    def _build(self, ehs: torch.Tensor) -> None:
        batch, keys = int(ehs.shape[0]), int(ehs.shape[1])
        key = (batch, keys, ehs.device, ehs.dtype)
        if key == self._tensor_key:
            return
        multiplier = torch.ones(batch, keys, dtype=torch.float32)
        for row, positions in self._row_weights.items():
            if row >= batch:
                raise ValueError(f"Reweight: batch row {row} is outside the UNet batch of {batch} rows")
            for position, weight in positions.items():
                if position >= keys:
                    raise ValueError(
                        f"Reweight: token position {position} is outside the {keys} text tokens of this model "
                        f"(positions 0..{keys - 1})"
                    )
                multiplier[row, position] = weight
        # host-built, once per run: non-blocking copies (no stream sync inside the step)
        self._multiplier = multiplier.to(ehs.device, non_blocking=True)
        if self.mode == "attention":
            self._term = multiplier.to(device=ehs.device, dtype=ehs.dtype, non_blocking=True)
        elif self.mode == "softmax":
            self._term = multiplier.log().to(device=ehs.device, dtype=ehs.dtype, non_blocking=True)
        else:
            self._term = None
            self._rows = torch.tensor(sorted(self._row_weights), dtype=torch.long, device=ehs.device)
            self._groups = _feature_groups(self._session, int(ehs.shape[-1]))
        self._tensor_key = key


def _refuse_zero_t5_positions(table: Mapping[Key, float], tokenizer, zero_t5: bool) -> None:
    """SD3 without a T5 encoder: a weighted token position in the T5 segment (past CLIP's keys) weights zeros."""
    if not zero_t5:
        return
    clip_length = int(getattr(tokenizer, "model_max_length", 77))
    past = sorted(k for k, w in table.items() if isinstance(k, int) and k >= clip_length and w != 1.0)
    if past:
        raise ValueError(no_t5_message(f"Reweight: token position(s) {past} fall in SD3's T5 segment"))


def _prompt_tokens(tokenizer, prompt: str, text_length: int | None) -> PromptTokens:
    """The prompt's tokens over the text keys: SD3 with T5 both segments (T5's cut at ``text_length``), else the
    one tokenizer's."""
    if isinstance(tokenizer, SegmentedTokenizer):
        return tokenizer.tokenize(prompt, text_length)
    return tokenize(tokenizer, prompt)


def _segments(tokens: PromptTokens) -> list[tuple[str | None, PromptTokens]]:
    """(segment name, its own tokens) of each tokenizer's part of the text keys (``None``: one tokenizer)."""
    if isinstance(tokens, SegmentedTokens):
        return [(s.name, s.tokens) for s in tokens.segments]
    return [(None, tokens)]


def _warn_cut(tokens: PromptTokens, words, query: str, where: str) -> None:
    """Warn about weighted words cut off by a token limit (per segment on SD3 with T5)."""
    for name, seg in _segments(tokens):
        cut_indices = {w.index for w in seg.truncated}
        cut = [w.text for w in words if w.index in cut_indices]
        if not cut:
            continue
        limit = "of the text encoder" if name is None else f"of SD3's {name} segment"
        warnings.warn(
            f"Reweight{where}: the weighted word(s) {', '.join(map(repr, cut))} of {query!r} fall past the "
            f"{seg.max_length}-token limit {limit} and are cut off; their weight applies only to the tokens that "
            "remain (shorten the prompt)",
            stacklevel=4,
        )


def resolve_positions(
    weights: Mapping[Key, float],
    prompt: str | None,
    tokenizer,
    *,
    prompt_index: int | None = None,
    text_length: int | None = None,
) -> dict[int, float]:
    """``{token position: weight}`` of one prompt, for weights keyed by word, phrase, (word, occurrence) or position.

    On SD3 with T5 (a :class:`~promptcontrol.tokens.SegmentedTokenizer`) a word's positions are its tokens in both
    segments (T5's from 77 on, cut at ``text_length``: the denoiser's text keys). Raises ``KeyError`` (listing
    the prompt's words) for a word not in the prompt, ``ValueError`` when two keys give one token different
    weights; warns when a weighted word is cut off by a token limit.
    """
    where = "" if prompt_index is None else f" (prompt {prompt_index} of the batch)"
    tokens: PromptTokens | None = None
    chosen: dict[int, tuple[float, Key]] = {}
    for key, weight in weights.items():
        if isinstance(key, int):
            positions = [key]
        else:
            if prompt is None:
                raise ValueError(
                    f"Reweight: the word {key!r} cannot be found because this pipeline call gave no prompt text "
                    "(prompt_embeds?); weight token positions instead, e.g. {5: 1.5}"
                )
            if tokenizer is None:
                raise ValueError(
                    "Reweight: weighting words needs a tokenizer; use a pipeline, or pass tokenizer= to pc.control"
                )
            if tokens is None:
                tokens = _prompt_tokens(tokenizer, prompt, text_length)
            query, occurrence = key if isinstance(key, tuple) else (key, None)
            try:
                words = tokens.find(query, occurrence)
            except KeyError as error:
                raise KeyError(f"Reweight{where}: {error.args[0]}") from None
            _warn_cut(tokens, words, query, where)
            positions = sorted({p for w in words for p in w.tokens})
        for position in positions:
            if position in chosen and chosen[position][0] != weight:
                other_weight, other_key = chosen[position]
                raise ValueError(
                    f"Reweight{where}: conflicting weights for token position {position}: {other_key!r} gives "
                    f"{other_weight} and {key!r} gives {weight}; give each word one weight"
                )
            chosen[position] = (weight, key)
    return {p: w for p, (w, _) in sorted(chosen.items()) if w != 1.0}


def _feature_groups(session: "SessionView | None", features: int) -> list[tuple[int, int]]:
    """Feature slices of the text input, one per text encoder (SDXL concatenates two), for the mean restore."""
    pipe = getattr(session, "pipe", None)
    first = getattr(pipe, "text_encoder", None)
    second = getattr(pipe, "text_encoder_2", None)
    if first is not None and second is not None:
        split = int(first.config.hidden_size)
        if 0 < split < features:
            return [(0, split), (split, features)]
    return [(0, features)]


def emphasise_embeddings(
    ehs: torch.Tensor,  # (B, K, D)
    multiplier: torch.Tensor,  # (B, K)
    rows: torch.Tensor,  # (R,) rows to change
    groups: list[tuple[int, int]],  # feature slices with their own mean
) -> torch.Tensor:  # (B, K, D)
    """A1111's emphasis on the given rows: ``z *= w`` per token, then ``z *= mean(z_original) / mean(z)``.

    A1111 takes the mean over the whole tensor of one text encoder's output for the prompts encoded together;
    here each row is its own prompt (identical for one prompt; prompts of a batch do not change each other).
    Where a mean is ~0 (< 1e-4 of the mean absolute feature) the mean is not restored.
    """
    z = ehs[rows].float()  # (R, K, D)
    w = multiplier[rows].to(z.device)[..., None]  # (R, K, 1)
    out = torch.empty_like(z)
    for start, end in groups:
        part = z[..., start:end]
        original_mean = part.mean(dim=(1, 2), keepdim=True)
        scaled = part * w
        new_mean = scaled.mean(dim=(1, 2), keepdim=True)
        # A1111 divides by the new mean unguarded; where either mean is ~0 relative to the features' magnitude
        # (untrained text encoders, final LayerNorm without bias) the ratio is meaningless, so it is left at 1.
        tiny = 1e-4 * part.abs().mean(dim=(1, 2), keepdim=True)
        sane = (original_mean.abs() > tiny) & (new_mean.abs() > tiny)
        ratio = torch.where(sane, original_mean / torch.where(sane, new_mean, torch.ones_like(new_mean)), 1.0)
        out[..., start:end] = scaled * ratio
    result = ehs.clone()
    result[rows] = out.to(ehs.dtype)
    return result
