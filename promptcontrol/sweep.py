"""``promptcontrol sweep``: many prompts (or edits) split across processes with accelerate, resumable.

    accelerate launch -m promptcontrol sweep prompts.txt --mode inspect --save-maps --out runs/sweep
    python -m promptcontrol sweep edits.jsonl --mode edit --out runs/edits          # one process

Jobs come from a text file (one prompt a line; blank lines and ``#`` comments skipped) or a JSONL file (one JSON
object a line, keys in :data:`JOB_KEYS`). Every job is checked before anything runs; a bad line stops the sweep
with its line number. A job's id is a content hash of the job (with its seed filled in) and of the run options
that change its outputs (:func:`job_options`), so a rerun recognises finished work and a changed option makes
new jobs.

Layout of ``--out``::

    jobs/<id>/...               each job's files (written to a staging folder, renamed into place when complete)
    status/rank-<k>.jsonl       one line per finished job of process k (appended and flushed per job)
    maps/rank-<k>-<n>.safetensors   --save-maps: per-word maps (see promptcontrol.mapsets, pc.load_maps)
    index.jsonl                 every job of the file: id, line, prompt(s), status, error, files (main process, atomic)
    sweep.json                  the run's parameters and package versions

A rerun skips jobs recorded done whose files exist, and shares the rest out again; a job that raises is
recorded failed with its error, the sweep goes on, failed jobs are tried again on the next run. Exit status:
0 every job done, 1 some job failed (see ``index.jsonl``), 2 bad input (job file, options, model).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cli import (SEED_MAX, guidance_scale, parse_size, positive_float, positive_int, quiet_diffusers_logs,
                  seed_value)

MODES = ("inspect", "generate", "edit")
JOB_KEYS: dict[str, dict[str, str]] = {  # key -> kind of value
    "inspect": {"prompt": "str", "seed": "seed", "weights": "weights", "words": "words", "negative": "str"},
    "generate": {"prompt": "str", "seed": "seed", "weights": "weights", "negative": "str"},
    "edit": {
        "source": "str", "edits": "edits", "seed": "seed", "cross_steps": "fraction", "self_steps": "fraction",
        "blend": "words", "reweight": "weights",
    },
}
REQUIRED = {"inspect": ("prompt",), "generate": ("prompt",), "edit": ("source", "edits")}
EXIT_FAILED_JOBS = 1


class JobFileError(ValueError):
    """A job file that cannot be read: names the file, the line and the fix."""


@dataclass(frozen=True)
class Job:
    """One job: ``spec`` is the canonical job (seed filled in), ``id`` its content hash, ``line`` its line."""

    id: str
    line: int
    spec: dict[str, Any]
    lines: tuple[int, ...] = ()


# ---- reading and checking jobs --------------------------------------------------------------------------------
def _check_value(kind: str, key: str, value: Any) -> Any:
    """Check and normalise one value of a job; raises ValueError naming the key."""
    if kind == "str":
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f'"{key}" must be a non-empty string, got {value!r}')
        return value
    if kind == "seed":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f'"{key}" must be an integer, got {value!r}')
        if not 0 <= value <= SEED_MAX:
            raise ValueError(f'"{key}" must be a whole number from 0 to 2**64 - 1, got {value!r}')
        return value
    if kind == "fraction":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f'"{key}" must be a number in [0, 1], got {value!r}')
        return float(value)
    if kind in ("words", "edits"):  # one text or a non-empty list of texts
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(w, str) and w.strip() for w in value):
            what = "a word or a non-empty list of words" if kind == "words" else "a prompt or a non-empty list of prompts"
            raise ValueError(f'"{key}" must be {what}, got {value!r}')
        return value
    if kind == "weights":
        if not isinstance(value, dict) or not value:
            raise ValueError(f'"{key}" must be an object {{"word": weight, ...}}, got {value!r}')
        for word, weight in value.items():
            if not word.strip() or isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ValueError(f'"{key}" maps words to numbers; {word!r}: {weight!r} is not that')
            if not math.isfinite(weight):  # JSON lines may hold NaN and Infinity
                raise ValueError(f'"{key}": the weight of {word!r} is {weight!r}; weights must be finite numbers')
        return {w: float(x) for w, x in value.items()}
    raise AssertionError(kind)


def _check_softmax_weights(spec: dict[str, Any], mode: str) -> None:
    """``--weight-mode softmax`` adds log(weight) to the logits: every weight of the job must be 0 or more."""
    weights = dict(spec.get("weights", {}))
    if mode == "generate":
        from .prompt_syntax import parse_prompt

        weights.update({span.text: span.weight for span in parse_prompt(spec["prompt"]).spans})
    for word, weight in weights.items():
        if weight < 0:
            raise ValueError(f"the weight of {word!r} is {weight:g}, but --weight-mode softmax needs weights >= 0 "
                             "(it adds log(weight) to the logits); use --weight-mode attention for negative weights")


def check_job(raw: Any, mode: str, default_seed: int, weight_mode: str = "attention") -> dict[str, Any]:
    """A job as read from the file → its canonical spec (seed filled in, lists normalised); ValueError if bad.

    ``weight_mode`` is the sweep's ``--weight-mode`` (softmax refuses negative weights)."""
    if isinstance(raw, str):
        raw = {"prompt": raw} if mode != "edit" else raw
    if not isinstance(raw, dict):
        if mode == "edit":
            raise ValueError('edit jobs are JSON objects {"source": ..., "edits": [...]}; a plain prompt is not enough')
        raise ValueError(f"a job is a JSON object like {{\"prompt\": \"...\"}}, got {type(raw).__name__}")
    allowed = JOB_KEYS[mode]
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} for --mode {mode}; allowed: {', '.join(allowed)}")
    missing = [k for k in REQUIRED[mode] if k not in raw]
    if missing:
        raise ValueError(f"missing {', '.join(repr(k) for k in missing)} (needed by --mode {mode})")
    spec = {key: _check_value(allowed[key], key, raw[key]) for key in allowed if key in raw}
    spec.setdefault("seed", int(default_seed))
    if mode == "generate" and "weights" in spec:  # (inspect reads prompts literally: weights only in "weights")
        from .prompt_syntax import parse_prompt

        parsed = parse_prompt(spec["prompt"])
        if parsed.spans or parsed.is_scheduled:
            raise ValueError('give weights either in the prompt syntax or in "weights", not both')
    if weight_mode == "softmax" and mode in ("inspect", "generate"):
        _check_softmax_weights(spec, mode)
    return spec


def read_jobs(path: str | os.PathLike, mode: str, *, default_seed: int = 0,
              weight_mode: str = "attention") -> list[tuple[int, dict[str, Any]]]:
    """Read and check every job of ``path`` (``.jsonl`` / ``.json``: JSON lines; else one prompt a line).

    Every value is checked here, before anything runs: types, numbers finite and in range (seeds, fractions,
    weights; with ``weight_mode="softmax"`` weights >= 0, the prompt syntax's included).

    Returns ``(line number, canonical spec)`` pairs (see :func:`make_jobs`). Blank lines and lines starting with
    ``#`` are skipped. Raises :class:`JobFileError` naming the first bad line.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    path = Path(path)
    if not path.is_file():
        raise JobFileError(f"no job file at {path}: pass a text file (one prompt a line) or a .jsonl file")
    as_json = path.suffix.lower() in (".jsonl", ".json", ".ndjson")
    if mode == "edit" and not as_json:
        raise JobFileError(f"--mode edit reads JSON lines ({{\"source\": ..., \"edits\": [...]}}); {path} is not .jsonl")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise JobFileError(f"{path} is not UTF-8 text ({error})") from None
    specs: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            raw = json.loads(stripped) if as_json else stripped
        except json.JSONDecodeError as error:
            raise JobFileError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
        try:
            specs.append((number, check_job(raw, mode, default_seed, weight_mode)))
        except ValueError as error:
            raise JobFileError(f"{path}:{number}: {error}") from None
    if not specs:
        raise JobFileError(f"{path} holds no jobs (blank lines and # comments are skipped)")
    return specs


def job_id(spec: dict[str, Any], options: dict[str, Any]) -> str:
    """Content hash of a job and the run options that change its outputs (16 hex digits)."""
    canonical = json.dumps({"job": spec, "options": options}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def job_options(args: argparse.Namespace) -> dict[str, Any]:
    """The run options that change a job's outputs (they enter every job id)."""
    options = {
        "mode": args.mode,
        "model": args.model or "embedded",
        "steps": args.steps,
        "guidance": args.guidance,
        "size": list(args.size) if args.size else None,
        "dtype": args.dtype,
    }
    if args.mode in ("inspect", "generate"):
        options["weight_mode"] = args.weight_mode
    if args.mode == "edit":
        options["edit_mode"] = args.edit_mode
    if args.mode == "inspect":
        options["words_from_prompt"] = args.words_from_prompt
        if args.save_maps:  # the map options matter only when maps are stored
            options.update(save_maps=True, map_size=args.map_size, normalize=args.normalize)
    return options


def make_jobs(specs: list[tuple[int, dict[str, Any]]], options: dict[str, Any]) -> list[Job]:
    """Jobs in file order, one per distinct id (a repeated job runs once; ``Job.lines`` lists its lines)."""
    by_id: dict[str, tuple[int, dict, list[int]]] = {}
    for line, spec in specs:
        key = job_id(spec, options)
        if key in by_id:
            by_id[key][2].append(line)
        else:
            by_id[key] = (line, spec, [line])
    return [Job(key, line, spec, tuple(lines)) for key, (line, spec, lines) in by_id.items()]


def share(pending: list[Job], rank: int, processes: int) -> list[Job]:
    """This process's part of the pending jobs: every ``processes``-th job, starting at ``rank``."""
    return pending[rank::processes]


# ---- status logs and the index ------------------------------------------------------------------------------
class StatusLog:
    """``status/rank-<k>.jsonl``: one JSON line per finished job, flushed and synced before the next job."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(path, "a+b")
        self._handle.seek(0, os.SEEK_END)
        if self._handle.tell() > 0:  # a kill may have cut the last line: start on a fresh line
            self._handle.seek(-1, os.SEEK_END)
            if self._handle.read(1) != b"\n":
                self._handle.write(b"\n")

    def append(self, record: dict[str, Any]) -> None:
        self._handle.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def read_status(out: Path) -> dict[str, dict[str, Any]]:
    """The latest record of every job id in ``out/status/*.jsonl`` (cut or garbled lines are skipped)."""
    latest: dict[str, dict[str, Any]] = {}
    folder = out / "status"
    if not folder.is_dir():
        return latest
    records = []
    for path in sorted(folder.glob("rank-*.jsonl")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "id" in record and "status" in record:
                records.append(record)
    for record in sorted(records, key=lambda r: r.get("time", 0.0)):
        latest[record["id"]] = record
    return latest


def is_done(record: dict[str, Any] | None, out: Path) -> bool:
    """Recorded done, and every file it lists still exists."""
    return bool(record) and record["status"] == "done" and all((out / f).exists() for f in record.get("files", []))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def index_entries(jobs: list[Job], out: Path) -> list[dict[str, Any]]:
    """One entry per job of the file, in file order: status done / failed / pending."""
    latest = read_status(out)
    entries = []
    for job in jobs:
        record = latest.get(job.id)
        status = "pending" if record is None else record["status"]
        if status == "done" and not is_done(record, out):
            status = "pending"  # its files went missing: the next run redoes it
        entry: dict[str, Any] = {"id": job.id, "line": job.line}
        if len(job.lines) > 1:
            entry["lines"] = list(job.lines)
        entry.update({k: job.spec[k] for k in ("prompt", "source", "edits") if k in job.spec})
        entry["seed"] = job.spec["seed"]
        entry.update(status=status, error=(record or {}).get("error"), files=(record or {}).get("files", []) if status == "done" else [])
        if record is not None:
            entry.update(rank=record.get("rank"), seconds=record.get("seconds"))
        entries.append(entry)
    return entries


def write_index(entries: list[dict[str, Any]], out: Path) -> Path:
    path = out / "index.jsonl"
    _atomic_write(path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
    return path


# ---- running jobs ---------------------------------------------------------------------------------------------
@dataclass
class JobOutput:
    """What one job made, before it is written: pictures by file name, and (inspect) labelled maps."""

    pictures: dict[str, Any]  # file name -> PIL image
    maps: tuple[list[str], Any] | None = None  # (labels, tensor (labels, H, W)) with --save-maps


class JobRunner:
    """Runs jobs of one mode on one pipeline: ``compute(jobs)`` → one :class:`JobOutput` per job.

    inspect and generate run up to ``--jobs-per-call`` jobs in one pipeline call (each with its own seed's noise,
    so a job's image is the one it gets alone, up to float rounding); edit runs one job a call (a job is a batch).
    """

    def __init__(self, pipe, args: argparse.Namespace):
        self.pipe = pipe
        self.args = args

    def pipe_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(num_inference_steps=self.args.steps, guidance_scale=self.args.guidance)
        if self.args.size is not None:
            kwargs["height"], kwargs["width"] = self.args.size
        return kwargs

    @staticmethod
    def generators(jobs: list[Job]):
        """One CPU generator per job (a single one for a single job), seeded with the job's seed."""
        import torch

        gens = [torch.Generator(device="cpu").manual_seed(int(job.spec["seed"])) for job in jobs]
        return gens[0] if len(gens) == 1 else gens

    @staticmethod
    def negatives(jobs: list[Job]):
        negatives = [job.spec.get("negative") or "" for job in jobs]
        return negatives if any(negatives) else None  # a list, as the prompts are

    def groups(self, jobs: list[Job]) -> list[list[Job]]:
        """Consecutive jobs that can share a pipeline call (same kind of weighting), at most --jobs-per-call."""
        size = self.args.jobs_per_call if self.args.mode in ("inspect", "generate") else 1
        groups: list[list[Job]] = []
        for job in jobs:
            kind = "weights" in job.spec
            if groups and len(groups[-1]) < size and ("weights" in groups[-1][0].spec) == kind:
                groups[-1].append(job)
            else:
                groups.append([job])
        return groups

    def compute(self, jobs: list[Job]) -> list[JobOutput]:
        return getattr(self, f"compute_{self.args.mode}")(jobs)

    def compute_generate(self, jobs: list[Job]) -> list[JobOutput]:
        from .controllers.reweight import Reweight
        from .generation import generate
        from .session import control

        prompts = [job.spec["prompt"] for job in jobs]
        call = dict(negative_prompt=self.negatives(jobs), generator=self.generators(jobs), **self.pipe_kwargs())
        if "weights" in jobs[0].spec:  # a group is all-weights or none (see groups)
            weights = [job.spec["weights"] for job in jobs]
            with control(self.pipe, Reweight(weights, mode=self.args.weight_mode)):
                images = self.pipe(prompts, **call).images
        else:
            images = generate(self.pipe, prompts, mode=self.args.weight_mode, **call)
        return [JobOutput({"image.png": image}) for image in images]

    def compute_inspect(self, jobs: list[Job]) -> list[JobOutput]:
        from .controllers.reweight import Reweight
        from .tokens import tokenize
        from .tracing import trace

        chosen = []
        for job in jobs:
            words = None if self.args.words_from_prompt else job.spec.get("words")
            if words:
                tokens = tokenize(self.pipe.tokenizer, job.spec["prompt"])
                for word in words:
                    tokens.find(word)  # an unknown word fails the job before the generation
            chosen.append(words)
        extra = []
        if any("weights" in job.spec for job in jobs):
            extra.append(Reweight([job.spec.get("weights", {}) for job in jobs], mode=self.args.weight_mode))
        prompts = [job.spec["prompt"] for job in jobs]
        with trace(self.pipe, *extra) as tr:
            images = self.pipe(prompts, negative_prompt=self.negatives(jobs), generator=self.generators(jobs),
                               **self.pipe_kwargs()).images
        normalize = None if self.args.normalize == "none" else self.args.normalize
        outputs = []
        for i, (image, words) in enumerate(zip(images, chosen)):
            pictures = tr.heatmaps(i) if not self.args.no_grid else None
            output = JobOutput({"image.png": image})
            if not self.args.no_grid:  # a matplotlib figure: a noticeable share of a job on a fast GPU
                output.pictures["grid.png"] = pictures.grid(image, words=words or pictures.words)
            if self.args.save_maps:
                h, w = image.size[1], image.size[0]
                scale = min(1.0, self.args.map_size / max(h, w))
                size = (max(1, round(h * scale)), max(1, round(w * scale)))
                maps = tr.heatmaps(i, size=size, normalize=normalize)
                if words:
                    output.maps = (list(words), _stack([maps[word].to_tensor() for word in words], size))
                else:
                    output.maps = (maps.words, maps.to_tensor())
            outputs.append(output)
        return outputs

    def compute_edit(self, jobs: list[Job]) -> list[JobOutput]:
        from .editing import edit

        (job,) = jobs
        spec = job.spec
        result = edit(
            self.pipe, spec["source"], spec["edits"], cross_steps=spec.get("cross_steps", 0.8),
            self_steps=spec.get("self_steps", 0.4), blend=spec.get("blend"), reweight=spec.get("reweight"),
            mode=self.args.edit_mode, seed=spec["seed"], **self.pipe_kwargs(),
        )
        pictures = {"source.png": result.source}
        pictures.update({f"edit_{i}.png": image for i, image in enumerate(result.edited)})
        if not self.args.no_grid:
            pictures["grid.png"] = result.grid()
        return [JobOutput(pictures)]


def _describe(error: BaseException) -> str:
    """``KeyError: message`` on one line (a KeyError's message without the quotes ``str`` adds)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return f"{type(error).__name__}: {message}".replace("\n", " ")


def _stack(maps: list, size: tuple[int, int]):
    import torch

    return torch.stack(maps) if maps else torch.zeros(0, *size)


def _clean_leftovers(out: Path) -> None:
    """Staging folders and temporary files of a killed run (main process, before anyone starts)."""
    for folder in (out / "jobs", out / "maps", out):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            leftover = any(mark in path.name for mark in (".partial-", ".old-", ".tmp-", "promptcontrol-probe-"))
            if path.name.startswith(".") and leftover:  # the last: outputs.writable_folder_path's probe
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def write_job(out: Path, job: Job, output: JobOutput, options: dict[str, Any], maps=None) -> list[str]:
    """Write one job's files into a staging folder renamed to ``jobs/<id>``, then its maps; returns the files
    (relative to ``out``) for its status line. A kill before the status line leaves nothing that counts."""
    from .outputs import RunFolder

    with RunFolder(out / "jobs" / job.id, force=True) as staging:
        for name, picture in output.pictures.items():
            picture.save(staging.file(name))
        staging.write_json("job.json", {"id": job.id, "line": job.line, "job": job.spec, "options": options})
    files = [f"jobs/{job.id}/{name}" for name in [*output.pictures, "job.json"]]
    if maps is not None and output.maps is not None:
        labels, tensor = output.maps
        files.append("maps/" + maps.add(job.id, labels, tensor, prompt=job.spec.get("prompt", ""), line=job.line))
    return files


def run_jobs(out: Path, jobs: list[Job], runner: JobRunner, log: StatusLog, rank: int, maps=None, say=print) -> int:
    """Run ``jobs`` group by group, writing and recording each job; returns how many failed.

    A group whose shared call raises is run again one job at a time, so only the failing job is recorded failed.
    """
    options = job_options(runner.args)
    failed = count = 0
    for group in runner.groups(jobs):
        start = time.perf_counter()
        try:
            results: list[tuple[Job, JobOutput | None, str | None]] = list(zip(group, runner.compute(group), [None] * len(group)))
        except Exception as error:  # noqa: BLE001 - a failing job is recorded and the sweep goes on
            if runner.args.verbose_errors:
                traceback.print_exc()
            if len(group) == 1:
                results = [(group[0], None, _describe(error))]
            else:
                results = []
                for job in group:
                    try:
                        results.append((job, runner.compute([job])[0], None))
                    except Exception as single:  # noqa: BLE001
                        results.append((job, None, _describe(single)))
        seconds = (time.perf_counter() - start) / len(group)
        for job, output, error in results:
            count += 1
            record: dict[str, Any] = {"id": job.id, "line": job.line, "rank": rank}
            if output is not None:
                try:
                    record.update(status="done", error=None, files=write_job(out, job, output, options, maps))
                except Exception as write_error:  # noqa: BLE001 - e.g. a full disk: record it, go on
                    output, error = None, _describe(write_error)
            if output is None:
                failed += 1
                record.update(status="failed", error=error, files=[])
            record.update(seconds=round(seconds, 3), time=time.time())
            log.append(record)
            say(f"[{rank}] {count}/{len(jobs)} {record['status']} {job.id} (line {job.line})"
                + (f": {record['error']}" if record["error"] else ""))
    return failed


# ---- the sweep ----------------------------------------------------------------------------------------------
def _state(args: argparse.Namespace):
    """accelerate's process state (one process without ``accelerate launch``); CPU processes use gloo."""
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    cpu = args.device == "cpu" or not torch.cuda.is_available()
    return PartialState(cpu=cpu, timeout=timedelta(hours=args.barrier_hours))


def _device(args: argparse.Namespace, state) -> Any:
    """Each process's own accelerator under a launcher (``auto`` or a bare ``cuda``), else what was asked."""
    if state.num_processes > 1 and (args.device == "auto" or args.device == state.device.type):
        return state.device  # e.g. cuda:<local rank>
    return None if args.device == "auto" else args.device


def run_sweep(args: argparse.Namespace) -> int:
    """Run (or resume) a sweep; returns the exit status (0 all done, 1 some failed)."""
    from .loading import load_pipeline
    from .mapsets import ShardWriter
    from .outputs import run_record, writable_folder_path

    if args.save_maps and args.mode != "inspect":
        raise ValueError("--save-maps stores heat maps, which only --mode inspect records")
    specs = read_jobs(args.file, args.mode, default_seed=args.seed, weight_mode=args.weight_mode)
    jobs = make_jobs(specs, job_options(args))
    writable_folder_path(args.out, write_inside=True)  # a file, a path inside one, unwritable: refused now
    out = Path(args.out)

    state = _state(args)
    rank, processes = state.process_index, state.num_processes
    if state.is_main_process:
        for name in ("jobs", "status") + (("maps",) if args.save_maps else ()):
            (out / name).mkdir(parents=True, exist_ok=True)
        _clean_leftovers(out)
    state.wait_for_everyone()
    latest = {} if args.redo else read_status(out)
    pending = [job for job in jobs if not is_done(latest.get(job.id), out)]
    mine = share(pending, rank, processes)
    state.wait_for_everyone()  # every process has read the logs before anyone appends to them

    say = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    if state.is_main_process:
        say(f"sweep: {len(jobs)} jobs, {len(jobs) - len(pending)} already done, {len(pending)} to run on {processes} process(es)")
    failed = 0
    if mine:
        dtype = None if args.dtype == "auto" else args.dtype
        with quiet_diffusers_logs():  # a damaged folder is one line of ours, not diffusers' log first
            pipe = load_pipeline(args.model, device=_device(args, state), dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        maps = ShardWriter(out / "maps", rank, jobs_per_shard=args.maps_per_shard) if args.save_maps else None
        log = StatusLog(out / "status" / f"rank-{rank}.jsonl")
        try:
            failed = run_jobs(out, mine, JobRunner(pipe, args), log, rank, maps, say)
        finally:
            log.close()
    state.wait_for_everyone()

    status = EXIT_FAILED_JOBS if failed else 0
    if state.is_main_process:
        entries = write_index_and_record(jobs, out, args, run_record)
        counts = {s: sum(e["status"] == s for e in entries) for s in ("done", "failed", "pending")}
        say(f"sweep: {counts['done']} done, {counts['failed']} failed, {counts['pending']} pending; index: {out / 'index.jsonl'}")
        status = EXIT_FAILED_JOBS if counts["failed"] or counts["pending"] else 0
    return status


def write_index_and_record(jobs: list[Job], out: Path, args: argparse.Namespace, run_record) -> list[dict[str, Any]]:
    entries = index_entries(jobs, out)
    write_index(entries, out)
    parameters = {k: v for k, v in vars(args).items() if k not in {"run", "quiet"}}
    _atomic_write(out / "sweep.json", json.dumps(run_record("sweep", parameters, ["index.jsonl"]), indent=2, default=str) + "\n")
    return entries


# ---- command line -------------------------------------------------------------------------------------------
def add_sweep_parser(sub) -> argparse.ArgumentParser:
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
    g = p.add_argument_group("common options")
    g.add_argument("--model", default=None, help="hub id or local pipeline folder (default: the embedded toy model)")
    g.add_argument("--steps", type=positive_int, default=20, help="denoising steps (default 20)")
    g.add_argument("--guidance", type=guidance_scale, default=7.5, help="classifier-free guidance scale (default 7.5)")
    g.add_argument("--seed", type=seed_value, default=0, help="seed of jobs that give none (default 0)")
    g.add_argument("--size", type=parse_size, default=None, metavar="WxH", help="image size (default: the model's)")
    g.add_argument("--device", default="auto", help="auto (each process's accelerator, else cpu), cuda, mps or cpu")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    g.add_argument("--redo", action="store_true", help="run every job again, even those recorded done")
    g.add_argument("--barrier-hours", type=positive_float, default=24.0, help="how long processes wait for each other (default 24)")
    g.add_argument("--verbose-errors", action="store_true", help="print the traceback of failing jobs")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(run=cli_sweep)
    return p


def cli_sweep(args: argparse.Namespace) -> list[str]:
    """The CLI runner: bad input → CliError (exit 2); failed jobs → exit status 1."""
    from .cli import MODEL_FOLDER_HINT, CliError
    from .loading import ModelFolderError, ModelUnavailableError

    try:
        status = run_sweep(args)
    except JobFileError as error:
        raise CliError(str(error), "fix that line (see docs/sweep.md for the job keys), then run again") from error
    except ModelUnavailableError as error:
        raise CliError(str(error), "no network: pass a local folder with --model") from error
    except ModelFolderError as error:
        raise CliError(str(error), MODEL_FOLDER_HINT) from error
    if status:
        raise SystemExit(status)
    return []
