"""``pc.LocalBlend``: edit only where the given words are; elsewhere keep the source image's latents.

Prompt-to-prompt's local blending, for any image size (on SD3, PixArt and Sana transformers too: every block whose keys
hold the text, one grid; not Flux, whose latents are packed). At the down/up cross-attention sites of ``levels`` (default:
the coarsest down/up level with cross-attention — prompt-to-prompt's 16² layers at 512² for SD 1.x) and at every
step, the maps of the blend words' tokens are summed, per image, over tokens, heads, layers and the steps so far.
After each scheduler step from ``start`` on:

    m    = maxpool3x3(mean map)            at the map's own grid (prompt-to-prompt's k = 1)
    m    = nearest-upsample(m) to the latent size, divided by its maximum, > threshold
    mask = m_source OR m_edit              (per edited image)
    x_edit = where(mask, x_edit, x_source)

The maps are the ones each row actually *used*: an edited row inside its replace window attends with the mapped
source map (and a reweight's scaling), and that is what gets summed — as in prompt-to-prompt, whose store keeps
the attention after the edit has been written into it. Recording materialises probabilities only at those sites.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F

from ..alignment import edit_images
from ..context import SessionView, StepContext
from ..plan import AttentionPlan, maps_used
from ..schedule import Window, _fraction, site_filter
from ..sites import AttentionSite, grid_from_length
from ..tokens import tokenize
from .base import Controller

Words = Union[str, Sequence[str], Sequence[Sequence[str]]]


def blend_mask(
    maps: torch.Tensor,  # (N, h, w) summed word maps per image
    latent_hw: tuple[int, int],
    threshold: float,
) -> torch.Tensor:  # (N, 1, H, W) bool
    """Prompt-to-prompt's mask: 3×3 max-pool, nearest upsampling to the latent, divide by the max, threshold."""
    m = F.max_pool2d(maps[:, None], kernel_size=3, stride=1, padding=1)
    m = F.interpolate(m, size=latent_hw, mode="nearest")
    m = m / m.amax(dim=(2, 3), keepdim=True)
    return m > threshold


def default_blend_levels(sites: Sequence[AttentionSite]) -> tuple[int, ...]:
    """The coarsest level holding down/up cross-attention (16² at 512² for SD 1.x, as prompt-to-prompt); on a
    transformer (one token grid: level 0) its only level."""
    levels = [s.level for s in sites if s.kind == "cross" and s.place in ("down", "up")]
    if not levels:
        levels = [s.level for s in sites if s.on_transformer and s.attends_text]
    return (max(levels),) if levels else ()


def _blend_sites(levels: Sequence[int], sites: Sequence[AttentionSite] = ()) -> Callable[[AttentionSite], bool]:
    """``site -> bool``: the down/up cross-attention sites of ``levels`` (the middle block is left out, as
    prompt-to-prompt does); on a transformer every block whose keys hold the text (cross or joint attention);
    none when ``levels`` is empty."""
    if not levels:
        return lambda site: False
    if any(s.on_transformer for s in sites):
        wanted = tuple(levels)
        return lambda site: site.on_transformer and site.attends_text and site.level in wanted
    return site_filter({"kinds": "cross", "places": ("down", "up"), "levels": tuple(levels)}, "LocalBlend levels")


class LocalBlend(Controller):
    """Keep the source image's latents outside the region of ``words``.

    words:     a word or phrase, a list of them (each must be in every prompt), or one list per prompt
               (``[["cat"], ["dog"]]`` for source and edit)
    threshold: share of the map's maximum above which a latent pixel is edited (prompt-to-prompt: 0.3)
    start:     fraction of the steps before blending begins (prompt-to-prompt's ``start_blend``, 0.2)
    levels:    levels of the cross-attention sites whose maps are used (default: see :func:`default_blend_levels`)
    """

    def __init__(self, words: Words, threshold: float = 0.3, *, start: float = 0.2, levels: Sequence[int] | None = None):
        self.words = self._parse_words(words)
        self.threshold = _fraction(threshold, "LocalBlend threshold")
        self.start = _fraction(start, "LocalBlend start")
        self.levels = None if levels is None else tuple(int(v) for v in levels)
        self._window = Window(self.start, 1.0)  # blending from `start` to the end
        self._reads: Callable[[AttentionSite], bool] = lambda site: False  # the sites the mask reads: set by bind()
        self.last_mask: torch.Tensor | None = None  # (N_images, 1, H, W) bool, the mask of the last blended step
        self._session: SessionView | None = None
        self._reset()

    @staticmethod
    def _parse_words(words: Words):
        if isinstance(words, str):
            return [words]
        words = list(words)
        if not words:
            raise ValueError("LocalBlend needs at least one word")
        if all(isinstance(w, str) for w in words):
            return words
        if all(isinstance(w, (list, tuple)) and all(isinstance(x, str) for x in w) for w in words):
            return [[w] if isinstance(w, str) else list(w) for w in words]
        raise TypeError(f"LocalBlend words must be a word, a list of words, or one list of words per prompt; got {words!r}")

    def _reset(self) -> None:
        self._prompts: tuple[str, ...] | None = None
        self._tokens: torch.Tensor | None = None  # (P, K) 1 at the blend words' tokens of each prompt
        self._sums: dict[int, torch.Tensor] = {}  # level -> (N_images, h, w)
        self._counts: dict[int, int] = {}
        self._facts: tuple = ()
        self._facts_key: object = None

    # ---- session ----
    def bind(self, session: SessionView) -> None:
        self._session = session
        if session.pipe is None:
            raise ValueError("pc.LocalBlend changes latents between steps and needs a pipeline, not a bare UNet")
        if any(site.text_keys == "before" for site in session.sites):
            raise NotImplementedError(
                "pc.LocalBlend on Flux is not supported yet (its latents are packed 2×2 patches); edit without "
                "blend=, or use an SD 1.x / 2.x / SDXL / SD3 / PixArt / Sana pipeline"
            )
        levels = self.levels if self.levels is not None else default_blend_levels(session.sites)
        self._reads = _blend_sites(levels, session.sites)
        if not any(self._reads(site) for site in session.sites):
            text_levels = sorted({site.level for site in session.sites if site.attends_text})
            raise ValueError(
                f"pc.LocalBlend levels={tuple(levels)!r} select no attention site that sees the text, so no mask "
                f"could be made; this model's text sites are at levels {text_levels} (omit levels= for the default)"
            )
        self._reset()

    def unbind(self) -> None:  # the maps and the last mask stay readable after the session
        self._session = None

    def _word_tokens(self, prompts: Sequence[str]) -> torch.Tensor:
        tokenizer = self._session.tokenizer
        per_prompt = self.words if isinstance(self.words[0], list) else [self.words] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(
                f"LocalBlend got {len(per_prompt)} word lists for {len(prompts)} prompts; give one list per prompt"
            )
        rows = []
        for index, (prompt, words) in enumerate(zip(prompts, per_prompt)):
            tokens = tokenize(tokenizer, prompt)
            row = torch.zeros(tokens.max_length)
            for word in words:
                if not tokens.matches(word):
                    role = "source" if index == 0 else f"edited prompt {index}"
                    raise KeyError(
                        f"LocalBlend word {word!r} is not in the {role} {prompt!r}; its words are: "
                        f"{', '.join(tokens.texts)} (give one word list per prompt, e.g. [['cat'], ['dog']], "
                        "when the word changes)"
                    )
                row[tokens.positions(word)] = 1.0
            rows.append(row)
        return torch.stack(rows)

    def begin_step(self, ctx: StepContext) -> None:
        if ctx.index == 0:
            self._sums, self._counts = {}, {}
        prompts = tuple(ctx.run.prompts) if ctx.run is not None and ctx.run.prompts is not None else None
        if prompts is None:
            raise ValueError("LocalBlend needs the prompt texts of the pipeline call (not prompt_embeds)")
        if prompts != self._prompts:
            self._tokens = self._word_tokens(prompts)
            self._prompts = prompts

    def uses_site(self, site: AttentionSite) -> bool:
        """Whether the mask reads this site: down/up cross-attention at the blend levels (the middle block is
        left out, as prompt-to-prompt does)."""
        return self._reads(site)

    def wants_probs(self, site: AttentionSite, ctx: StepContext) -> bool:
        return self.uses_site(site) and bool(edit_images(ctx.layout))

    def _row_facts(self, layout, device, keys: int) -> tuple:
        """(rows, (R, keys) blend-word tokens of each conditional row on ``device``, images of the rows), built once
        per layout, device and key count instead of at every call. ``keys`` beyond the tokenizer's length (SD3's
        joint keys: the CLIP tokens, then the T5 segment) hold no blend word; fewer keys cut the row."""
        key = (layout, device, self._prompts, keys)
        if self._facts_key != key:
            rows = list(layout.cond_rows)
            first = rows[0] if rows else 0
            index = slice(first, first + len(rows)) if rows == list(range(first, first + len(rows))) else rows
            prompts = torch.tensor([layout.prompt_of_row[r] for r in rows])
            tokens = self._tokens[prompts]  # (R, K)
            tokens = F.pad(tokens, (0, keys - int(tokens.shape[-1]))).to(device)  # (R, keys)
            images = [layout.image_of_row[r] for r in rows]
            if images == list(range(len(images))):
                images = slice(0, len(images))
            self._facts, self._facts_key = (index, tokens, images, len(rows)), key
        return self._facts

    def record(self, site: AttentionSite, ctx: StepContext, probs: torch.Tensor, plan: AttentionPlan) -> None:
        rows, tokens, images, count = self._row_facts(ctx.layout, probs.device, int(probs.shape[-1]))
        maps = maps_used(plan, probs)[rows]  # (R, heads, Q, K): the maps the rows used, after the edits
        word_map = torch.einsum("rhqk,rk->rq", maps, tokens)  # summed over heads and tokens
        h, w = grid_from_length(ctx.latent_hw, int(maps.shape[2]))  # a transformer's patches: not the latent grid
        total = self._sums.get(site.level)
        if total is None:
            total = torch.zeros(ctx.layout.num_images, h, w, device=maps.device)
        total[images] += word_map.reshape(count, h, w)
        self._sums[site.level] = total
        self._counts[site.level] = self._counts.get(site.level, 0) + probs.shape[1]

    def mean_maps(self) -> torch.Tensor | None:
        """(N_images, h, w): the word maps averaged over layers and heads, summed over the steps so far, at the
        finest recorded grid."""
        if not self._sums:
            return None
        finest = max(self._sums.values(), key=lambda t: t.shape[-1] * t.shape[-2]).shape[-2:]
        total = sum(
            F.interpolate(t[:, None], size=tuple(finest), mode="nearest")[:, 0] for t in self._sums.values()
        )
        return total / sum(self._counts.values())

    def transform_latents(self, ctx: StepContext, latents: torch.Tensor) -> torch.Tensor:
        pairs = edit_images(ctx.layout)
        if not pairs or ctx.total is None or not self._window.contains(ctx.index, ctx.total):
            return latents
        maps = self.mean_maps()
        if maps is None:
            return latents
        mask = blend_mask(maps, tuple(latents.shape[-2:]), self.threshold)
        self.last_mask = mask
        out = latents.clone()
        for edit, source in pairs:
            keep = mask[source] | mask[edit]  # (1, H, W)
            out[edit] = torch.where(keep, latents[edit], latents[source])
        return out
