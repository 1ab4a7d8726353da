"""Concept maps from the attention *output* (ConceptAttention, Helbling et al., ICML 2025) on SD3 / SD3.5 and
Flux.1.

Each concept (a short text, e.g. ``"circle"``, ``"background"``; it need not be in the prompt) becomes ONE extra
token of the text stream:

1. **Encoding**: the concepts are encoded like the prompt, by the pipeline's own ``encode_prompt`` (each concept its
   own prompt); a concept's token is the **mean** of its word tokens' features — SD3: in the CLIP segment
   (positions after the start token, before the end token); Flux: in the T5 sequence (the joint attention's text
   keys; positions before ``</s>``, encoded at ``max_sequence_length`` :func:`flux_sequence_length`) — so a
   multi-token concept is one token of a word token's scale.
2. **Carried through the blocks**: the ``C`` concept tokens are appended to ``encoder_hidden_states`` at the
   transformer's input (:meth:`ConceptAttention.transform_inputs`), so the text stream's own per-token ops
   (``context_embedder``, ``norm1_context``, ``add_q/k/v_proj``, ``to_add_out``, ``ff_context``; on Flux's
   single-stream blocks the block's ``norm``, ``to_q/k/v``, ``proj_mlp``, ``proj_out``) act on them. On Flux
   ``txt_ids`` gets ``C`` rows of zeros, so the concepts' rotary positions are the text's (zeros: no rotation).
3. **Masked**: at every joint site the processor (:mod:`promptcontrol.processors.joint`, and
   :mod:`promptcontrol.processors.flux` for Flux's ``[prompt | concepts | image]`` sequences, double- and
   single-stream) splits them off: image and text queries attend to ``[image | text]`` exactly as without concepts
   (so the image is unchanged), and the concept queries attend to ``[image | concepts]`` (never to the prompt).
   The transformer's output is read from the image tokens only, so nothing needs removing there (SD3's last
   block, ``context_pre_only``, drops the text stream, concepts included; Flux's ``norm_out`` / ``proj_out`` see
   the image tokens only).
4. **Maps**: at each recorded joint site and step, the conditional rows' image attention outputs ``o_img``
   ``(Q_img, heads·d)`` and concept outputs ``o_c`` ``(C, heads·d)`` — both **before** ``to_out`` / ``to_add_out``
   — give ``softmax_c(o_img · o_cᵀ)`` ``(Q_img, C)`` (``softmax=False``: the raw dot products). The maps are the
   mean over the recorded (site, step) pairs. Before the projections because (a) the last block has no
   ``to_add_out``, (b) before them image and concept outputs are mixtures of the same value vectors, while after
   them they pass different matrices (``to_out`` vs ``to_add_out``), and (c) the reference implementation reads
   them there.

Default sites: every joint block on SD3 (as the reference implementation); on Flux the last
:data:`FLUX_DEFAULT_BLOCKS` double-stream blocks (the reference's ``layer_indices=range(15, 19)`` of Flux.1's 19).

Memory: one running sum ``(images, Q_img, C)`` float32 per recorded site.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import images
from ..context import SessionView, StepContext
from ..heatmap import HeatMap, _check, min_max, upsample
from ..schedule import site_filter, step_filter
from ..sites import AttentionSite, grid_from_length
from .base import Controller

_NOT_JOINT = (
    "concept maps need joint attention (SD3 / SD3.5 MM-DiT blocks or Flux.1's double- and single-stream blocks, "
    "where text and image tokens attend in one softmax); {name} conditions the image by cross-attention only, so "
    "there is no text stream for concept tokens to ride in. Use tr.heatmaps() (raw cross-attention maps of the "
    "prompt's words) instead"
)
_NEXT_FLUX = (
    "concept maps on {name} (Flux 2 / Flux 3) are not supported: their attention is another computation than "
    "Flux.1's, which promptcontrol does not mirror. Concept maps work on SD3 / SD3.5 (StableDiffusion3Pipeline) "
    "and Flux.1 (FluxPipeline)"
)
_LAYOUT = (
    "concept maps on {name}: its joint-attention sites are neither SD3's ([image | text], double-stream) nor "
    "Flux.1's ([text | image], double- and single-stream), or some of its text reaches the image by plain "
    "cross-attention; the concept-token path exists for SD3 / SD3.5 and Flux.1 only. Use tr.heatmaps() there"
)
FLUX_DEFAULT_BLOCKS = 4
"""Flux's default concept-map sites: the last this many double-stream blocks (ConceptAttention's reference code
reads Flux.1's blocks 15-18 of 19 by default)."""
FLUX_MAX_SEQUENCE_LENGTH = 512
"""FluxPipeline's default ``max_sequence_length`` (the T5 sequence the concepts are encoded at, at most)."""


def check_concepts(concepts: Any) -> tuple[str, ...]:
    """``concepts`` as a tuple of distinct, non-empty strings, or a clear error."""
    if isinstance(concepts, str):
        raise TypeError(f"concepts must be a list of strings, got one string {concepts!r}: write [{concepts!r}]")
    if not isinstance(concepts, Sequence):
        raise TypeError(
            f"concepts must be a list of strings, e.g. ['circle', 'background']; got {type(concepts).__name__}"
        )
    if not concepts:
        raise ValueError("concepts is empty: give at least one concept, e.g. ['circle', 'square', 'background']")
    bad = [c for c in concepts if not isinstance(c, str)]
    if bad:
        raise TypeError(f"every concept must be a str; got {', '.join(repr(b) for b in bad)}")
    blank = [c for c in concepts if not c.strip()]
    if blank:
        raise ValueError(f"concepts must not be empty strings; got {list(concepts)!r}")
    seen: dict[str, str] = {}
    for c in concepts:
        key = " ".join(c.lower().split())  # CLIP lower-cases and splits on whitespace: these encode the same
        if key in seen:
            raise ValueError(
                f"concept {c!r} is given twice (as {seen[key]!r} too); each concept must be distinct, since they "
                "compete in one softmax"
            )
        seen[key] = c
    return tuple(c.strip() for c in concepts)


def joint_layout(sites: list[AttentionSite]) -> str | None:
    """``"sd3"`` (every joint site ``[image | text]``, double-stream), ``"flux"`` (every joint site ``[text |
    image]``, double- or single-stream), or ``None`` (no joint site, or another / mixed layout)."""
    joint = [s for s in sites if s.kind == "joint"]
    if not joint:
        return None
    if all(s.text_keys == "after" and s.stream in (None, "double") for s in joint):
        return "sd3"
    if all(s.text_keys == "before" and s.stream in ("double", "single") for s in joint):
        return "flux"
    return None


def refusal(sites: list[AttentionSite], name: str) -> str | None:
    """Why a denoiser with these sites cannot carry concept tokens, or ``None`` (SD3 / SD3.5, Flux.1)."""
    if name.startswith(("Flux2", "Flux3")):
        return _NEXT_FLUX.format(name=name)
    texted = [s for s in sites if s.attends_text]
    joint = [s for s in texted if s.kind == "joint"]
    if not joint:
        return _NOT_JOINT.format(name=name)
    if joint_layout(sites) is None or len(joint) != len(texted):
        return _LAYOUT.format(name=name)
    return None


def default_sites(sites: list[AttentionSite], layout: str) -> list[AttentionSite]:
    """The sites whose maps go into the mean by default: every joint site (SD3); the last
    :data:`FLUX_DEFAULT_BLOCKS` double-stream blocks (Flux)."""
    joint = [s for s in sites if s.kind == "joint"]
    if layout != "flux":
        return joint
    double = sorted((s for s in joint if s.stream == "double"), key=lambda s: s.block)
    return double[-FLUX_DEFAULT_BLOCKS:]


def word_positions(tokenizer, concept: str, max_length: int | None = None) -> list[int]:
    """Positions of ``concept``'s word tokens in its own encoded prompt (no start / end / padding token)."""
    length = max_length or tokenizer.model_max_length
    ids = tokenizer(concept, truncation=True, max_length=length).input_ids
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return [i for i, token in enumerate(ids) if token not in special]


def flux_sequence_length(tokenizer) -> int:
    """The T5 length Flux concepts are encoded at: FluxPipeline's default ``max_sequence_length`` (512), or the
    tokenizer's ``model_max_length`` where smaller."""
    limit = getattr(tokenizer, "model_max_length", None)
    if not isinstance(limit, int) or limit <= 0:
        return FLUX_MAX_SEQUENCE_LENGTH
    return min(FLUX_MAX_SEQUENCE_LENGTH, limit)


def mean_word_tokens(embeds: torch.Tensor, tokenizer, concepts: Sequence[str], max_length=None) -> torch.Tensor:
    """One row per concept (C, D): the mean of ``embeds[c]`` (C, L, D) over concept c's word-token positions."""
    tokens = []
    for index, concept in enumerate(concepts):
        positions = word_positions(tokenizer, concept, max_length)
        if not positions:
            raise ValueError(f"concept {concept!r} has no word tokens in the pipeline's tokenizer")
        tokens.append(embeds[index, positions].float().mean(dim=0))
    return torch.stack(tokens)


@torch.no_grad()
def encode_concepts(pipe, concepts: Sequence[str], device, dtype, layout: str = "sd3") -> torch.Tensor:  # (C, D)
    """One token per concept from ``pipe.encode_prompt``: the mean of its word tokens' features, in the CLIP
    segment (SD3) or the T5 sequence (Flux)."""
    if layout == "flux":
        length = flux_sequence_length(pipe.tokenizer_2)
        embeds = pipe.encode_prompt(
            prompt=list(concepts), prompt_2=None, device=device, num_images_per_prompt=1,
            max_sequence_length=length,
        )[0]  # (C, length, D_text): T5
        features = mean_word_tokens(embeds, pipe.tokenizer_2, concepts, length)
    else:
        embeds = pipe.encode_prompt(
            prompt=list(concepts), prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )[0]  # (C, 77 + T5 tokens, D_text)
        features = mean_word_tokens(embeds, pipe.tokenizer, concepts)
    return features.to(device=device, dtype=dtype)


def extended_text_ids(ids: torch.Tensor, count: int) -> torch.Tensor:
    """Flux's ``txt_ids`` (K, 3) — or the deprecated (B, K, 3) — with ``count`` rows of zeros appended: the concept
    tokens' rotary positions are the text's."""
    tokens_dim = ids.ndim - 2
    shape = list(ids.shape)
    shape[tokens_dim] = count
    return torch.cat([ids, ids.new_zeros(shape)], dim=tokens_dim)


def concept_scores(
    image_out: torch.Tensor,  # (N, heads, Q, d): image queries' attention outputs (before to_out)
    concept_out: torch.Tensor,  # (N, heads, C, d): concept queries' attention outputs (before to_add_out)
    softmax: bool = True,
) -> torch.Tensor:  # (N, Q, C) float32
    """``o_img · o_cᵀ`` over all heads' channels (heads·d), softmax over the concepts unless ``softmax=False``."""
    scores = torch.einsum("nhqd,nhcd->nqc", image_out.float(), concept_out.float())
    return scores.softmax(dim=-1) if softmax else scores


@dataclass
class ConceptRun:
    """What one pipeline call left: per recorded site a running sum ``(N, Q, C)`` and how many steps it holds."""

    latent_hw: tuple[int, int]
    prompts: list[str | None]
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    steps: set[int] = field(default_factory=set)


class ConceptAttention(Controller):
    """Concept tokens through the joint blocks, and their output-space maps (see the module docstring).

    concepts: the concept texts (distinct, non-empty; need not be in the prompt)
    sites:    which joint sites' maps go into the mean (:func:`promptcontrol.schedule.site_filter`; default
              :func:`default_sites`: every joint block on SD3, the last four double-stream blocks on Flux, as the
              reference implementation); the concept tokens ride through every block anyway (Flux: double- and
              single-stream, so ``sites=`` may name single-stream blocks too)
    steps:    at which steps (:func:`promptcontrol.schedule.step_filter`; default every step); at other steps no
              concept token is appended (no extra cost)
    softmax:  ``True`` (default, as ConceptAttention): softmax over the concepts per pixel, site and step; ``False``:
              the raw dot products
    """

    carries_concepts = True  # read by the joint processor: split the last `concept_tokens(ctx)` text tokens off

    def __init__(self, concepts: Sequence[str], *, sites: Any = None, steps: Any = None, softmax: bool = True):
        self.concepts = check_concepts(concepts)
        self.site_spec, self.step_spec = sites, steps
        self._at_site = site_filter(sites)
        self._want_step = step_filter(steps)
        if not isinstance(softmax, bool):
            raise TypeError(f"softmax must be True or False; got {softmax!r}")
        self.softmax = softmax
        self.features: torch.Tensor | None = None  # (C, D_text), encoded at bind
        self.runs: list[ConceptRun] = []
        self.images: list[tuple[ConceptRun, int]] = []  # (run, slot) of every recorded image, in order
        self.sites: dict[str, AttentionSite] = {}
        self.scale_factor = 8
        self.layout = "sd3"  # or "flux", from the denoiser's sites at bind
        self._run_key: object = None
        self._current: ConceptRun | None = None
        self._rows: tuple[int, ...] = ()
        self._carrying: tuple[int, int] | None = None  # (run_id, step) whose inputs got the concept tokens

    # ---- session ---------------------------------------------------------------------------------------------
    def applies_to(self, site: AttentionSite) -> bool:
        return site.kind == "joint"  # every joint site must mask the concept tokens, recorded or not

    def bind(self, session: SessionView) -> None:
        name = type(session.unet).__name__
        why = refusal(list(session.sites), name)
        if why:
            raise NotImplementedError(why)
        others = [c for c in session.controllers if getattr(c, "carries_concepts", False) and c is not self]
        if others:
            raise ValueError("one ConceptAttention per session: put every concept into one list")
        self.layout = joint_layout(list(session.sites))
        pipe = session.pipe
        encodes = pipe is not None and callable(getattr(pipe, "encode_prompt", None))
        tokenizer = "tokenizer_2" if self.layout == "flux" else "tokenizer"
        if not encodes or getattr(pipe, tokenizer, None) is None:
            raise ValueError(
                "concept maps need the pipeline (its text encoders encode the concepts): pass the "
                "StableDiffusion3Pipeline / FluxPipeline to pc.trace / pc.control, not the bare transformer"
            )
        chosen = default_sites(list(session.sites), self.layout) if self.site_spec is None else [
            s for s in session.sites if s.kind == "joint" and self._at_site(s)
        ]
        self.sites = {s.key: s for s in chosen}
        if not self.sites:
            raise ValueError(f"ConceptAttention(sites={self.site_spec!r}) selects no joint-attention site")
        model = session.unet
        self.features = encode_concepts(pipe, self.concepts, model.device, model.dtype, self.layout)
        factor = getattr(pipe, "vae_scale_factor", None)
        if isinstance(factor, int) and factor > 0:
            self.scale_factor = factor

    def unbind(self) -> None:
        self._current, self._carrying, self._rows = None, None, ()

    # ---- steps --------------------------------------------------------------------------------------------
    def begin_step(self, ctx: StepContext) -> None:
        key = (ctx.run_id, ctx.latent_hw, ctx.layout)
        if key != self._run_key:
            self._current = None
        self._run_key = key
        layout = ctx.layout
        self._rows = tuple(r for _, r in sorted((layout.image_of_row[r], r) for r in layout.cond_rows))
        self._carrying = None
        if self._rows and self._want_step(ctx):
            if self._current is None:
                self._current = self._new_run(ctx)
            self._carrying = (ctx.run_id, ctx.index)

    def _new_run(self, ctx: StepContext) -> ConceptRun:
        run = ctx.run
        prompts = []
        for row in self._rows:
            p = ctx.layout.prompt_of_row[row]
            known = run is not None and run.prompts is not None and p < len(run.prompts)
            prompts.append(run.prompts[p] if known else None)
        record = ConceptRun(ctx.latent_hw, prompts)
        self.runs.append(record)
        self.images.extend((record, slot) for slot in range(len(prompts)))
        return record

    def end_step(self, ctx: StepContext) -> None:
        self._carrying = None

    def transform_inputs(self, ctx: StepContext, inputs: dict[str, Any]) -> dict[str, Any]:
        """Append the ``C`` concept tokens to ``encoder_hidden_states`` ``(B, K, D) -> (B, K + C, D)`` (Flux: and
        ``C`` zero rows to ``txt_ids`` ``(K, 3) -> (K + C, 3)``)."""
        if self._carrying != (ctx.run_id, ctx.index):
            return inputs
        text = inputs.get("encoder_hidden_states")
        if not isinstance(text, torch.Tensor) or text.ndim != 3:
            raise ValueError("concept maps need the transformer's encoder_hidden_states (B, K, D) at every step")
        extra = self.features.to(device=text.device, dtype=text.dtype)  # (C, D)
        extra = extra[None].expand(text.shape[0], -1, -1)  # (B, C, D)
        changed = {**inputs, "encoder_hidden_states": torch.cat([text, extra], dim=1)}
        if self.layout == "flux":
            ids = inputs.get("txt_ids")
            if not isinstance(ids, torch.Tensor) or ids.ndim not in (2, 3):
                raise ValueError(
                    "concept maps on Flux need the transformer's txt_ids (K, 3) at every step (the concept tokens' "
                    "rotary positions extend them); call the transformer as FluxPipeline does"
                )
            changed["txt_ids"] = extended_text_ids(ids, len(self.concepts))
        return changed

    # ---- the processor's side ------------------------------------------------------------------------------
    def concept_tokens(self, ctx: StepContext | None) -> int:
        """How many of the text stream's last tokens are concept tokens at this step (0: none appended)."""
        if ctx is None or self._carrying != (ctx.run_id, ctx.index):
            return 0
        return len(self.concepts)

    def wants_concepts(self, site: AttentionSite, ctx: StepContext) -> bool:
        return site.key in self.sites and self.concept_tokens(ctx) > 0

    def record_concepts(
        self, site: AttentionSite, ctx: StepContext, image_out: torch.Tensor, concept_out: torch.Tensor
    ) -> None:
        """Add the maps of the conditional rows: ``image_out`` (B, heads, Q, d), ``concept_out`` (B, heads, C, d)."""
        rows = list(self._rows)
        contiguous = rows == list(range(rows[0], rows[-1] + 1))
        pick = (lambda t: t[rows[0] : rows[-1] + 1]) if contiguous else (lambda t: t[rows])
        scores = concept_scores(pick(image_out), pick(concept_out), self.softmax)  # (N, Q, C)
        run = self._current
        if site.key in run.sums:
            run.sums[site.key] += scores
            run.counts[site.key] += 1
        else:
            run.sums[site.key] = scores
            run.counts[site.key] = 1
        run.steps.add(ctx.index)

    # ---- reading ---------------------------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return len(self.images)

    def grid_maps(self, image_index: int = 0, *, sites: Any = None) -> torch.Tensor:  # (C, h, w) float32, CPU
        """The mean concept maps of image ``image_index`` over its recorded sites (``sites=``: a subset) and steps."""
        if not self.images:
            raise ValueError("no concept maps recorded: run the pipeline inside the `with pc.trace(...)` block")
        if not -len(self.images) <= image_index < len(self.images):
            raise IndexError(f"image_index {image_index} out of range: {len(self.images)} image(s) recorded")
        run, slot = self.images[image_index]
        pick = site_filter(sites)
        keys = [k for k in run.sums if pick(self.sites[k])]
        if not keys:
            raise ValueError(f"no recorded joint site matches sites={sites!r}; recorded: {sorted(run.sums)}")
        total = sum(run.sums[k][slot] for k in keys)  # (Q, C)
        mean = total / sum(run.counts[k] for k in keys)
        h, w = grid_from_length(run.latent_hw, int(mean.shape[0]))
        return mean.transpose(0, 1).reshape(-1, h, w).float().cpu()

    def maps(self, image_index: int = 0, *, sites: Any = None, concepts: Iterable[str] | None = None,
             size: int | tuple[int, int] | None = None, interpolation: str = "bicubic",
             normalize: str | None = None) -> "ConceptMaps":
        """The :class:`ConceptMaps` of image ``image_index`` (see :meth:`grid_maps`), at the image's pixel size."""
        _check(interpolation=interpolation, normalize=normalize)
        grids = self.grid_maps(image_index, sites=sites)
        names = list(self.concepts)
        if concepts is not None:
            wanted = [c.strip() for c in check_concepts(list(concepts))]
            missing = [c for c in wanted if c not in names]
            if missing:
                raise KeyError(
                    f"concepts {missing} were not traced; traced: {names}. Pass them to pc.trace(pipe, concepts=[...])"
                )
            grids = grids[[names.index(c) for c in wanted]]
            names = wanted
        run, _ = self.images[image_index]
        if size is None:
            size = (run.latent_hw[0] * self.scale_factor, run.latent_hw[1] * self.scale_factor)
        elif isinstance(size, int):
            size = (size, size)
        return ConceptMaps(grids, names, size, interpolation=interpolation, normalize=normalize,
                           softmax=self.softmax, steps=sorted(run.steps))


class ConceptMaps:
    """One image's concept maps: index by concept, render, export — the face of :class:`~promptcontrol.HeatMaps`.

    ``cmaps["circle"]`` (a :class:`~promptcontrol.heatmap.HeatMap`), ``cmaps.concepts``, ``cmaps.grid(image)``,
    ``cmaps.to_tensor()``, ``cmaps.segmentation()``, ``cmaps.save(path)``. ``grid_maps``: the maps at the site's
    token grid ``(C, h, w)``; ``normalize``: ``None`` (default: the maps as computed — with softmax each pixel's
    values over the concepts sum to 1, so concepts compare), ``"word"`` (each map min-max scaled) or ``"global"``.
    """

    def __init__(self, grid_maps: torch.Tensor, concepts: list[str], size: tuple[int, int], *,
                 interpolation: str = "bicubic", normalize: str | None = None, softmax: bool = True,
                 steps: list[int] | None = None):
        _check(interpolation=interpolation, normalize=normalize)
        self.grid_maps = grid_maps  # (C, h, w)
        self.concepts = list(concepts)
        self.size = (int(size[0]), int(size[1]))
        self.interpolation, self.normalize, self.softmax = interpolation, normalize, softmax
        self.steps = steps or []
        self._full: torch.Tensor | None = None

    @property
    def words(self) -> list[str]:
        """The concepts (the name :class:`~promptcontrol.HeatMaps` uses)."""
        return list(self.concepts)

    def __contains__(self, concept: str) -> bool:
        return concept in self.concepts

    def __len__(self) -> int:
        return len(self.concepts)

    def __iter__(self):
        return iter(self.concepts)

    def raw(self) -> torch.Tensor:  # (C, H, W)
        """Every concept's map upsampled to ``size``, unnormalised (cached)."""
        if self._full is None:
            self._full = upsample(self.grid_maps, self.size, self.interpolation)
        return self._full

    def _normalised(self, m: torch.Tensor, normalize: str | None) -> torch.Tensor:
        if normalize == "word":
            return min_max(m)
        if normalize == "global":
            peak = float(self.raw().max())
            return m / peak if peak > 0 else m.clone()
        return m.clone()

    def __getitem__(self, concept: str) -> HeatMap:
        if not isinstance(concept, str):
            raise TypeError(f"index concept maps by a concept (str), one of {self.concepts}")
        return self.concept(concept)

    def concept(self, concept: str, *, normalize="default") -> HeatMap:
        """The :class:`HeatMap` of one concept."""
        if concept not in self.concepts:
            raise KeyError(f"{concept!r} is not a traced concept; concepts: {self.concepts}")
        normalize = self.normalize if normalize == "default" else normalize
        _check(normalize=normalize)
        index = self.concepts.index(concept)
        return HeatMap(self._normalised(self.raw()[index], normalize), concept, (index,), normalize)

    def maps(self, *, normalize="default") -> list[HeatMap]:
        """One map per concept, in order."""
        return [self.concept(c, normalize=normalize) for c in self.concepts]

    def to_tensor(self, *, normalize="default") -> torch.Tensor:
        """All concept maps stacked: (C, H, W) float32."""
        return torch.stack([m.tensor for m in self.maps(normalize=normalize)])

    def segmentation(self) -> torch.Tensor:  # (H, W) int64
        """Each pixel's concept index: the argmax over the concepts of the raw maps."""
        return self.raw().argmax(dim=0)

    def grid(self, image: Any = None, *, concepts: Iterable[str] | None = None, cols: int | None = None,
             cmap: str = "jet", alpha: float = 0.5, legend: bool = True, normalize="default") -> "Any":
        """One picture: the image (when given) and one labelled overlay per concept, on one colour scale."""
        chosen = self.concepts if concepts is None else list(concepts)
        maps = [self.concept(c, normalize=normalize) for c in chosen]
        norm, peak = maps[0].normalize, max(float(m.tensor.max()) for m in maps)
        vmax = 1.0 if norm == "word" else max(1.0, peak) if norm == "global" else max(peak, 1e-12)
        cols = cols or min(len(maps) + (image is not None), 6)
        labelled = [(m.label, m.tensor) for m in maps]
        return images.heat_panels(
            labelled, image, vmax, cmap=cmap, alpha=alpha, legend=legend, cols=cols, show_image=True
        )

    def save(self, path: str | Path, *, normalize="default") -> Path:
        """Save every concept map (``.safetensors`` / ``.npz`` / ``.pt``; keys ``"{i:02d}_{concept}"``)."""
        path = Path(path)
        maps = self.maps(normalize=normalize)
        tensors = {f"{i:02d}_{c}": m.tensor for i, (c, m) in enumerate(zip(self.concepts, maps))}
        metadata = {"concepts": json.dumps(self.concepts), "normalize": str(maps[0].normalize),
                    "softmax": str(self.softmax), "size": json.dumps(list(self.size))}
        images.save_tensors(path, tensors, metadata)
        return path

    def __repr__(self) -> str:
        h, w = self.size
        return f"ConceptMaps({h}x{w}, concepts={self.concepts}, softmax={self.softmax}, normalize={self.normalize!r})"
