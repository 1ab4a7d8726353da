"""Run folders written all at once: files go to a hidden staging folder that replaces ``--out`` only on success.

A run interrupted by an error or Ctrl-C leaves ``--out`` as it was (no half-written files). A non-empty
``--out`` is refused unless ``force=True``. The path is checked when the :class:`RunFolder` is made, before any
work: a file, a path inside a file, a folder that cannot be written, or the current folder (or one holding it)
is refused with :class:`OutputPathError`. If the final move into place fails, the staging folder is removed and
the error says where the old output is. ``run.json`` records every parameter, the package versions and the
seed, so the run can be repeated exactly.
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

from .errors import PromptControlError


class OutputExistsError(PromptControlError, FileExistsError):
    """``--out`` is a non-empty folder and overwriting was not asked for."""


class OutputPathError(PromptControlError, ValueError):
    """``--out`` names a path where no folder can be written (``--force`` would not help)."""


class OutputWriteError(PromptControlError, OSError):
    """The finished run could not be moved into ``--out``; the message says where the old output is."""


def package_versions() -> dict[str, str]:
    """Versions of the packages a run depends on (``"missing"`` when absent)."""
    versions = {"python": platform.python_version()}
    for name in ("promptcontrol", "torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy", "pillow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a folder on the way that cannot be read
        return False


def absolute_out_path(out: str | os.PathLike, what: str = "--out") -> Path:
    """``out`` as an absolute path (``~`` expanded, symlinks kept); :class:`OutputPathError` if it is empty."""
    text = os.fspath(out)
    if not text.strip():
        raise OutputPathError(f"{what} is empty: name a folder, e.g. {what} runs/first")
    return Path(os.path.abspath(os.path.expanduser(text)))


def writable_folder_path(out: str | os.PathLike, what: str = "--out", *, write_inside: bool = False) -> Path:
    """Check that a folder can be made at ``out``; returns it as an absolute path.

    The folder that will be written is ``out``'s parent (a :class:`RunFolder` stages beside ``out``), or ``out``
    itself with ``write_inside=True`` (a sweep adds to its folder). Raises :class:`OutputPathError` for an empty
    path, a file, a path inside a file, or a place where nothing can be created (read-only, no permission,
    ``/proc``). Nothing is left on disk.
    """
    text = os.fspath(out)
    path = absolute_out_path(out, what)
    if _exists(path) and not path.is_dir():
        raise OutputPathError(f"{what} {text} is a file, not a folder: pick a folder path")
    existing = path if write_inside else path.parent
    while not _exists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"{what} {text}: {existing} is a file, so no folder can be made inside it: pick another path")
    try:  # the only sure test of "can I create here" (root passes os.access everywhere)
        os.rmdir(tempfile.mkdtemp(prefix=".promptcontrol-probe-", dir=existing))
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise OutputPathError(f"{what} {text}: cannot create a folder in {existing} ({reason}): "
                              "pick a folder you can write to") from None
    return path


def _holds_cwd(path: Path) -> bool:
    """Whether ``path`` is the current folder or one of the folders above it."""
    try:
        here, target = Path.cwd().resolve(), path.resolve()
    except OSError:
        return False
    return target == here or target in here.parents


class RunFolder:
    """A context manager: ``with RunFolder(out, force) as run: run.path / "image.png" ...; run.write_json(...)``.

    Making it checks ``out`` (see :func:`writable_folder_path`), so make it before any expensive work.
    """

    def __init__(self, out: str | os.PathLike, *, force: bool = False):
        self.shown = os.fspath(out)  # the path as the user wrote it, for messages
        if _holds_cwd(absolute_out_path(out)):
            raise OutputPathError(f"--out {self.shown} is the current folder or holds it; a run replaces its --out "
                                  "whole: name a new folder, e.g. --out runs/first")
        self.out = writable_folder_path(out)
        self.force = force
        self.path: Path | None = None
        if self.out.is_dir() and any(self.out.iterdir()) and not force:
            raise OutputExistsError(f"--out {self.shown} is not empty: pass --force to replace it, or pick another folder")

    def __enter__(self) -> "RunFolder":
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        except OSError as error:
            raise OutputWriteError(f"cannot create --out {self.shown}: {error.strerror or error}") from error
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.path is not None
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        old = self._move_old_aside()
        try:
            self.path.rename(self.out)
        except OSError as error:
            shutil.rmtree(self.path, ignore_errors=True)
            raise OutputWriteError(f"could not move the finished run into --out {self.shown} "
                                   f"({error.strerror or error}); its files were discarded; {self._put_back(old)}") from error
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.path = self.out

    def _move_old_aside(self) -> Path | None:
        """Rename an existing ``out`` to a hidden name beside it (removed once the new one is in place)."""
        if not self.out.exists():
            return None
        old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
        try:
            self.out.rename(old)
        except OSError as error:
            assert self.path is not None
            shutil.rmtree(self.path, ignore_errors=True)
            raise OutputWriteError(f"could not move the old --out {self.shown} aside ({error.strerror or error}); "
                                   f"the finished run was discarded; the old output is unchanged at {self.out}") from error
        return old

    def _put_back(self, old: Path | None) -> str:
        """Rename the old output back to ``out``; returns where it is now, in words."""
        if old is None:
            return f"--out {self.shown} was not there before and is still absent"
        try:
            old.rename(self.out)
        except OSError:
            return f"the old output is at {old}"
        return f"the old output is back at {self.out}"

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
