"""The run record of each result: what was asked, on which model and versions, how long it took, which files."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("promptcontrol", "torch", "diffusers", "transformers", "gradio")


def versions() -> dict[str, str]:
    """Python's and the main packages' versions (``"missing"`` for one not installed)."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


def run_record(job: str, parameters: dict[str, Any], *, model: str | None, device: str, seconds: float,
               files: list[str]) -> dict[str, Any]:
    """The record shown beside a result and saved as its ``run.json``."""
    return {
        "job": job,
        "parameters": parameters,
        "model": model or "embedded",
        "device": device,
        "seconds": round(seconds, 3),
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": sorted(files + ["run.json", "reproduce.py"]),
    }


def write_record(folder: Path, record: dict[str, Any], code: str) -> list[Path]:
    """Write ``run.json`` and ``reproduce.py`` into ``folder``; returns their paths."""
    record_path, code_path = folder / "run.json", folder / "reproduce.py"
    record_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    code_path.write_text(code)
    return [record_path, code_path]
