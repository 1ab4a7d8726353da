"""The page's jobs as plain functions over the public API (no Gradio here), each returning its pictures, the
Python code that reproduces them and a run record.

* :func:`inspect` — ``pc.trace`` around one pipeline call: the image, its per-word maps, the files;
  :func:`show_map` — one word's / phrase's / token's map over the image (one step of it when per-step maps were
  recorded); :func:`grid` — every word's map in one picture.
* :func:`emphasise` — ``pc.generate`` from the same seed for each weighting; :func:`prompt_words` and
  :func:`with_weights` — the per-word sliders, read from and written back to the weight syntax.
* :func:`edit` — ``pc.edit`` (after ``pc.invert`` for an uploaded image), with the local blend's mask.

Every pipeline call runs inside :meth:`Runner.job`: one at a time, stoppable between steps, and checked to
leave nothing installed on the pipeline.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

import promptcontrol as pc
from promptcontrol.prompt_syntax import WeightedSpan

from . import code
from .queries import heatmap, word_labels
from .records import run_record, write_record
from .runner import Progress, Runner, generator, no_progress

DISPLAY_SIDE = 256  # pictures smaller than this are enlarged (nearest neighbour) for the page
NORMALIZE = {"word": "word", "global": "global", "none": None}
MAX_STEPS = 1000
# A word of a prompt as the toolkit splits words: letters/digits (with combining accents), inner ' or - allowed.
_MARKS = "\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"
_LETTERS = rf"(?:[^\W_][{_MARKS}]*)+"
_WORD = re.compile(rf"{_LETTERS}(?:['’\-]{_LETTERS})*")


# ---- shared checks and pictures -------------------------------------------------------------------------------
def check_prompt(prompt: Any, what: str = "prompt") -> str:
    """``prompt`` stripped; ``ValueError`` when it is not text or empty."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"the {what} is empty: type one, e.g. 'a red circle and a blue square'")
    return prompt.strip()


def check_settings(seed: Any, steps: Any, guidance: Any) -> tuple[int, int, float]:
    """(seed, steps, guidance) as numbers, or a ``ValueError`` naming the bad one and what it may be."""
    try:
        seed_, steps_, guidance_ = int(seed), int(steps), float(guidance)
    except (TypeError, ValueError):
        raise ValueError(f"seed and steps must be whole numbers and guidance a number; got {seed!r}, {steps!r}, "
                         f"{guidance!r}") from None
    if seed_ != float(seed) or not 0 <= seed_ < 2**63:
        raise ValueError(f"the seed must be a whole number from 0 to 2**63 - 1, got {seed!r}")
    if steps_ != float(steps) or not 1 <= steps_ <= MAX_STEPS:
        raise ValueError(f"steps must be a whole number from 1 to {MAX_STEPS}, got {steps!r}")
    if not math.isfinite(guidance_) or guidance_ < 0:
        raise ValueError(f"guidance must be a finite number of 0 or more (1 or less turns it off), got {guidance!r}")
    return seed_, steps_, guidance_


def enlarge(image: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    """``image`` scaled up by a whole factor (nearest neighbour) until its shorter side reaches ``side``."""
    factor = max(1, math.ceil(side / max(1, min(image.size))))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def _mask_picture(mask, size: tuple[int, int]) -> Image.Image:
    """A bool mask ``(h, w)`` as a black/white picture (white = may change) of ``size`` (width, height)."""
    array = mask.to("cpu").numpy().astype("uint8") * 255  # (h, w)
    return Image.fromarray(array).resize(size, Image.NEAREST).convert("RGB")


def _finish(runner: Runner, job: str, folder: Path, parameters: dict, code_text: str, files: list[Path],
            started: float) -> tuple[dict, list[Path]]:
    """The run record, with ``run.json`` and ``reproduce.py`` written beside the job's files."""
    record = run_record(job, parameters, model=runner.model, device=runner.device,
                        seconds=time.perf_counter() - started, files=[f.name for f in files])
    return record, files + write_record(folder, record, code_text)


# ---- inspect -------------------------------------------------------------------------------------------------------
@dataclass
class InspectRun:
    """One traced generation: the image, its maps and the trace (for per-step maps), and what reproduces it."""

    prompt: str
    image: Image.Image
    trace: Any  # pc.Trace (closed; its store keeps the recordings)
    maps: Any  # pc.HeatMaps
    settings: dict
    per_step: bool
    normalize: str | None
    code: str
    record: dict
    folder: Path
    files: list[Path] = field(default_factory=list)

    @property
    def words(self) -> list[str]:
        """Chip labels of the prompt's words (repeats numbered: ``a (1)``, ``a (2)``)."""
        return word_labels(self.maps.words)

    def tokens(self, tokenizer) -> list[tuple[str, str]]:
        """(label, query) of every token position of the prompt: start, its tokens, end, padding."""
        ids = list(self.maps.tokens.input_ids)
        texts = tokenizer.convert_ids_to_tokens(ids) if tokenizer is not None else [str(i) for i in ids]
        found = [("<start>", "<start>")]
        found += [(f"#{p} {texts[p].replace('</w>', '')}", f"#{p}") for p in range(1, len(ids) - 1)]
        found.append(("<end>", "<end>"))
        if self.maps.tokens.padding_positions:
            found.append(("<padding>", "<padding>"))
        return found

    def code_for(self, query: str | None, step: int | None = None) -> str:
        return code.inspect_code(self.settings["load"], self.prompt, seed=self.settings["seed"],
                                 steps=self.settings["steps"], guidance=self.settings["guidance"],
                                 per_step=self.per_step, normalize=self.normalize, query=query, step=step)


def inspect(runner: Runner, prompt: str, *, seed: int = 0, steps: int = 20, guidance: float = 7.5,
            per_step: bool = False, normalize: str = "word", progress: Progress = no_progress) -> InspectRun:
    """Generate ``prompt`` under ``pc.trace`` and build its per-word maps; writes image, maps and record."""
    prompt = check_prompt(prompt)
    seed, steps, guidance = check_settings(seed, steps, guidance)
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZE)}, got {normalize!r}")
    started = time.perf_counter()
    progress(0.0, desc="generating")
    with runner.job():
        with pc.trace(runner.pipe, per_step=bool(per_step)) as tr:
            image = runner.pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator(seed),
                                callback_on_step_end=runner.step_callback(progress, steps)).images[0]
    maps = tr.heatmaps(normalize=NORMALIZE[normalize])
    folder = runner.folder("inspect")
    image.save(folder / "image.png")
    files = [folder / "image.png", maps.save(folder / "maps.safetensors")]
    settings = dict(load=runner.load, seed=seed, steps=steps, guidance=guidance)
    run = InspectRun(prompt, image, tr, maps, settings, bool(per_step), NORMALIZE[normalize], "", {}, folder)
    first = run.words[0] if run.words else None
    run.code = run.code_for(first)
    parameters = dict(prompt=prompt, seed=seed, steps=steps, guidance=guidance, per_step=bool(per_step),
                      normalize=normalize)
    run.record, run.files = _finish(runner, "inspect", folder, parameters, run.code, files, started)
    return run


def show_map(run: InspectRun, query: str, step: int | None = None) -> tuple[Image.Image, str]:
    """(the map of ``query`` over the image, enlarged for the page; the code that draws it).

    ``query``: a word, a phrase, ``"a (2)"`` for one occurrence, ``"#5"`` for a token, ``"<end>"`` (see
    :mod:`.queries`). ``step``: that denoising step's map alone (needs ``per_step``); ``None``: all steps.
    """
    maps = run.maps
    if step is not None:
        if not run.per_step:
            raise ValueError("no per-step maps were recorded: tick 'record per-step maps' and run the inspect again")
        step = int(step)
        if not 0 <= step < run.settings["steps"]:
            raise ValueError(f"step must be from 0 to {run.settings['steps'] - 1}, got {step}")
        maps = run.trace.heatmaps(steps=[step], normalize=run.normalize)
    overlay = heatmap(maps, query).overlay(run.image)
    return enlarge(overlay), run.code_for(query, step)


def grid(run: InspectRun) -> Path:
    """Every word's map over the image in one labelled picture, saved as ``grid.png`` beside the run's files."""
    path = run.folder / "grid.png"
    run.maps.grid(run.image).save(path)
    if path not in run.files:
        run.files.append(path)
    return path


# ---- emphasise --------------------------------------------------------------------------------------------------
@dataclass
class EmphasiseRun:
    """Images of one prompt under several weightings, all from the same seed."""

    prompts: list[str]
    images: list[Image.Image]
    code: str
    record: dict
    folder: Path
    files: list[Path] = field(default_factory=list)


def prompt_words(prompt: str) -> list[tuple[str, float]]:
    """(word, weight) for each word of the plain prompt, weights read from the syntax (1 where none)."""
    parsed = pc.parse_prompt(prompt)
    return [(m.group(0), parsed.weight_of(m.start(), m.end())) for m in _WORD.finditer(parsed.prompt)]


def with_weights(prompt: str, weights: dict[int, float]) -> str:
    """``prompt`` with the words at these indices (of :func:`prompt_words`) set to these weights, as syntax.

    The others keep their weights from the syntax. A prompt with prompt editing (``[from:to:when]``) is refused:
    writing it back from its words would drop the schedule.
    """
    parsed = pc.parse_prompt(prompt)
    if parsed.is_scheduled:
        raise ValueError("this prompt uses prompt editing ([from:to:when] or [a|b]): set its weights in the "
                         "syntax itself; rewriting it from its words would drop the schedule")
    spans = []
    for index, m in enumerate(_WORD.finditer(parsed.prompt)):
        weight = float(weights.get(index, parsed.weight_of(m.start(), m.end())))
        if not math.isfinite(weight):
            raise ValueError(f"the weight of {m.group(0)!r} must be a finite number, got {weight}")
        if weight != 1.0:
            spans.append(WeightedSpan(m.start(), m.end(), round(weight, 4), m.group(0)))
    return pc.ParsedPrompt(source=prompt, prompt=parsed.prompt, spans=tuple(spans)).to_syntax()


def parse_values(text: str) -> list[float]:
    """``"0.5, 1, 2"`` → ``[0.5, 1.0, 2.0]``; ``ValueError`` naming the piece that is not a number."""
    values = []
    for piece in re.split(r"[,\s;]+", text or ""):
        if not piece:
            continue
        try:
            value = float(piece)
        except ValueError:
            raise ValueError(f"{piece!r} is not a number: give weights like 0.5, 1, 2") from None
        if not math.isfinite(value):
            raise ValueError(f"weights must be finite numbers, got {piece!r}")
        values.append(value)
    return values


def compared_prompts(prompt: str, word: str | None, values: list[float]) -> list[str]:
    """The plain prompt, ``prompt`` itself, then ``prompt`` with ``word`` (every occurrence) at each value."""
    parsed = pc.parse_prompt(prompt)
    prompts = [parsed.prompt, prompt]
    if word and values:
        words = prompt_words(prompt)
        at = [i for i, (w, _) in enumerate(words) if w.lower() == word.strip().lower()]
        if not at:
            raise KeyError(f"{word!r} is not in the prompt {parsed.prompt!r}; its words are: "
                           f"{', '.join(w for w, _ in words)}")
        prompts += [with_weights(prompt, {i: v for i in at}) for v in values]
    return list(dict.fromkeys(prompts))  # each once, in order


def emphasise(runner: Runner, prompt: str, *, mode: str = "attention", seed: int = 0, steps: int = 20,
              guidance: float = 7.5, compare_word: str | None = None, compare_values: str | list[float] = "",
              progress: Progress = no_progress) -> EmphasiseRun:
    """``pc.generate`` from one seed for the plain prompt, ``prompt`` as written and each compared weight."""
    prompt = check_prompt(prompt)
    seed, steps, guidance = check_settings(seed, steps, guidance)
    values = parse_values(compare_values) if isinstance(compare_values, str) else [float(v) for v in compare_values]
    prompts = compared_prompts(prompt, compare_word or None, values)
    started = time.perf_counter()
    images = []
    total = steps * len(prompts)
    with runner.job():
        for k, p in enumerate(prompts):
            callback = runner.step_callback(progress, total, offset=k * steps)
            images.append(pc.generate(runner.pipe, p, seed=seed, mode=mode, num_inference_steps=steps,
                                      guidance_scale=guidance, callback_on_step_end=callback)[0])
    folder = runner.folder("emphasise")
    files = []
    for k, image in enumerate(images):
        image.save(folder / f"image_{k}.png")
        files.append(folder / f"image_{k}.png")
    code_text = code.emphasise_code(runner.load, prompts, mode=mode, seed=seed, steps=steps, guidance=guidance)
    parameters = dict(prompt=prompt, prompts=prompts, mode=mode, seed=seed, steps=steps, guidance=guidance,
                      compare_word=compare_word or None, compare_values=values)
    record, files = _finish(runner, "emphasise", folder, parameters, code_text, files, started)
    return EmphasiseRun(prompts, images, code_text, record, folder, files)


# ---- edit ----------------------------------------------------------------------------------------------------------
@dataclass
class EditRun:
    """The source and its edits from the same noise, the blend masks, and what reproduces them."""

    prompts: list[str]
    images: list[Image.Image]
    masks: list[Image.Image]  # one per edit when a blend was asked: white where the edit may change the source
    code: str
    record: dict
    folder: Path
    files: list[Path] = field(default_factory=list)


def split_lines(text: str | list[str]) -> list[str]:
    """Edited prompts, one per line (blank lines dropped)."""
    lines = text if isinstance(text, list) else (text or "").splitlines()
    return [line.strip() for line in lines if line and line.strip()]


def split_words(text: str | list[str] | None) -> list[str]:
    """Blend words: ``"circle, blue square"`` → ``["circle", "blue square"]``."""
    if isinstance(text, list):
        return [w.strip() for w in text if w and w.strip()]
    return [w.strip() for w in (text or "").split(",") if w.strip()]


def parse_weights(text: str | dict | None) -> dict[str, float]:
    """``"green=1.5, blue square=0.5"`` → ``{"green": 1.5, "blue square": 0.5}``."""
    if isinstance(text, dict):
        return {str(k): float(v) for k, v in text.items()}
    weights = {}
    for piece in (text or "").split(","):
        if not piece.strip():
            continue
        word, sep, value = piece.rpartition("=")
        if not sep or not word.strip():
            raise ValueError(f"a reweight looks like green=1.5 (several: green=1.5, square=0.5), got {piece.strip()!r}")
        try:
            weights[word.strip()] = float(value)
        except ValueError:
            raise ValueError(f"the weight of {word.strip()!r} is not a number: {value.strip()!r}") from None
    return weights


def _check_fraction(value: Any, name: str) -> float:
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = math.nan
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{name} is a share of the steps, from 0 to 1; got {value!r}")
    return fraction


def _input_image(runner: Runner, image: Image.Image, folder: Path, resize: bool) -> Path:
    """The uploaded picture as RGB (at the model's size when ``resize``), saved as ``input.png``."""
    picture = image.convert("RGB")
    if resize and picture.size != runner.image_size():
        picture = picture.resize(runner.image_size(), Image.LANCZOS)
    path = folder / "input.png"
    picture.save(path)
    return path


def _inversion(runner: Runner, path: Path, source: str, steps: int, method: str, guidance: float, progress: Progress):
    """``pc.invert`` of the picture at ``path``, reusing the last one for the same picture and settings."""
    key = (hashlib.sha256(path.read_bytes()).hexdigest(), source, steps, method, guidance)
    if key not in runner.inversions:
        progress(0.0, desc=f"inverting the image ({method})")
        inverted = pc.invert(runner.pipe, str(path), source, steps=steps, method=method, guidance_scale=guidance,
                             reconstruct=False)
        runner.inversions.clear()  # keep one: an inversion holds steps + 1 latents
        runner.inversions[key] = inverted
    return runner.inversions[key]


def _blend_masks(blend, count: int, size: tuple[int, int]) -> list[Image.Image]:
    """Edit ``i``'s mask as prompt-to-prompt applies it: the source's region united with the edit's."""
    mask = getattr(blend, "last_mask", None)
    if mask is None:
        return []
    return [_mask_picture(mask[0, 0] | mask[i, 0], size) for i in range(1, count)]


def edit(runner: Runner, source: str, edits: str | list[str], *, cross_steps: float = 0.8, self_steps: float = 0.4,
         blend: str | list[str] | None = None, blend_threshold: float = 0.3, reweight: str | dict | None = None,
         mode: str = "auto", seed: int = 0, steps: int = 20, guidance: float = 7.5, image: Image.Image | None = None,
         invert_method: str = "null-text", resize: bool = True, progress: Progress = no_progress) -> EditRun:
    """``pc.edit`` of ``source`` into each edited prompt from the same noise (of an uploaded image: its inversion)."""
    source = check_prompt(source, "source prompt")
    edits = split_lines(edits)
    if not edits:
        raise ValueError("give at least one edited prompt (one per line)")
    seed, steps, guidance = check_settings(seed, steps, guidance)
    cross, self_ = _check_fraction(cross_steps, "cross_steps"), _check_fraction(self_steps, "self_steps")
    words, weights = split_words(blend), parse_weights(reweight)
    threshold = _check_fraction(blend_threshold, "the blend threshold")
    started = time.perf_counter()
    folder = runner.folder("edit")
    files: list[Path] = []
    with runner.job():
        first: Any = source
        run_kwargs: dict[str, Any] = dict(seed=seed, num_inference_steps=steps, guidance_scale=guidance)
        if image is not None:
            path = _input_image(runner, image, folder, resize)
            files.append(path)
            first, run_kwargs = _inversion(runner, path, source, steps, invert_method, guidance, progress), {}
        blender = pc.LocalBlend(words, threshold) if words else None
        out = pc.edit(runner.pipe, first, edits, cross_steps=cross, self_steps=self_, blend=blender,
                      reweight=weights or None, mode=mode, callback_on_step_end=runner.step_callback(progress, steps),
                      **run_kwargs)
    masks = _blend_masks(blender, len(out.images), out.source.size) if blender is not None else []
    for k, picture in enumerate(out.images):
        name = "source.png" if k == 0 else f"edit_{k}.png"
        picture.save(folder / name)
        files.append(folder / name)
    out.grid().save(folder / "grid.png")
    files.append(folder / "grid.png")
    code_text = code.edit_code(runner.load, source, edits, cross_steps=cross, self_steps=self_, blend=words or None,
                               blend_threshold=threshold, reweight=weights or None, mode=mode, seed=seed, steps=steps,
                               guidance=guidance, image="input.png" if image is not None else None,
                               invert_method=invert_method)
    parameters = dict(source=source, edits=edits, cross_steps=cross, self_steps=self_, blend=words,
                      blend_threshold=threshold, reweight=weights, mode=mode, seed=seed, steps=steps,
                      guidance=guidance, image="input.png" if image is not None else None,
                      invert_method=invert_method if image is not None else None)
    record, files = _finish(runner, "edit", folder, parameters, code_text, files, started)
    return EditRun(list(out.prompts), list(out.images), masks, code_text, record, folder, files)
