"""Jobs of a sweep: reading and checking the job file, content-hash ids, sharing the jobs out."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PromptControlError
from ..pipeline_call import SEED_MAX
from .options import SweepOptions

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


class JobFileError(PromptControlError, ValueError):
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
        from ..prompt_syntax import parse_prompt

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
        from ..prompt_syntax import parse_prompt

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


# ---- ids and sharing ----------------------------------------------------------------------------------------
def job_id(spec: dict[str, Any], options: dict[str, Any]) -> str:
    """Content hash of a job and the run options that change its outputs (16 hex digits)."""
    canonical = json.dumps({"job": spec, "options": options}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def job_options(options: SweepOptions) -> dict[str, Any]:
    """The run options that change a job's outputs (they enter every job id)."""
    chosen = {
        "mode": options.mode,
        "model": options.model or "embedded",
        "steps": options.steps,
        "guidance": options.guidance,
        "size": list(options.size) if options.size else None,
        "dtype": options.dtype,
    }
    if options.mode in ("inspect", "generate"):
        chosen["weight_mode"] = options.weight_mode
    if options.mode == "edit":
        chosen["edit_mode"] = options.edit_mode
    if options.mode == "inspect":
        chosen["words_from_prompt"] = options.words_from_prompt
        if options.save_maps:  # the map options matter only when maps are stored
            chosen.update(save_maps=True, map_size=options.map_size, normalize=options.normalize)
    return chosen


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
