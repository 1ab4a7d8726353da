"""``pc.edit``: edit a prompt and keep the layout — prompt-to-prompt in one call.

One pipeline call generates the source prompt and every edited prompt as one batch from the same starting
noise, with :class:`~promptcontrol.controllers.edit.AutoEdit` on the cross-attention (Replace for an edited
prompt with as many words as the source, Refine for words added or removed), source self-attention injected on
the first ``self_steps``, an optional equalizer on the edited prompts (``reweight``) and an optional
:class:`~promptcontrol.LocalBlend`. The source may be an inversion of a real image (``pc.invert``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from .controllers.blend import LocalBlend
from .controllers.edit import AutoEdit
from .controllers.inject import InjectSelf
from .controllers.inversion_guidance import InversionGuidance
from .images import as_pil
from .inversion import Inversion
from .schedule import ScheduleLike, WindowLike, window
from .session import control
from .tokens import word_tokenizer


@dataclass
class EditResult:
    """The images of one :func:`edit` call: ``source`` and one ``edited`` image per edited prompt."""

    prompts: list[str]
    images: list[Any]  # source first; PIL images unless output_type said otherwise
    controllers: list[Any] = field(default_factory=list, repr=False)

    @property
    def source(self):
        return self.images[0]

    @property
    def edited(self) -> list[Any]:
        return self.images[1:]

    def grid(self, *, min_cell: int = 160, label: bool = True):
        """A PIL image: source | edits, each labelled with its prompt (small images are enlarged)."""
        from PIL import Image, ImageDraw

        pictures = [as_pil(image) for image in self.images]
        w, h = pictures[0].size
        factor = max(1, -(-min_cell // max(w, 1)))
        cell_w, cell_h = w * factor, h * factor
        band = 0
        lines = [_wrap(p, cell_w) for p in self.prompts]
        if label:
            band = 12 * max(len(x) for x in lines) + 6
        canvas = Image.new("RGB", (cell_w * len(pictures), cell_h + band), "white")
        draw = ImageDraw.Draw(canvas)
        for i, (picture, text) in enumerate(zip(pictures, lines)):
            canvas.paste(picture.resize((cell_w, cell_h), Image.NEAREST), (i * cell_w, band))
            if label:
                for j, line in enumerate(text):
                    draw.text((i * cell_w + 3, 3 + 12 * j), line, fill="black")
        return canvas


def _wrap(text: str, width: int, char_px: int = 6) -> list[str]:
    per_line = max(4, width // char_px)
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > per_line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return (lines + [line]) if line else lines or [""]


def _reweight_controller(reweight, edits: list[str], tokenizer):
    """A ``pc.Reweight`` acting on the edited prompts only (prompt 0, the source, keeps its attention).

    A dict applies to every edited prompt that holds each word (a word in none of them is an error listing
    their words); a list gives one dict per edited prompt.
    """
    from .controllers.reweight import Reweight
    from .tokens import tokenize

    if isinstance(reweight, Reweight):
        return reweight
    if isinstance(reweight, Mapping):
        per_edit: list[dict] = [{} for _ in edits]
        tokens = [tokenize(tokenizer, e) for e in edits] if tokenizer is not None else None
        for key, weight in reweight.items():
            word = key[0] if isinstance(key, tuple) else key
            if not isinstance(word, str) or tokens is None:
                for d in per_edit:
                    d[key] = weight
                continue
            holders = [i for i, t in enumerate(tokens) if t.matches(word)]
            if not holders:
                listing = "; ".join(f"{t.prompt!r}: {', '.join(t.texts)}" for t in tokens)
                raise KeyError(f"reweight names {word!r}, which is in no edited prompt; their words are — {listing}")
            for i in holders:
                per_edit[i][key] = weight
        return Reweight([{}] + per_edit)
    if isinstance(reweight, Sequence) and not isinstance(reweight, str):
        items = list(reweight)
        if len(items) != len(edits):
            raise ValueError(
                f"reweight as a list needs one dict per edited prompt ({len(edits)}), got {len(items)}; "
                "or give one dict for every edited prompt"
            )
        return Reweight([{}] + [dict(x or {}) for x in items])
    raise TypeError(f"reweight must be a dict {{word: weight}}, a list of them (one per edit) or a pc.Reweight, got {reweight!r}")


def _edit_prompts(edits: Any) -> list[str]:
    """``edits`` as a non-empty list of prompt strings; ``TypeError`` naming the argument for anything else."""
    if isinstance(edits, str):
        return [edits]
    if not isinstance(edits, (list, tuple)):
        raise TypeError(
            f"pc.edit: edits must be a prompt (str) or a list/tuple of prompts, got {type(edits).__name__}: {edits!r}"
        )
    bad = [f"item {i}: {type(e).__name__}" for i, e in enumerate(edits) if not isinstance(e, str)]
    if bad:
        raise TypeError(f"pc.edit: every edit must be a prompt string; got {', '.join(bad)} in {edits!r}")
    if not edits:
        raise ValueError("pc.edit: edits is empty; give one edited prompt or a list of them")
    return list(edits)


def _warn_unseen_edits(tokenizer, source: str, edits: list[str]) -> None:
    """Warn about edited prompts that differ from the source only past the tokenizer's limit (the text encoder
    never sees the change, so the edit changes nothing)."""
    if tokenizer is None:
        return
    limit = int(getattr(tokenizer, "model_max_length", 77))

    def ids(text: str) -> tuple[list[int], list[int]]:
        """(every token id, the ids the text encoder sees: cut to ``limit``, end token kept)."""
        full = list(tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"])
        return full, (full if len(full) <= limit else full[: limit - 1] + full[-1:])

    source_full, source_seen = ids(source)
    for index, prompt in enumerate(edits, start=1):
        full, seen = ids(prompt)
        if seen == source_seen and full != source_full:
            warnings.warn(
                f"pc.edit: edited prompt {index} ({_short(prompt)}) differs from the source only past the "
                f"tokenizer's limit of {limit} tokens, which the text encoder never sees: this edit changes "
                "nothing (its image equals the source's but for reweight/blend); move the change into the first "
                f"{limit - 2} tokens or shorten the prompts",
                stacklevel=3,
            )


def _short(prompt: str, limit: int = 60) -> str:
    return repr(prompt if len(prompt) <= limit else f"…{prompt[-limit:]}")


# ---- editing an inversion -----------------------------------------------------------------------------------------
def prepare_inversion_edit(pipe, inversion: Inversion, pipe_kwargs: dict) -> tuple[str, InversionGuidance]:
    """For ``pc.edit(pipe, inversion, edits, ...)``: the source prompt and the controller to add; fills
    ``pipe_kwargs`` (in place) with x_T, the steps, guidance and size of the inversion.

    Raises ``ValueError`` for arguments that contradict the inversion (other steps, size, latents, several
    images per prompt).
    """
    if not isinstance(inversion, Inversion):
        raise TypeError(f"expected a pc.Inversion, got {type(inversion).__name__}")
    own = inversion.pipe_kwargs(pipe)
    steps = pipe_kwargs.get("num_inference_steps")
    if steps is not None and int(steps) != inversion.steps:
        raise ValueError(
            f"num_inference_steps={steps} does not match the inversion's {inversion.steps} steps: leave it out, "
            f"or invert again with steps={steps}"
        )
    for key in ("height", "width"):
        if pipe_kwargs.get(key) is not None and int(pipe_kwargs[key]) != own[key]:
            raise ValueError(f"{key}={pipe_kwargs[key]} does not match the inverted image's {key} {own[key]}: leave it out")
    if pipe_kwargs.get("latents") is not None:
        raise ValueError("an edit of an inversion starts from the inversion's x_T: do not pass latents=")
    for key in ("negative_prompt", "negative_prompt_embeds", "negative_prompt_2"):
        if pipe_kwargs.get(key) is not None:
            raise ValueError(
                f"{key}= has no effect on an edit of an inversion: its null embeddings are the unconditional text "
                "at every step (invert with method='ddim' and edit from plain prompts to use a negative prompt)"
            )
    if int(pipe_kwargs.get("num_images_per_prompt") or 1) != 1:
        raise ValueError("an edit of an inversion makes one image per prompt (sampling is deterministic): drop num_images_per_prompt")
    for key, value in own.items():
        if pipe_kwargs.get(key) is None:
            pipe_kwargs[key] = value
    return inversion.prompt, InversionGuidance(inversion)


def starting_noise(pipe, count: int, seed: int | None, pipe_kwargs: dict) -> torch.Tensor:
    """Latents ``(count * images_per_prompt, C, h, w)``: one draw repeated for every prompt (same layout start)."""
    per_prompt = int(pipe_kwargs.get("num_images_per_prompt") or 1)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer  # the denoiser: UNet or transformer
    factor = getattr(pipe, "vae_scale_factor", 8)
    generator = None if seed is None else torch.Generator("cpu").manual_seed(int(seed))
    device = getattr(pipe, "_execution_device", None) or denoiser.device
    if hasattr(denoiser, "single_transformer_blocks") and hasattr(pipe, "_pack_latents"):
        base = _packed_flux_noise(pipe, denoiser, per_prompt, factor, generator, pipe_kwargs)  # (n, tokens, 4c)
    else:
        height = pipe_kwargs.get("height") or denoiser.config.sample_size * factor
        width = pipe_kwargs.get("width") or denoiser.config.sample_size * factor
        shape = (per_prompt, denoiser.config.in_channels, int(height) // factor, int(width) // factor)
        base = torch.randn(shape, generator=generator, dtype=torch.float32)
    return base.repeat(count, *([1] * (base.ndim - 1))).to(device=device, dtype=denoiser.dtype)


def _packed_flux_noise(pipe, denoiser, count: int, factor: int, generator, pipe_kwargs: dict) -> torch.Tensor:
    """Flux's starting noise as its pipeline draws it: (count, C/4, h, w) on a grid of 2×2 patches, packed to
    (count, h/2 · w/2, C) tokens."""
    channels = int(denoiser.config.in_channels) // 4
    size = getattr(pipe, "default_sample_size", 128) * factor
    height, width = int(pipe_kwargs.get("height") or size), int(pipe_kwargs.get("width") or size)
    h, w = 2 * (height // (factor * 2)), 2 * (width // (factor * 2))
    noise = torch.randn((count, channels, h, w), generator=generator, dtype=torch.float32)
    return pipe._pack_latents(noise, count, channels, h, w)


def edit(
    pipe,
    source: str | Inversion,
    edits: str | Sequence[str],
    *,
    cross_steps: ScheduleLike = 0.8,
    self_steps: WindowLike = 0.4,
    blend: Any = None,
    reweight: Any = None,
    seed: int | None = None,
    mode: str = "auto",
    self_levels: Sequence[int] | None = None,
    blend_threshold: float = 0.3,
    **pipe_kwargs,
) -> EditResult:
    """Generate ``source`` and each of ``edits`` from the same noise, keeping the source's layout.

    cross_steps: fraction, ``(start, end)`` or per-word dict (words of the edited prompts, ``"default"``)
    self_steps:  fraction or ``(start, end)``: steps on which the source self-attention is injected
    blend:       words for :class:`LocalBlend` (a list, or one list per prompt), or a ``LocalBlend``
    reweight:    ``{word: weight}`` for the edited prompts that hold each word, a list of dicts (one per edit),
                 or a ``pc.Reweight`` (the source keeps its attention)
    seed:        seed of the shared starting noise (``None``: a random draw, still shared)
    mode:        ``"auto"`` (Replace for same word count, else Refine), ``"replace"`` or ``"refine"``
    pipe_kwargs: passed to the pipeline (``num_inference_steps``, ``guidance_scale``, ``height``, ``output_type``...)

    ``source`` may be a :class:`~promptcontrol.Inversion` of a real image (``pc.invert``): its prompt is the source
    prompt, every prompt starts from its x_T with its steps, and its null embeddings guide every row.
    """
    inverted = None
    if isinstance(source, Inversion):  # a real image: see promptcontrol.inversion and prepare_inversion_edit
        source, inverted = prepare_inversion_edit(pipe, source, pipe_kwargs)
    if not isinstance(source, str):
        raise TypeError(f"source must be a prompt string, got {type(source).__name__}")
    edits = _edit_prompts(edits)
    for reserved in ("prompt", "prompt_embeds"):
        if reserved in pipe_kwargs:
            raise TypeError(f"pc.edit builds the prompt batch itself; do not pass {reserved}=")
    prompts = [source, *edits]
    _warn_unseen_edits(word_tokenizer(pipe) or getattr(pipe, "tokenizer_2", None), source, edits)
    controllers: list[Any] = [AutoEdit(cross_steps, mode=mode)]
    if not window(self_steps, "self_steps").is_empty:
        controllers.append(InjectSelf(self_steps, levels=self_levels))
    if reweight is not None:
        controllers.append(_reweight_controller(reweight, edits, word_tokenizer(pipe)))
    if blend is not None:
        controllers.append(blend if isinstance(blend, LocalBlend) else LocalBlend(blend, blend_threshold))
    if inverted is not None:
        controllers.append(inverted)
    if "latents" in pipe_kwargs and pipe_kwargs["latents"] is not None:
        latents = pipe_kwargs.pop("latents")
        per_prompt = int(pipe_kwargs.get("num_images_per_prompt") or 1)
        if latents.shape[0] == per_prompt:
            latents = latents.repeat(len(prompts), 1, 1, 1)
    else:
        pipe_kwargs.pop("latents", None)
        latents = starting_noise(pipe, len(prompts), seed, pipe_kwargs)
    with control(pipe, *controllers):
        output = pipe(prompts, latents=latents, **pipe_kwargs)
    images = output.images if hasattr(output, "images") else output[0]
    return EditResult(prompts, list(images), controllers)
