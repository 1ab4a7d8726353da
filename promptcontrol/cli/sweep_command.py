"""``promptcontrol sweep``: its parser (the common option block, the sweep's own defaults) and its runner, which
builds the frozen :class:`~promptcontrol.sweep.SweepOptions` once and hands it to
:func:`~promptcontrol.sweep.run_sweep`."""

from __future__ import annotations

import argparse

from ..sweep import MODES, JobFileError, SweepOptions, run_sweep
from .args import CliError, common_options, explained_model_errors, positive_float, positive_int

SWEEP_SEED_HELP = "seed of jobs that give none (default 0)"
SWEEP_DEVICE_HELP = "auto (each process's accelerator, else cpu), cuda, mps or cpu"


def add_sweep(sub) -> argparse.ArgumentParser:
    """Register ``sweep`` on the CLI's subparsers (its own option set: ``--out`` may exist, that is resuming)."""
    p = sub.add_parser(
        "sweep",
        help="run many prompts or edits, split across processes (accelerate launch), resumable",
        description="Run every job of FILE (one prompt a line, or JSON lines), resumably; under `accelerate launch` "
        "the jobs are split across the processes. Exit status: 0 all done, 1 some job failed, 2 bad input.",
    )
    p.add_argument("file", help="jobs: a text file (one prompt a line) or a .jsonl file (one JSON job a line)")
    p.add_argument("--mode", choices=MODES, default="inspect", help="what each job does (default inspect)")
    p.add_argument("--out", required=True, help="output folder; an existing sweep there is resumed")
    p.add_argument("--save-maps", action="store_true", help="inspect: store per-word maps in safetensors shards")
    p.add_argument("--words-from-prompt", action="store_true",
                   help="inspect: a map for every word of each prompt, even where a job lists 'words' (default "
                   "without 'words')")
    p.add_argument("--map-size", type=positive_int, default=64, help="longest side of stored maps (default 64, at most the image's)")
    p.add_argument("--normalize", default="none", choices=["word", "global", "none"], help="stored maps (default none: raw)")
    p.add_argument("--maps-per-shard", type=positive_int, default=64, help="jobs per map shard (default 64)")
    p.add_argument("--no-grid", action="store_true",
                   help="inspect/edit: skip each job's grid picture (for large map datasets; not part of the job id)")
    p.add_argument("--jobs-per-call", type=positive_int, default=1,
                   help="inspect/generate: jobs run together in one pipeline call (default 1; try 4-8 on a GPU)")
    p.add_argument("--weight-mode", default="attention", choices=["attention", "softmax", "embedding"])
    p.add_argument("--edit-mode", default="auto", choices=["auto", "replace", "refine"])
    g = common_options(p, seed_help=SWEEP_SEED_HELP, device_help=SWEEP_DEVICE_HELP, batch=False, output=False)
    g.add_argument("--redo", action="store_true", help="run every job again, even those recorded done")
    g.add_argument("--barrier-hours", type=positive_float, default=24.0, help="how long processes wait for each other (default 24)")
    g.add_argument("--verbose-errors", action="store_true", help="print the traceback of failing jobs")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(run=run_sweep_command)
    return p


def sweep_options(args: argparse.Namespace) -> SweepOptions:
    """The frozen options of the sweep, read once from the parsed command line."""
    return SweepOptions.from_values(args)


def run_sweep_command(args: argparse.Namespace) -> list[str]:
    """The CLI runner: bad input → CliError (exit 2); failed jobs → exit status 1."""
    options = sweep_options(args)
    try:
        with explained_model_errors():
            status = run_sweep(options)
    except JobFileError as error:
        raise CliError(str(error), "fix that line (see docs/sweep.md for the job keys), then run again") from error
    if status:
        raise SystemExit(status)
    return []
