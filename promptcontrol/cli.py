"""The command line: ``promptcontrol inspect | generate | edit | evaluate`` (also ``python -m promptcontrol``).

Each job loads a pipeline (the embedded model by default, ``--model`` for a hub id or a local folder), runs,
and writes its pictures and a ``run.json`` into ``--out`` all at once (see :mod:`promptcontrol.outputs`).
Bad input exits with status 2 and a one-line reason plus a hint; numbers (steps, batch, guidance, seed, fractions,
weights, size) and ``--out`` are checked before the model loads. Ctrl-C exits with status 130 and one line.
"""

from __future__ import annotations

import argparse
import math
import sys
from contextlib import contextmanager
from typing import Any, Callable

EXIT_BAD_INPUT = 2
MODEL_FOLDER_HINT = "save the pipeline again (pipe.save_pretrained) or copy the folder again"


class CliError(Exception):
    """A user-facing failure: a one-line reason and a hint."""

    def __init__(self, reason: str, hint: str = ""):
        super().__init__(reason)
        self.reason, self.hint = reason, hint


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` → (height, width); an argparse type shared by every job's ``--size``."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512 (width x height), got {text!r}") from None
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        raise argparse.ArgumentTypeError(f"width and height must be positive multiples of 8, got {text!r}")
    return h, w


SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes seeds up to this


def _number(text: str, kind: type, what: str):
    """``kind(text)`` or an ``ArgumentTypeError`` that says what was expected."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    """A whole number of 1 or more (steps, images per prompt, counts)."""
    value = _number(text, int, "a whole number of 1 or more")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of 1 or more, got {text!r}")
    return value


def seed_value(text: str) -> int:
    """A seed: a whole number from 0 to 2**64 - 1 (what ``torch.Generator.manual_seed`` takes)."""
    value = _number(text, int, "a whole number from 0 to 2**64 - 1")
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"a seed must be a whole number from 0 to 2**64 - 1, got {text!r}")
    return value


def guidance_scale(text: str) -> float:
    """A finite guidance scale of 0 or more (1 or less turns classifier-free guidance off)."""
    value = _number(text, float, "a number such as 7.5")
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of 0 or more (1 or less turns guidance off), "
                                         f"got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0 (e.g. hours)."""
    value = _number(text, float, "a number above 0")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text!r}")
    return value


def step_fraction(text: str) -> float:
    """A share of the denoising steps, in [0, 1]."""
    value = _number(text, float, "a step fraction in [0, 1], such as 0.8")
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"a step fraction must be in [0, 1], got {text!r}")
    return value


def word_weight(text: str) -> tuple[str, float]:
    """``word=1.5`` → ("word", 1.5); the weight must be a finite number."""
    word, sep, value = text.rpartition("=")
    if not sep or not word:
        raise argparse.ArgumentTypeError(f"a weight looks like word=1.5, got {text!r}")
    try:
        weight = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the weight of {word!r} is not a number: {value!r}") from None
    if not math.isfinite(weight):
        raise argparse.ArgumentTypeError(f"the weight of {word!r} must be a finite number, got {value!r}")
    return word, weight


def _common(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("common options")
    g.add_argument("--model", default=None, help="hub id or local pipeline folder (default: the embedded toy model)")
    g.add_argument("--steps", type=positive_int, default=20, help="denoising steps (default 20)")
    g.add_argument("--guidance", type=guidance_scale, default=7.5, help="classifier-free guidance scale (default 7.5)")
    g.add_argument("--seed", type=seed_value, default=0, help="seed of the starting noise (default 0)")
    g.add_argument("--size", type=parse_size, default=None, metavar="WxH", help="image size (default: the model's)")
    g.add_argument("--batch", type=positive_int, default=1, help="images per prompt (default 1)")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    g.add_argument("--out", required=True, help="output folder (must be empty unless --force)")
    g.add_argument("--force", action="store_true", help="replace a non-empty --out")
    g.add_argument("--quiet", action="store_true", help="no progress bar, no summary")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="promptcontrol",
        description="Inspect, emphasise and edit the cross-attention of Stable Diffusion pipelines.",
    )
    parser.add_argument("--version", action="version", version=f"promptcontrol {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="generate and draw per-word heat maps of the cross-attention")
    p.add_argument("prompt")
    p.add_argument("--words", nargs="+", default=None, help="words or phrases to draw (default: every word)")
    p.add_argument("--per-step", action="store_true", help="also record per-step maps and draw a strip per word")
    p.add_argument("--normalize", default="word", choices=["word", "global", "none"])
    _common(p)
    p.set_defaults(run=run_inspect)

    p = sub.add_parser("generate", help="generate with per-word weights: 'a (red:1.5) circle', 'square-'")
    p.add_argument("prompt", nargs="+", help="one or more prompts with weight syntax")
    p.add_argument("--mode", default="attention", choices=["attention", "softmax", "embedding"])
    p.add_argument("--negative", default=None, help="negative prompt")
    _common(p)
    p.set_defaults(run=run_generate)

    p = sub.add_parser("edit", help="edit a prompt while keeping the layout (prompt-to-prompt)")
    p.add_argument("source")
    p.add_argument("edits", nargs="+")
    p.add_argument("--cross-steps", type=step_fraction, default=0.8, help="fraction of steps with the source's cross-attention")
    p.add_argument("--self-steps", type=step_fraction, default=0.4, help="fraction of steps with the source's self-attention")
    p.add_argument("--blend", nargs="+", default=None, help="words whose region may change (local blend)")
    p.add_argument("--reweight", nargs="+", type=word_weight, default=None, metavar="WORD=W", help="weights in the edits")
    p.add_argument("--edit-mode", default="auto", choices=["auto", "replace", "refine"])
    _common(p)
    p.set_defaults(run=run_edit)

    p = sub.add_parser("evaluate", help="measure a model against the toy world's ground truth (embedded model)")
    p.add_argument("--model", default=None, help="pipeline folder or hub id (default: the embedded toy model)")
    p.add_argument("--random", action="store_true", help="a random-weight model of the embedded shape (the baseline)")
    p.add_argument("--only", nargs="+", default=None, metavar="PART",
                   help="measure only these: captions, maps, edits, weights (default: all)")
    p.add_argument("--quick", action="store_true", help="smaller prompt sets (16 captions, 8 maps, 4 swaps, 4 weights)")
    p.add_argument("-n", "--captions", type=positive_int, default=None, help="captions for caption accuracy (default 48)")
    p.add_argument("--seed", type=seed_value, default=1234, help="seed of the caption and map prompt set (default 1234)")
    p.add_argument("--steps", type=positive_int, default=20, help="denoising steps (default 20)")
    p.add_argument("--guidance", type=guidance_scale, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or mps")
    p.add_argument("--out", default=None, help="also write report.json and report.md into this folder")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(run=run_evaluate, dtype="auto")

    from .sweep import add_sweep_parser  # many prompts across processes (accelerate), resumable

    add_sweep_parser(sub)
    return parser


# ---- pipeline -------------------------------------------------------------------------------------------------
@contextmanager
def quiet_diffusers_logs():
    """diffusers logs nothing inside (loading errors are raised and explained, one line each)."""
    from diffusers.utils import logging as diffusers_logging

    before = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL + 1)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(before)


def _load(args) -> Any:
    from .loading import ModelFolderError, ModelUnavailableError, load_pipeline

    device = None if args.device == "auto" else args.device
    dtype = None if args.dtype == "auto" else args.dtype
    try:
        with quiet_diffusers_logs():  # its log lines about a missing file would come before our one-line error
            pipe = load_pipeline(args.model, device=device, dtype=dtype)
    except ModelUnavailableError as error:
        raise CliError(str(error), "no network: pass a local folder with --model") from error
    except ModelFolderError as error:
        raise CliError(str(error), MODEL_FOLDER_HINT) from error
    except FileNotFoundError as error:
        raise CliError(str(error), "check the --model path, or leave --model out for the embedded model") from error
    pipe.set_progress_bar_config(disable=args.quiet, leave=False)
    return pipe


def _pipe_kwargs(args) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(num_inference_steps=args.steps, guidance_scale=args.guidance)
    if args.size is not None:
        kwargs["height"], kwargs["width"] = args.size
    return kwargs


def _parameters(args) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in {"run", "force", "quiet"}}


def _generator(args, pipe):
    import torch

    return torch.Generator(device="cpu").manual_seed(args.seed)


# ---- jobs ---------------------------------------------------------------------------------------------------
def run_inspect(args) -> list[str]:
    from .outputs import RunFolder, run_record
    from .tokens import tokenize
    from .tracing import trace

    run = RunFolder(args.out, force=args.force)  # check --out before loading the model
    pipe = _load(args)
    if args.words:  # check the words before spending the generation on them
        prompt_tokens = tokenize(pipe.tokenizer, args.prompt)
        for word in args.words:
            prompt_tokens.find(word)
    with run:
        with trace(pipe, per_step=args.per_step) as tr:
            images = pipe(
                args.prompt, num_images_per_prompt=args.batch, generator=_generator(args, pipe), **_pipe_kwargs(args)
            ).images
        files = []
        normalize = None if args.normalize == "none" else args.normalize
        for i, image in enumerate(images):
            stem = f"image_{i}" if len(images) > 1 else "image"
            image.save(run.file(f"{stem}.png"))
            maps = tr.heatmaps(image_index=i, normalize=normalize)
            words = args.words or maps.words
            maps.grid(image, words=words).save(run.file(f"{stem}_grid.png"))
            maps.save(run.file(f"{stem}_maps.safetensors"))
            files += [f"{stem}.png", f"{stem}_grid.png", f"{stem}_maps.safetensors"]
            for label in dict.fromkeys(words):
                name = f"maps/{stem}_{_slug(label)}.png"
                maps[label].overlay(image, legend=True).save(run.file(name))
                files.append(name)
                if args.per_step:
                    name = f"maps/{stem}_{_slug(label)}_steps.png"
                    maps.strip(label, image).save(run.file(name))
                    files.append(name)
        run.write_json("run.json", run_record("inspect", _parameters(args), files + ["run.json"]))
    return [f"{args.out}/{f}" for f in files]


def run_generate(args) -> list[str]:
    from .generation import generate
    from .outputs import RunFolder, run_record

    run = RunFolder(args.out, force=args.force)  # check --out before loading the model
    pipe = _load(args)
    with run:
        images = generate(
            pipe,
            args.prompt if len(args.prompt) > 1 else args.prompt[0],
            mode=args.mode,
            negative_prompt=args.negative,
            num_images_per_prompt=args.batch,
            generator=_generator(args, pipe),
            **_pipe_kwargs(args),
        )
        files = []
        for i, image in enumerate(images):
            name = f"image_{i}.png" if len(images) > 1 else "image.png"
            image.save(run.file(name))
            files.append(name)
        run.write_json("run.json", run_record("generate", _parameters(args), files + ["run.json"]))
    return [f"{args.out}/{f}" for f in files]


def run_edit(args) -> list[str]:
    from .editing import edit
    from .outputs import RunFolder, run_record

    if args.batch != 1:
        raise CliError("edit makes one image per prompt", "leave --batch out for edit")
    run = RunFolder(args.out, force=args.force)  # check --out before loading the model
    pipe = _load(args)
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
            **_pipe_kwargs(args),
        )
        files = ["source.png", "grid.png"]
        result.source.save(run.file("source.png"))
        for i, image in enumerate(result.edited):
            image.save(run.file(f"edit_{i}.png"))
            files.append(f"edit_{i}.png")
        result.grid().save(run.file("grid.png"))
        run.write_json("run.json", run_record("edit", _parameters(args), files + ["run.json"]))
    return [f"{args.out}/{f}" for f in files]


def run_evaluate(args) -> list[str]:
    from dataclasses import asdict, replace

    from .outputs import RunFolder, run_record
    from .toy import evaluate

    parts = tuple(args.only) if args.only else evaluate.PARTS
    try:
        evaluate.check_parts(parts)  # before loading the model
    except ValueError as error:
        raise CliError(str(error), "--only takes measurement names") from None
    if args.random and args.model:
        raise CliError("--random and --model both given", "pick one model")
    sets = evaluate.QUICK if args.quick else evaluate.PromptSets()
    sets = replace(sets, seed=args.seed, **({} if args.captions is None else {"captions": args.captions}))
    if args.out is not None:
        RunFolder(args.out, force=args.force)  # refuse a non-empty --out before measuring
    if args.random:
        from .toy.model import build_pipeline

        pipe = build_pipeline().to(args.device)
    else:
        pipe = _load(args)

    def progress(part: str) -> None:
        if not args.quiet:
            print(f"measuring {part} ...", file=sys.stderr, flush=True)

    report = evaluate.evaluate(pipe, sets=sets, parts=parts, steps=args.steps, guidance_scale=args.guidance,
                               progress=progress)
    table = report.table()
    print(table)
    if args.out is None:
        return []
    with RunFolder(args.out, force=args.force) as run:
        run.file("report.md").write_text(table + "\n")
        payload = {"rows": [dict(zip(("metric", "value", "target", "over"), r)) for r in report.rows()],
                   "measurements": {k: v for k, v in asdict(report).items() if k != "settings" and v is not None},
                   "settings": report.settings, "model": "random" if args.random else (args.model or "embedded")}
        run.write_json("report.json", payload)
        run.write_json("run.json", run_record("evaluate", _parameters(args), ["report.md", "report.json", "run.json"]))
    return [f"{args.out}/{f}" for f in ("report.md", "report.json", "run.json")]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-") or "word"


# ---- entry point ----------------------------------------------------------------------------------------------
def _explain(error: BaseException) -> CliError:
    """Turn a library error into a one-line reason and a hint."""
    from .outputs import OutputExistsError, OutputPathError, OutputWriteError

    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    if isinstance(error, CliError):
        return error
    if isinstance(error, OutputExistsError):
        return CliError(message, "pass --force to replace it")
    if isinstance(error, OutputPathError):
        return CliError(message, "give --out the path of a folder to write (it is made if missing)")
    if isinstance(error, OutputWriteError):
        return CliError(message, "check the free space and permissions of the folder above --out, then run again")
    if isinstance(error, KeyError):
        return CliError(message, "use one of the prompt's words (quote phrases)")
    if isinstance(error, (ValueError, TypeError)):
        return CliError(message, "check the prompt syntax and the options (--help)")
    if isinstance(error, FileNotFoundError):
        return CliError(message, "check the path")
    return CliError(f"{type(error).__name__}: {message}", "this looks like a bug: please report it with run.json")


def _quiet_libraries() -> None:
    """Keep the libraries' import-time chatter (e.g. transformers on torchvision) off the user's terminal."""
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # loading bars; the denoising bar stays unless --quiet
    diffusers.utils.logging.disable_progress_bar()


def _interrupted(command: str | None) -> int:
    """Ctrl-C: one line, exit status 130 (what shells report for SIGINT)."""
    if command == "sweep":
        print("promptcontrol sweep: interrupted; finished jobs are kept: run the same command again to resume",
              file=sys.stderr)
    else:
        print("promptcontrol: interrupted; nothing was written", file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
    try:  # a Ctrl-C while the libraries are still importing is quiet too
        parser = build_parser()
        args = parser.parse_args(argv)
        _quiet_libraries()
    except KeyboardInterrupt:
        return _interrupted(None)
    runner: Callable = args.run
    try:
        written = runner(args)
    except KeyboardInterrupt:
        return _interrupted(args.command)
    except Exception as error:  # noqa: BLE001 - every failure becomes one line and a hint
        explained = _explain(error)
        print(f"promptcontrol {args.command}: error: {explained.reason}", file=sys.stderr)
        if explained.hint:
            print(f"hint: {explained.hint}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if written and not getattr(args, "quiet", False):
        print(f"wrote {len(written)} files to {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
