"""The sweep's ledger: per-process status logs, what counts as done, and the index of every job."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .jobs import Job


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


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, sync it, rename it over ``path``."""
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
    """``out/index.jsonl``: the entries, one JSON line each, written atomically."""
    path = out / "index.jsonl"
    atomic_write(path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
    return path
