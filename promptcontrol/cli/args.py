"""What every command's options share: the exit status of bad input, :class:`CliError`, the option types
(numbers checked before any model loads, each refusal naming what was expected) and the ONE common option block.

The sweep's parser takes its types and its common block from here; its own defaults stay its own.
"""

from __future__ import annotations

import argparse
import math
from contextlib import contextmanager
from typing import Iterator

from ..errors import PromptControlError
from ..pipeline_call import SEED_MAX

EXIT_BAD_INPUT = 2
MODEL_FOLDER_HINT = "save the pipeline again (pipe.save_pretrained) or copy the folder again"
NO_NETWORK_HINT = "no network: pass a local folder with --model"


class CliError(PromptControlError):
    """A user-facing failure: a one-line reason and a hint."""

    def __init__(self, reason: str, hint: str = ""):
        super().__init__(reason)
        self.reason, self.hint = reason, hint


@contextmanager
def explained_model_errors() -> Iterator[None]:
    """A hub model out of reach or a damaged model folder → :class:`CliError` with its hint."""
    from ..loading import ModelFolderError, ModelUnavailableError

    try:
        yield
    except ModelUnavailableError as error:
        raise CliError(str(error), NO_NETWORK_HINT) from error
    except ModelFolderError as error:
        raise CliError(str(error), MODEL_FOLDER_HINT) from error


# ---- option types -------------------------------------------------------------------------------------------
def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` → (height, width); an argparse type shared by every job's ``--size``."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512 (width x height), got {text!r}") from None
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        raise argparse.ArgumentTypeError(f"width and height must be positive multiples of 8, got {text!r}")
    return h, w


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


# ---- the common option block --------------------------------------------------------------------------------
MODEL_HELP = ("hub id or local pipeline folder: SD 1.x/2.x, SDXL, SD3/SD3.5, PixArt-Sigma or Sana (default: the "
              "embedded toy model); PixArt/Sana are called at exactly --size (no resolution binning), with the "
              "prompt as typed (no caption cleaning) and, on Sana, no complex human instruction")
SEED_HELP = "seed of the starting noise (default 0)"
DEVICE_HELP = "auto (cuda, then mps, then cpu), cuda, mps or cpu"


def common_options(parser: argparse.ArgumentParser, *, seed_help: str = SEED_HELP, device_help: str = DEVICE_HELP,
                   batch: bool = True, output: bool = True) -> argparse._ArgumentGroup:
    """Add the "common options" group: model, steps, guidance, seed, size, [batch], device, dtype, [out, force,
    quiet]; returns the group so that a command can add its own options to it (the sweep: resuming, barriers)."""
    g = parser.add_argument_group("common options")
    g.add_argument("--model", default=None, help=MODEL_HELP)
    g.add_argument("--steps", type=positive_int, default=20, help="denoising steps (default 20)")
    g.add_argument("--guidance", type=guidance_scale, default=7.5, help="classifier-free guidance scale (default 7.5)")
    g.add_argument("--seed", type=seed_value, default=0, help=seed_help)
    g.add_argument("--size", type=parse_size, default=None, metavar="WxH", help="image size (default: the model's)")
    if batch:
        g.add_argument("--batch", type=positive_int, default=1, help="images per prompt (default 1)")
    g.add_argument("--device", default="auto", help=device_help)
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    if output:
        g.add_argument("--out", required=True, help="output folder (must be empty unless --force)")
        g.add_argument("--force", action="store_true", help="replace a non-empty --out")
        g.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    return g
