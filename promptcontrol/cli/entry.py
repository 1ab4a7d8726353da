"""The entry point: the commands table, the parser built from it, one-line errors, Ctrl-C.

Each job loads a pipeline (the embedded model by default, ``--model`` for a hub id or a local folder), runs,
and writes its pictures and a ``run.json`` into ``--out`` all at once (see :mod:`promptcontrol.outputs`).
Bad input exits with status 2 and a one-line reason plus a hint; numbers (steps, batch, guidance, seed, fractions,
weights, size) and ``--out`` are checked before the model loads. Ctrl-C exits with status 130 and one line.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .args import EXIT_BAD_INPUT, CliError
from .commands import add_edit, add_evaluate, add_generate, add_inspect
from .sweep_command import add_sweep

COMMANDS: tuple[Callable, ...] = (add_inspect, add_generate, add_edit, add_evaluate, add_sweep)
"""Commands parsed here, in ``--help`` order: each ``add(subparsers)`` registers one with ``run=`` its runner."""


def _app_main(argv: list[str]) -> int:
    from ..app import main

    return main(argv)


DELEGATED: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "app": ("a local web page to inspect, emphasise and edit (needs the [app] extra)", _app_main),
}
"""Commands with a parser of their own: name → (help line, ``main(argv)``). ``promptcontrol NAME ARGS...`` calls
``main(ARGS)`` and exits with its status; ``--help`` lists NAME (the web app: ``promptcontrol.app.main``)."""


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="promptcontrol",
        description="Inspect, emphasise and edit the cross-attention of Stable Diffusion pipelines.",
    )
    parser.add_argument("--version", action="version", version=f"promptcontrol {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    for name, (help_line, _) in DELEGATED.items():
        sub.add_parser(name, help=help_line, add_help=False)
    return parser


# ---- errors ---------------------------------------------------------------------------------------------------
def _explain(error: BaseException) -> CliError:
    """Turn a library error into a one-line reason and a hint."""
    from ..outputs import OutputExistsError, OutputPathError, OutputWriteError

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


# ---- entry point ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        return DELEGATED[argv[0]][1](argv[1:])
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
