"""``pc.generate``: prompt syntax → weights → one pipeline call.

``generate(pipe, "a (red:2.0) circle and a blue square-", seed=0)`` parses the A1111 / compel syntax of each
prompt (:func:`promptcontrol.parse_prompt`), turns the weighted character spans into token positions with the
pipeline's tokenizer, and runs the pipeline on the *plain* prompts inside ``pc.control(pipe, pc.Reweight(...))``.

Prompt editing (``[from:to:when]``, ``[a|b]``) needs a different text embedding from step ``when`` on. The
pipeline encodes the first step's prompts as usual; every other prompt the schedule reaches is encoded once,
before the run, with the pipeline's own ``encode_prompt``; a
:class:`~promptcontrol.controllers.prompt_schedule.PromptSchedule` controller then swaps the conditional rows'
text features (the UNet's ``encoder_hidden_states``, and on SDXL the pooled text embedding, as A1111 does) at the
steps that use them, and one ``Reweight`` per stretch of steps with the same weights applies that stretch's token
positions.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch

from .controllers.base import Controller
from .controllers.prompt_schedule import PromptSchedule
from .controllers.reweight import MODES, Reweight
from .prompt_syntax import ParsedPrompt, parse_prompt
from .session import control
from .tokens import text_key_weights, word_tokenizer


def _default_steps(pipe) -> int:
    parameter = inspect.signature(pipe.__call__).parameters.get("num_inference_steps")
    if parameter is None or not isinstance(parameter.default, int):
        raise ValueError("pass num_inference_steps: this pipeline has no default step count")
    return parameter.default


def _prompts(prompt: Any, name: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"generate: {name} must be a string or a non-empty list of strings, got {prompt!r}")
    return prompts


def _check_mode(mode: Any) -> None:
    """``ValueError`` listing the modes for anything else (checked on every call, weights or not)."""
    if mode not in MODES:
        raise ValueError(f"generate: mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}")


def _check_weights_for_mode(parsed: ParsedPrompt, mode: str) -> None:
    """Negative weights cannot act under ``mode="softmax"`` (it adds ``log w``): name the words that carry them."""
    if mode != "softmax":
        return
    for span in parsed.spans:
        if span.weight < 0:
            raise ValueError(
                f"generate: {span.text.strip()!r} has the weight {span.weight:g} in the prompt {parsed.source!r}, but "
                "mode='softmax' adds log(weight) to the logits and needs weights >= 0; use mode='attention' for "
                "negative weights, or a weight of 0 to remove the word"
            )


def _parse_negative(
    negative: Any, compel: bool, tokenizer, mode: str, max_sequence_length: int | None = None
) -> tuple[Any, list[dict[int, float]] | None]:
    """(plain negative prompt(s) for the pipeline, token weights per negative prompt or ``None`` when unweighted).

    Weights act on the unconditional rows, as A1111 weights its negative prompt. Prompt editing in a negative
    prompt is not applied (its first step is used, with a warning).
    """
    if negative is None:
        return None, None
    parsed = [parse_prompt(p, compel=compel) for p in _prompts(negative, "negative_prompt")]
    if any(p.is_scheduled for p in parsed):
        warnings.warn("generate: prompt editing in the negative prompt is not applied (its first step is used)", stacklevel=3)
    for p in parsed:
        _check_weights_for_mode(p, mode)
    plain = [p.prompt for p in parsed]
    weights = [text_key_weights(tokenizer, p.token_weights, max_sequence_length) for p in parsed]
    return (plain[0] if isinstance(negative, str) else plain), (weights if any(weights) else None)


_ENCODE_CALL_OPTIONS = ("max_sequence_length", "clean_caption", "complex_human_instruction")
"""Options of a pipeline call that change its text features: passed to ``encode_prompt`` as the call gives them."""


def _encode(pipe, texts: list[str], clip_skip: Any, call: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """Conditional text features ``(N, K, D)`` of ``texts`` by the pipeline's own ``encode_prompt`` (with the call's
    ``max_sequence_length`` / ``clean_caption`` / ``complex_human_instruction`` where it takes them), the pooled
    embeddings ``(N, P)`` of SDXL / SD3 and the text attention mask ``(N, K)`` of PixArt / Sana (``None`` where
    the pipeline has none)."""
    device = getattr(pipe, "_execution_device", None) or pipe.device
    params = inspect.signature(pipe.encode_prompt).parameters
    if "do_classifier_free_guidance" not in params:
        raise NotImplementedError(
            f"prompt editing ([from:to:when]) is not supported on {type(pipe).__name__} yet (its pooled text vector "
            "would keep the first prompt); per-word weights work: drop the [from:to:when] part"
        )
    kwargs = dict(prompt=texts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    kwargs.update({name: None for name in ("prompt_2", "prompt_3") if name in params})  # SD3: the same texts
    kwargs.update({name: call[name] for name in _ENCODE_CALL_OPTIONS if name in params and name in call})
    if clip_skip is not None:
        kwargs["clip_skip"] = clip_skip
    with torch.no_grad():
        encoded = pipe.encode_prompt(**kwargs)
    second = encoded[1] if len(encoded) > 1 else None
    if isinstance(second, torch.Tensor) and second.ndim == 2 and not second.is_floating_point():  # PixArt / Sana
        return encoded[0], None, second
    pooled = encoded[2] if len(encoded) == 4 and isinstance(encoded[2], torch.Tensor) else None
    return encoded[0], pooled, None


def _weight_groups(per_step: list[tuple[dict, ...]]) -> list[tuple[list[int], tuple[dict, ...]]]:
    """Steps with identical per-prompt weights, grouped: ``[(step indices, weights per prompt)]``."""
    groups: dict[tuple, tuple[list[int], tuple[dict, ...]]] = {}
    for step, weights in enumerate(per_step):
        key = tuple(tuple(sorted(w.items())) for w in weights)
        groups.setdefault(key, ([], weights))[0].append(step)
    return [g for g in groups.values() if any(g[1])]


def generate(
    pipe,
    prompt: str | list[str],
    *,
    seed: int | None = None,
    mode: str = "attention",
    compel: bool = True,
    negative_prompt: str | list[str] | None = None,
    **pipe_kwargs: Any,
):
    """Parse the weight syntax of ``prompt``, weight the words, run ``pipe``; returns the pipeline's ``.images``.

    ``prompt``: one prompt or a list (a batch); A1111 emphasis and prompt editing, compel ``+``/``-``/``(..)N``.
    ``seed``: seeds a CPU ``torch.Generator`` (ignored when ``generator=`` is passed). ``mode``: how weights act
    (``"attention"``, ``"softmax"``, ``"embedding"``, see :class:`promptcontrol.Reweight`). ``compel=False``
    reads ``+``/``-`` and ``(..)N`` as plain text. ``negative_prompt``: its weights act on the unconditional
    rows (as A1111 weights the negative prompt). Every other keyword goes to the pipeline (``height``,
    ``width``, ``num_inference_steps``, ``guidance_scale``, ``num_images_per_prompt``, ``output_type``, ...).

    Returns ``pipe(...).images``: PIL images by default, a numpy array for ``output_type="np"``, latents for
    ``output_type="latent"``. Works with SD 1.x / 2.x and SDXL pipelines (SDXL's two tokenizers share token
    positions; ``prompt_2`` passes through as given).
    """
    _check_mode(mode)
    for taken in ("prompt_embeds", "pooled_prompt_embeds"):
        if pipe_kwargs.get(taken) is not None:
            raise ValueError(f"generate parses prompt text; call the pipeline directly to pass {taken}")
    prompts = _prompts(prompt, "prompt")
    parsed: list[ParsedPrompt] = [parse_prompt(p, compel=compel) for p in prompts]
    tokenizer = word_tokenizer(pipe) or getattr(pipe, "tokenizer_2", None)  # T5's on Flux: its text keys
    if tokenizer is None:
        raise ValueError("generate needs a pipeline with a tokenizer (StableDiffusionPipeline, StableDiffusionXLPipeline)")
    if seed is not None and pipe_kwargs.get("generator") is None:
        pipe_kwargs["generator"] = torch.Generator(device="cpu").manual_seed(int(seed))
    negative_plain, negative_weights = _parse_negative(
        negative_prompt, compel, tokenizer, mode, pipe_kwargs.get("max_sequence_length")
    )
    if negative_plain is not None:  # else the pipeline's own default ("" on PixArt / Sana, None on SD)
        pipe_kwargs["negative_prompt"] = negative_plain

    controllers: list[Controller] = []
    weights_cache: dict[tuple, dict[int, float]] = {}

    def weights_of(p: ParsedPrompt) -> dict[int, float]:
        key = (p.prompt, p.spans)
        if key not in weights_cache:
            _check_weights_for_mode(p, mode)
            weights_cache[key] = text_key_weights(tokenizer, p.token_weights, pipe_kwargs.get("max_sequence_length"))
        return weights_cache[key]

    if any(p.is_scheduled for p in parsed):
        if pipe_kwargs.get("prompt_2") is not None:
            raise ValueError("generate: prompt editing ([from:to:when]) with a separate prompt_2 is not supported")
        total = int(pipe_kwargs.get("num_inference_steps") or _default_steps(pipe))
        schedules = [p.schedule(total) for p in parsed]  # [prompt][step]
        parsed = [schedule[0] for schedule in schedules]  # the pipeline encodes step 0 of this run
        texts: list[str] = []
        table: list[list[int | None]] = []
        for step in range(total):
            row: list[int | None] = []
            for index, schedule in enumerate(schedules):
                text = schedule[step].prompt
                if text == schedules[index][0].prompt:
                    row.append(None)
                else:
                    if text not in texts:
                        texts.append(text)
                    row.append(texts.index(text))
            table.append(row)
        if texts:
            embeddings, pooled, mask = _encode(pipe, texts, pipe_kwargs.get("clip_skip"), pipe_kwargs)
            controllers.append(PromptSchedule(embeddings, table, pooled, mask))
        per_step = [tuple(weights_of(schedule[step]) for schedule in schedules) for step in range(total)]
        for steps, weights in _weight_groups(per_step):
            controllers.append(Reweight(list(weights), mode=mode, steps=None if len(steps) == total else steps))
    else:
        weights = [weights_of(p) for p in parsed]
        if any(weights):
            controllers.append(Reweight(weights, mode=mode))

    if negative_weights is not None:  # one dict for every prompt, or one per prompt (a list of negative prompts)
        negative = negative_weights[0] if isinstance(negative_prompt, str) else negative_weights
        controllers.append(Reweight([{}] * len(parsed), mode=mode, negative=negative))

    plain = [schedule.prompt for schedule in parsed]
    call_prompt = plain[0] if isinstance(prompt, str) else plain
    if not controllers:
        return pipe(prompt=call_prompt, **pipe_kwargs).images
    with control(pipe, *controllers):
        return pipe(prompt=call_prompt, **pipe_kwargs).images
