"""The commands ``inspect``, ``generate``, ``edit`` and ``evaluate``: each a parser and a runner.

A runner takes the parsed options, checks what it can before the model loads, and returns the files it wrote.
``--model`` takes any pipeline folder ``load_pipeline`` loads: SD 1.x/2.x, SDXL, SD3 / SD3.5, PixArt-Σ, Sana.
Where the pipeline's ``__call__`` takes them, the call also gets ``use_resolution_binning=False``,
``clean_caption=False`` and ``complex_human_instruction=None`` (see ``pipeline_call.FACE_CALL_DEFAULTS``), and
``run.json`` records them as ``pipeline_arguments``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..pipeline_call import pipeline_call_kwargs, quiet_diffusers_logs, seeded_generator
from .args import (CliError, common_options, explained_model_errors, guidance_scale, positive_int, seed_value,
                   step_fraction, word_weight)


# ---- parsers ------------------------------------------------------------------------------------------------
def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="generate and draw per-word heat maps of the cross-attention")
    p.add_argument("prompt")
    p.add_argument("--words", nargs="+", default=None, help="words or phrases to draw (default: every word)")
    p.add_argument("--per-step", action="store_true", help="also record per-step maps and draw a strip per word")
    p.add_argument("--normalize", default="word", choices=["word", "global", "none"])
    p.add_argument("--weighting", default="level", choices=["level", "resolution", "layer"],
                   help="how levels are averaged: level (default: each level the same), resolution (∝ a level's "
                        "h·w: finer maps count more), layer (each site the same); see docs/inspect.md")
    common_options(p)
    p.set_defaults(run=run_inspect)


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate with per-word weights: 'a (red:1.5) circle', 'square-'")
    p.add_argument("prompt", nargs="+", help="one or more prompts with weight syntax")
    p.add_argument("--mode", default="attention", choices=["attention", "softmax", "embedding"])
    p.add_argument("--negative", default=None, help="negative prompt")
    common_options(p)
    p.set_defaults(run=run_generate)


def add_edit(sub) -> None:
    p = sub.add_parser("edit", help="edit a prompt while keeping the layout (prompt-to-prompt)")
    p.add_argument("source")
    p.add_argument("edits", nargs="+")
    p.add_argument("--cross-steps", type=step_fraction, default=0.8, help="fraction of steps with the source's cross-attention")
    p.add_argument("--self-steps", type=step_fraction, default=0.4, help="fraction of steps with the source's self-attention")
    p.add_argument("--blend", nargs="+", default=None, help="words whose region may change (local blend)")
    p.add_argument("--reweight", nargs="+", type=word_weight, default=None, metavar="WORD=W", help="weights in the edits")
    p.add_argument("--edit-mode", default="auto", choices=["auto", "replace", "refine"])
    common_options(p)
    p.set_defaults(run=run_edit)


def add_evaluate(sub) -> None:
    """Its own options (not the common block): the measurement's defaults differ (cpu, seed 1234, no --out)."""
    p = sub.add_parser("evaluate", help="measure a model against the toy world's ground truth (embedded model)")
    p.add_argument("--model", default=None, help="pipeline folder or hub id (default: the embedded toy model)")
    p.add_argument("--random", nargs="?", const="toy", default=None, choices=["toy", "toy-sd3"],
                   help="a random-weight model of an embedded model's shape (the baseline): toy (default) or toy-sd3 "
                        "(random transformer and text encoders over toy-sd3's autoencoder)")
    p.add_argument("--only", nargs="+", default=None, metavar="PART",
                   help="measure only these: captions, maps, edits, weights, blend (default: all), and concepts "
                        "(SD3 / Flux only: ConceptAttention maps vs raw attention, never in the default)")
    p.add_argument("--quick", action="store_true",
                   help="smaller prompt sets (16 captions, 8 maps, 4 swaps, 4 weights, 4 + 2 blend swaps)")
    p.add_argument("--maps-by-level", action="store_true",
                   help="also print noun / adjective map mIoU of each recorded (place, level) alone")
    p.add_argument("--map-sites", nargs="+", default=None, metavar="PLACE:LEVEL",
                   help="sites of the map rows, e.g. down:0 up:1, or 'all' (every site but the mid block's); default: "
                        "the map rule of docs/embedded-model.md")
    p.add_argument("--map-weighting", default=None, choices=["level", "resolution", "layer"],
                   help="how the map rows weigh the levels (default: the map rule of docs/embedded-model.md)")
    p.add_argument("--blend-threshold", type=float, default=None,
                   help="local-blend mask threshold, a share of the map's maximum (default: the blend rule)")
    p.add_argument("--blend-levels", nargs="+", default=None, metavar="LEVEL",
                   help="levels whose maps make the local-blend mask (default: the blend rule)")
    p.add_argument("-n", "--captions", type=positive_int, default=None, help="captions for caption accuracy (default 48)")
    p.add_argument("--seed", type=seed_value, default=1234, help="seed of the caption and map prompt set (default 1234)")
    p.add_argument("--seed-offset", type=int, default=0,
                   help="add this to every prompt set's seed (captions, swaps, weights, blends): fresh sets for a report")
    p.add_argument("--steps", type=positive_int, default=20, help="denoising steps (default 20)")
    p.add_argument("--guidance", type=guidance_scale, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or mps")
    p.add_argument("--out", default=None, help="also write report.json and report.md into this folder")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(run=run_evaluate, dtype="auto")


# ---- pipeline -----------------------------------------------------------------------------------------------
def load(args: argparse.Namespace) -> Any:
    """The pipeline of ``--model`` / ``--device`` / ``--dtype``; loading errors → :class:`CliError`."""
    from ..loading import load_pipeline

    device = None if args.device == "auto" else args.device
    dtype = None if args.dtype == "auto" else args.dtype
    try:
        with explained_model_errors(), quiet_diffusers_logs():  # its log lines would come before our one line
            pipe = load_pipeline(args.model, device=device, dtype=dtype)
    except FileNotFoundError as error:
        raise CliError(str(error), "check the --model path, or leave --model out for the embedded model") from error
    pipe.set_progress_bar_config(disable=args.quiet, leave=False)
    return pipe


def call_kwargs(args: argparse.Namespace, pipe) -> dict[str, Any]:
    """Steps, guidance and size of the pipeline call, plus what ``pipe.__call__`` takes of
    :data:`~promptcontrol.pipeline_call.FACE_CALL_DEFAULTS` (PixArt / Sana: no resolution binning, no caption
    cleaning; Sana: no complex human instruction)."""
    return pipeline_call_kwargs(pipe, args.steps, args.guidance, args.size)


def parameters(args: argparse.Namespace, pipe=None) -> dict[str, Any]:
    """The options as ``run.json`` records them, and (``pipeline_arguments``) what the call added for ``pipe``."""
    from ..pipeline_call import accepted_call_defaults

    recorded = {k: v for k, v in vars(args).items() if k not in {"run", "force", "quiet"}}
    added = accepted_call_defaults(pipe) if pipe is not None else {}
    if added:  # PixArt / Sana; nothing on SD / SD3, whose records stay as they were
        recorded["pipeline_arguments"] = added
    return recorded


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-") or "word"


# ---- runners ------------------------------------------------------------------------------------------------
def run_inspect(args: argparse.Namespace) -> list[str]:
    from ..outputs import RunFolder, run_record
    from ..tokens import tokenize
    from ..tracing import trace

    run = RunFolder(args.out, force=args.force)  # check --out before loading the model
    pipe = load(args)
    if args.words:  # check the words before spending the generation on them
        prompt_tokens = tokenize(pipe.tokenizer, args.prompt)
        for word in args.words:
            prompt_tokens.find(word)
    with run:
        with trace(pipe, per_step=args.per_step) as tr:
            images = pipe(args.prompt, num_images_per_prompt=args.batch, generator=seeded_generator(args.seed),
                          **call_kwargs(args, pipe)).images
        files = []
        for i, image in enumerate(images):
            files += _draw_maps(args, run, tr, i, image, stem=f"image_{i}" if len(images) > 1 else "image")
        run.write_json("run.json", run_record("inspect", parameters(args, pipe), files + ["run.json"]))
    return [f"{args.out}/{f}" for f in files]


def _draw_maps(args: argparse.Namespace, run, tr, i: int, image, stem: str) -> list[str]:
    """Image ``i``, its grid, its maps file, an overlay per word (and a per-step strip); returns the files."""
    image.save(run.file(f"{stem}.png"))
    maps = tr.heatmaps(image_index=i, normalize=None if args.normalize == "none" else args.normalize,
                       weighting=args.weighting)
    words = args.words or maps.words
    maps.grid(image, words=words).save(run.file(f"{stem}_grid.png"))
    maps.save(run.file(f"{stem}_maps.safetensors"))
    files = [f"{stem}.png", f"{stem}_grid.png", f"{stem}_maps.safetensors"]
    for label in dict.fromkeys(words):
        name = f"maps/{stem}_{_slug(label)}.png"
        maps[label].overlay(image, legend=True).save(run.file(name))
        files.append(name)
        if args.per_step:
            name = f"maps/{stem}_{_slug(label)}_steps.png"
            maps.strip(label, image).save(run.file(name))
            files.append(name)
    return files


def run_generate(args: argparse.Namespace) -> list[str]:
    from ..generation import generate
    from ..outputs import RunFolder, run_record

    run = RunFolder(args.out, force=args.force)  # check --out before loading the model
    pipe = load(args)
    with run:
        several = len(args.prompt) > 1
        negative = [args.negative] * len(args.prompt) if several and args.negative is not None else args.negative
        images = generate(
            pipe,
            args.prompt if several else args.prompt[0],
            mode=args.mode,
            negative_prompt=negative,  # the pipeline wants a list beside a list of prompts
            num_images_per_prompt=args.batch,
            generator=seeded_generator(args.seed),
            **call_kwargs(args, pipe),
        )
        files = []
        for i, image in enumerate(images):
            name = f"image_{i}.png" if len(images) > 1 else "image.png"
            image.save(run.file(name))
            files.append(name)
        run.write_json("run.json", run_record("generate", parameters(args, pipe), files + ["run.json"]))
    return [f"{args.out}/{f}" for f in files]


def run_edit(args: argparse.Namespace) -> list[str]:
    from ..editing import edit
    from ..outputs import RunFolder, run_record

    if args.batch != 1:
        raise CliError("edit makes one image per prompt", "leave --batch out for edit")
    run = RunFolder(args.out, force=args.force)  # check --out before loading the model
    pipe = load(args)
    with run:
        result = edit(
            pipe,
            args.source,
            args.edits,
            cross_steps=args.cross_steps,
            self_steps=args.self_steps,
            blend=args.blend,
            reweight=dict(args.reweight) if args.reweight else None,
            mode=args.edit_mode,
            seed=args.seed,
            **call_kwargs(args, pipe),
        )
        files = ["source.png", "grid.png"]
        result.source.save(run.file("source.png"))
        for i, image in enumerate(result.edited):
            image.save(run.file(f"edit_{i}.png"))
            files.append(f"edit_{i}.png")
        result.grid().save(run.file("grid.png"))
        run.write_json("run.json", run_record("edit", parameters(args, pipe), files + ["run.json"]))
    return [f"{args.out}/{f}" for f in files]


def run_evaluate(args: argparse.Namespace) -> list[str]:
    from dataclasses import replace

    from ..outputs import RunFolder
    from ..toy import evaluate

    parts = tuple(args.only) if args.only else evaluate.PARTS
    concepts = "concepts" in parts  # measured by toy.concept_truth, after evaluate's parts
    parts = tuple(p for p in parts if p != "concepts")
    try:
        if parts or not concepts:
            evaluate.check_parts(parts)  # before loading the model
    except ValueError as error:
        raise CliError(str(error), "--only takes measurement names (and concepts)") from None
    if args.random and args.model:
        raise CliError("--random and --model both given", "pick one model")
    if args.maps_by_level and "maps" not in parts:
        raise CliError("--maps-by-level breaks down the maps part, which --only leaves out", "add maps to --only")
    map_rule, blend_rule = _evaluate_rules(args, evaluate)
    sets = evaluate.QUICK if args.quick else evaluate.PromptSets()
    sets = replace(sets, seed=args.seed, **({} if args.captions is None else {"captions": args.captions}))
    sets = sets.shifted(args.seed_offset)
    if args.out is not None:
        RunFolder(args.out, force=args.force)  # refuse a non-empty --out before measuring
    if args.random:
        pipe = _random_pipeline(args.random).to(args.device)
    else:
        pipe = load(args)

    def progress(part: str) -> None:
        if not args.quiet:
            print(f"measuring {part} ...", file=sys.stderr, flush=True)

    if concepts:
        _check_concepts(pipe)
    try:
        report = (evaluate.evaluate(pipe, sets=sets, parts=parts, steps=args.steps, guidance_scale=args.guidance,
                                    progress=progress, map_rule=map_rule, blend_rule=blend_rule,
                                    by_level=args.maps_by_level)
                  if parts else evaluate.TruthReport(settings=evaluate.report_settings(
                      sets, args.steps, args.guidance, map_rule, blend_rule)))
    except ValueError as error:
        if "no recorded site matches" not in str(error):
            raise
        raise CliError(str(error), "pick recorded sites with --map-sites PLACE:LEVEL ...") from None
    if concepts:
        from ..toy.concept_truth import concept_truth

        progress("concepts")
        report.concepts = concept_truth(pipe, evaluate.eval_samples(sets.maps, sets.seed), seed=sets.seed,
                                        steps=args.steps, guidance_scale=args.guidance, raw_rule=map_rule)
    table = report.table()
    print(table)
    if args.out is None:
        return []
    return _write_report(args, report, table)


def _check_concepts(pipe) -> None:
    """Refuse ``--only concepts`` on a pipeline without joint attention, before anything is measured."""
    from ..toy.concept_truth import check_joint

    try:
        check_joint(pipe)
    except ValueError as error:
        raise CliError(str(error), "--only concepts needs an SD3 / SD3.5 or Flux.1 model, e.g. --model toy-sd3") from None


def _model_label(args: argparse.Namespace) -> str:
    """``random`` (toy shape), ``random toy-sd3``, the ``--model`` given, or ``embedded``."""
    if args.random:
        return "random" if args.random == "toy" else f"random {args.random}"
    return args.model or "embedded"


def _random_pipeline(name: str) -> Any:
    """The random-weight baseline of embedded model ``name`` (``"toy"`` or ``"toy-sd3"``), seed 0."""
    if name == "toy-sd3":
        from ..toy.model_sd3 import build_pipeline as build_sd3

        return build_sd3()
    from ..toy.model import build_pipeline

    return build_pipeline()


def _evaluate_rules(args: argparse.Namespace, evaluate) -> tuple[Any, Any]:
    """The map rule and blend rule of ``--map-sites`` / ``--map-weighting`` / ``--blend-threshold`` /
    ``--blend-levels`` (each left out: the default rule's part)."""
    from dataclasses import replace

    map_rule = evaluate.MAP_RULE
    if args.map_sites is not None:
        try:
            sites = None if args.map_sites == ["all"] else evaluate.PlaceLevels.parse(args.map_sites)
        except ValueError as error:
            raise CliError(str(error), "--map-sites takes PLACE:LEVEL pairs or 'all'") from None
        map_rule = replace(map_rule, sites=sites)
    if args.map_weighting is not None:
        map_rule = replace(map_rule, weighting=args.map_weighting)
    try:
        blend_rule = evaluate.BLEND_RULE.with_options(args.blend_threshold, args.blend_levels)
    except ValueError as error:
        raise CliError(str(error), "--blend-threshold takes a number in [0, 1), --blend-levels ints") from None
    return map_rule, blend_rule


def _write_report(args: argparse.Namespace, report, table: str) -> list[str]:
    """``report.md`` (the printed table), ``report.json`` (rows, measurements, settings, model) and ``run.json``."""
    from dataclasses import asdict

    from ..outputs import RunFolder, run_record

    with RunFolder(args.out, force=args.force) as run:
        run.file("report.md").write_text(table + "\n")
        payload = {"rows": [dict(zip(("metric", "value", "target", "over"), r)) for r in report.rows()],
                   "measurements": {k: v for k, v in asdict(report).items() if k != "settings" and v is not None},
                   "settings": report.settings, "model": _model_label(args)}
        run.write_json("report.json", payload)
        run.write_json("run.json", run_record("evaluate", parameters(args), ["report.md", "report.json", "run.json"]))
    return [f"{args.out}/{f}" for f in ("report.md", "report.json", "run.json")]
