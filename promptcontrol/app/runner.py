"""One pipeline served to many requests: one job at a time, a stop between steps, nothing left installed.

Gradio's queue already runs one pipeline request at a time; the :class:`Runner`'s own lock keeps that true
when Gradio lets the next request start while a stopped one is still finishing its current step (a worker
thread cannot be killed, only asked to stop at the next step).
"""

from __future__ import annotations

import atexit
import itertools
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .guard import PipelineLeftChanged, differences, pipeline_state

Progress = Callable[..., Any]  # progress(fraction, desc=...) — gr.Progress fits


def no_progress(fraction: float, desc: str | None = None) -> None:
    """The default progress report: nothing."""


class Stopped(RuntimeError):
    """The request was stopped (the Stop button) between two denoising steps."""


def load_code(model: str | None = None, device: str | None = None, dtype: str | None = None) -> str:
    """The ``pc.load_pipeline`` line that loads the pipeline the app serves."""
    args = [repr(model)] if model is not None else []
    args += [f"device={device!r}"] if device is not None else []
    args += [f"dtype={dtype!r}"] if dtype is not None else []
    return f"pipe = pc.load_pipeline({', '.join(args)})"


class Runner:
    """The pipeline a page serves, and how to run one job on it at a time.

    pipe:      a diffusers text-to-image pipeline (SD 1.x / 2.x / SDXL)
    model:     what the run records name it (``None``: the embedded model)
    load:      the Python line that loads the same pipeline, first line of every reproducing snippet
    workdir:   where each request's files go (default: a temporary folder removed at exit)
    """

    def __init__(self, pipe, *, model: str | None = None, load: str | None = None, workdir: str | Path | None = None):
        self.pipe = pipe
        self.model = model
        self.load = load or load_code(model)
        self.workdir = Path(workdir) if workdir is not None else _temporary_folder()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._numbers = itertools.count(1)
        self.inversions: dict[tuple, Any] = {}  # the last inversion, by (image digest, prompt, settings)

    @property
    def tokenizer(self):
        from ..tokens import word_tokenizer

        return word_tokenizer(self.pipe) or getattr(self.pipe, "tokenizer_2", None)

    @property
    def device(self) -> str:
        return str(getattr(self.pipe, "device", "cpu"))

    def image_size(self) -> tuple[int, int]:
        """The pipeline's default (width, height)."""
        side = int(self.pipe.unet.config.sample_size) * int(getattr(self.pipe, "vae_scale_factor", 8))
        return side, side

    def folder(self, job: str) -> Path:
        """A new empty folder for one request's files."""
        path = self.workdir / f"{next(self._numbers):04d}-{job}"
        path.mkdir(parents=True)
        return path

    def stop(self) -> None:
        """Ask the running job to stop at the end of its current step (no effect when none runs)."""
        self._stop.set()

    @contextmanager
    def job(self) -> Iterator[None]:
        """Hold the pipeline for one job; afterwards check that the job left nothing installed on it."""
        with self._lock:
            self._stop.clear()
            before = pipeline_state(self.pipe)
            try:
                yield
            finally:
                left = differences(before, pipeline_state(self.pipe))
                if left:
                    raise PipelineLeftChanged(
                        "the request left the pipeline changed (" + "; ".join(left) + "): this is a promptcontrol "
                        "bug, please report it; restart `promptcontrol app` before the next request"
                    )

    def step_callback(self, progress: Progress, total: int, offset: int = 0, what: str = "step"):
        """A ``callback_on_step_end`` that reports progress and stops the run when :meth:`stop` was called."""

        def callback(pipe, index: int, timestep, kwargs: dict) -> dict:
            done = offset + index + 1
            if self._stop.is_set():
                raise Stopped(f"stopped at {what} {done} of {total}; nothing was kept")
            progress(done / total, desc=f"{what} {done}/{total}")
            return kwargs

        return callback


def generator(seed: int) -> torch.Generator:
    """The CPU generator every job seeds (as ``promptcontrol`` on the command line does)."""
    return torch.Generator("cpu").manual_seed(int(seed))


def _temporary_folder() -> Path:
    path = Path(tempfile.mkdtemp(prefix="promptcontrol-app-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
