"""Run folders written all at once: files go to a hidden staging folder that replaces ``--out`` only on success.

A run interrupted by an error or Ctrl-C leaves ``--out`` as it was (no half-written files). A non-empty
``--out`` is refused unless ``force=True``. ``run.json`` records every parameter, the package versions and
the seed, so the run can be repeated exactly.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any


class OutputExistsError(FileExistsError):
    """``--out`` is a non-empty folder and overwriting was not asked for."""


def package_versions() -> dict[str, str]:
    """Versions of the packages a run depends on (``"missing"`` when absent)."""
    versions = {"python": platform.python_version()}
    for name in ("promptcontrol", "torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy", "pillow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


class RunFolder:
    """A context manager: ``with RunFolder(out, force) as run: run.path / "image.png" ...; run.write_json(...)``."""

    def __init__(self, out: str | os.PathLike, *, force: bool = False):
        self.out = Path(out)
        self.force = force
        self.path: Path | None = None
        if self.out.exists() and not self.out.is_dir():
            raise OutputExistsError(f"--out {self.out} is a file, not a folder: pick another path")
        if self.out.is_dir() and any(self.out.iterdir()) and not force:
            raise OutputExistsError(f"--out {self.out} is not empty: pass --force to replace it, or pick another folder")

    def __enter__(self) -> "RunFolder":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.path is not None
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            self.out.rename(old)
        self.path.rename(self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.path = self.out

    def file(self, name: str) -> Path:
        """Path of ``name`` inside the staging folder (parent folders are made)."""
        assert self.path is not None, "use RunFolder as a context manager"
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def write_json(self, name: str, payload: dict[str, Any]) -> Path:
        target = self.file(name)
        target.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
        return target


def run_record(command: str, parameters: dict[str, Any], files: list[str]) -> dict[str, Any]:
    """The content of ``run.json``."""
    return {
        "command": command,
        "argv": sys.argv,
        "parameters": parameters,
        "versions": package_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": sorted(files),
    }
