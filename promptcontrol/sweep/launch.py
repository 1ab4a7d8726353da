"""The sweep across processes (accelerate): every process reads the ledger, takes its share, runs it; the main
process writes the index and ``sweep.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..pipeline_call import quiet_diffusers_logs
from .jobs import Job, job_options, make_jobs, read_jobs, share
from .ledger import StatusLog, atomic_write, index_entries, is_done, read_status, write_index
from .options import SweepOptions
from .runner import JobRunner, clean_leftovers, run_jobs

EXIT_FAILED_JOBS = 1


def _state(options: SweepOptions):
    """accelerate's process state (one process without ``accelerate launch``); CPU processes use gloo."""
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    cpu = options.device == "cpu" or not torch.cuda.is_available()
    return PartialState(cpu=cpu, timeout=timedelta(hours=options.barrier_hours))


def _device(options: SweepOptions, state) -> Any:
    """Each process's own accelerator under a launcher (``auto`` or a bare ``cuda``), else what was asked."""
    if state.num_processes > 1 and (options.device == "auto" or options.device == state.device.type):
        return state.device  # e.g. cuda:<local rank>
    return None if options.device == "auto" else options.device


def _load(options: SweepOptions, state):
    from ..loading import load_pipeline

    dtype = None if options.dtype == "auto" else options.dtype
    with quiet_diffusers_logs():  # a damaged folder is one line of ours, not diffusers' log first
        pipe = load_pipeline(options.model, device=_device(options, state), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_mine(out: Path, mine: list[Job], options: SweepOptions, state, say) -> int:
    """This process's jobs on its own pipeline; returns how many failed."""
    from ..mapsets import ShardWriter

    rank = state.process_index
    pipe = _load(options, state)
    maps = ShardWriter(out / "maps", rank, jobs_per_shard=options.maps_per_shard) if options.save_maps else None
    log = StatusLog(out / "status" / f"rank-{rank}.jsonl")
    try:
        return run_jobs(out, mine, JobRunner(pipe, options), log, rank, maps, say)
    finally:
        log.close()


def run_sweep(options: SweepOptions) -> int:
    """Run (or resume) a sweep; returns the exit status (0 all done, 1 some failed)."""
    from ..outputs import writable_folder_path

    if options.save_maps and options.mode != "inspect":
        raise ValueError("--save-maps stores heat maps, which only --mode inspect records")
    specs = read_jobs(options.file, options.mode, default_seed=options.seed, weight_mode=options.weight_mode)
    jobs = make_jobs(specs, job_options(options))
    writable_folder_path(options.out, write_inside=True)  # a file, a path inside one, unwritable: refused now
    out = Path(options.out)

    state = _state(options)
    rank, processes = state.process_index, state.num_processes
    if state.is_main_process:
        for name in ("jobs", "status") + (("maps",) if options.save_maps else ()):
            (out / name).mkdir(parents=True, exist_ok=True)
        clean_leftovers(out)
    state.wait_for_everyone()
    latest = {} if options.redo else read_status(out)
    pending = [job for job in jobs if not is_done(latest.get(job.id), out)]
    mine = share(pending, rank, processes)
    state.wait_for_everyone()  # every process has read the logs before anyone appends to them

    say = (lambda text: None) if options.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    if state.is_main_process:
        say(f"sweep: {len(jobs)} jobs, {len(jobs) - len(pending)} already done, {len(pending)} to run on {processes} process(es)")
    failed = _run_mine(out, mine, options, state, say) if mine else 0
    state.wait_for_everyone()

    status = EXIT_FAILED_JOBS if failed else 0
    if state.is_main_process:
        entries = write_index_and_record(jobs, out, options)
        counts = {s: sum(e["status"] == s for e in entries) for s in ("done", "failed", "pending")}
        say(f"sweep: {counts['done']} done, {counts['failed']} failed, {counts['pending']} pending; index: {out / 'index.jsonl'}")
        status = EXIT_FAILED_JOBS if counts["failed"] or counts["pending"] else 0
    return status


def write_index_and_record(jobs: list[Job], out: Path, options: SweepOptions) -> list[dict[str, Any]]:
    """``index.jsonl`` and ``sweep.json`` (the run's parameters and package versions)."""
    from ..outputs import run_record

    entries = index_entries(jobs, out)
    write_index(entries, out)
    record = run_record("sweep", options.parameters(), ["index.jsonl"])
    atomic_write(out / "sweep.json", json.dumps(record, indent=2, default=str) + "\n")
    return entries
