"""Running a sweep's jobs on one pipeline: computing each job's outputs, writing them, recording each job."""

from __future__ import annotations

import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..pipeline_call import pipeline_call_kwargs, seeded_generator
from .jobs import Job, job_options
from .ledger import StatusLog
from .options import SweepOptions


@dataclass
class JobOutput:
    """What one job made, before it is written: pictures by file name, and (inspect) labelled maps."""

    pictures: dict[str, Any]  # file name -> PIL image
    maps: tuple[list[str], Any] | None = None  # (labels, tensor (labels, H, W)) with --save-maps


class JobRunner:
    """Runs jobs of one mode on one pipeline: ``compute(jobs)`` → one :class:`JobOutput` per job.

    inspect and generate run up to ``jobs_per_call`` jobs in one pipeline call (each with its own seed's noise,
    so a job's image is the one it gets alone, up to float rounding); edit runs one job a call (a job is a batch).
    """

    def __init__(self, pipe, options: SweepOptions):
        self.pipe = pipe
        self.options = options

    def pipe_kwargs(self) -> dict[str, Any]:
        """Steps, guidance, size and what the pipeline's ``__call__`` needs (see ``pipeline_call_kwargs``)."""
        return pipeline_call_kwargs(self.pipe, self.options.steps, self.options.guidance, self.options.size)

    @staticmethod
    def generators(jobs: list[Job]):
        """One CPU generator per job (a single one for a single job), seeded with the job's seed."""
        gens = [seeded_generator(job.spec["seed"]) for job in jobs]
        return gens[0] if len(gens) == 1 else gens

    @staticmethod
    def negatives(jobs: list[Job]):
        negatives = [job.spec.get("negative") or "" for job in jobs]
        return negatives if any(negatives) else None  # a list, as the prompts are

    def groups(self, jobs: list[Job]) -> list[list[Job]]:
        """Consecutive jobs that can share a pipeline call (same kind of weighting), at most ``jobs_per_call``."""
        size = self.options.jobs_per_call if self.options.mode in ("inspect", "generate") else 1
        groups: list[list[Job]] = []
        for job in jobs:
            kind = "weights" in job.spec
            if groups and len(groups[-1]) < size and ("weights" in groups[-1][0].spec) == kind:
                groups[-1].append(job)
            else:
                groups.append([job])
        return groups

    def compute(self, jobs: list[Job]) -> list[JobOutput]:
        return getattr(self, f"compute_{self.options.mode}")(jobs)

    def compute_generate(self, jobs: list[Job]) -> list[JobOutput]:
        from ..controllers.reweight import Reweight
        from ..generation import generate
        from ..session import control

        prompts = [job.spec["prompt"] for job in jobs]
        call = dict(negative_prompt=self.negatives(jobs), generator=self.generators(jobs), **self.pipe_kwargs())
        if "weights" in jobs[0].spec:  # a group is all-weights or none (see groups)
            weights = [job.spec["weights"] for job in jobs]
            with control(self.pipe, Reweight(weights, mode=self.options.weight_mode)):
                images = self.pipe(prompts, **call).images
        else:
            images = generate(self.pipe, prompts, mode=self.options.weight_mode, **call)
        return [JobOutput({"image.png": image}) for image in images]

    def compute_inspect(self, jobs: list[Job]) -> list[JobOutput]:
        from ..controllers.reweight import Reweight
        from ..tracing import trace

        chosen = [self._words(job) for job in jobs]
        extra = []
        if any("weights" in job.spec for job in jobs):
            extra.append(Reweight([job.spec.get("weights", {}) for job in jobs], mode=self.options.weight_mode))
        prompts = [job.spec["prompt"] for job in jobs]
        with trace(self.pipe, *extra) as tr:
            images = self.pipe(prompts, negative_prompt=self.negatives(jobs), generator=self.generators(jobs),
                               **self.pipe_kwargs()).images
        return [self._inspect_output(tr, i, image, words) for i, (image, words) in enumerate(zip(images, chosen))]

    def _words(self, job: Job) -> list[str] | None:
        """The words a job's maps are drawn for (None: every word); an unknown word fails the job now."""
        from ..tokens import tokenize

        words = None if self.options.words_from_prompt else job.spec.get("words")
        if words:
            tokens = tokenize(self.pipe.tokenizer, job.spec["prompt"])
            for word in words:
                tokens.find(word)  # an unknown word fails the job before the generation
        return words

    def _inspect_output(self, tr, i: int, image, words: list[str] | None) -> JobOutput:
        """Image ``i`` of a traced call: its picture, its grid (unless ``no_grid``), its maps (``save_maps``)."""
        options = self.options
        output = JobOutput({"image.png": image})
        if not options.no_grid:  # a matplotlib figure: a noticeable share of a job on a fast GPU
            pictures = tr.heatmaps(i)
            output.pictures["grid.png"] = pictures.grid(image, words=words or pictures.words)
        if options.save_maps:
            h, w = image.size[1], image.size[0]
            scale = min(1.0, options.map_size / max(h, w))
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            normalize = None if options.normalize == "none" else options.normalize
            maps = tr.heatmaps(i, size=size, normalize=normalize)
            if words:
                output.maps = (list(words), _stack([maps[word].to_tensor() for word in words], size))
            else:
                output.maps = (maps.words, maps.to_tensor())
        return output

    def compute_edit(self, jobs: list[Job]) -> list[JobOutput]:
        from ..editing import edit

        (job,) = jobs
        spec = job.spec
        result = edit(
            self.pipe, spec["source"], spec["edits"], cross_steps=spec.get("cross_steps", 0.8),
            self_steps=spec.get("self_steps", 0.4), blend=spec.get("blend"), reweight=spec.get("reweight"),
            mode=self.options.edit_mode, seed=spec["seed"], **self.pipe_kwargs(),
        )
        pictures = {"source.png": result.source}
        pictures.update({f"edit_{i}.png": image for i, image in enumerate(result.edited)})
        if not self.options.no_grid:
            pictures["grid.png"] = result.grid()
        return [JobOutput(pictures)]


def _describe(error: BaseException) -> str:
    """``KeyError: message`` on one line (a KeyError's message without the quotes ``str`` adds)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return f"{type(error).__name__}: {message}".replace("\n", " ")


def _stack(maps: list, size: tuple[int, int]):
    import torch

    return torch.stack(maps) if maps else torch.zeros(0, *size)


def clean_leftovers(out: Path) -> None:
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
    from ..outputs import RunFolder

    with RunFolder(out / "jobs" / job.id, force=True) as staging:
        for name, picture in output.pictures.items():
            picture.save(staging.file(name))
        staging.write_json("job.json", {"id": job.id, "line": job.line, "job": job.spec, "options": options})
    files = [f"jobs/{job.id}/{name}" for name in [*output.pictures, "job.json"]]
    if maps is not None and output.maps is not None:
        labels, tensor = output.maps
        files.append("maps/" + maps.add(job.id, labels, tensor, prompt=job.spec.get("prompt", ""), line=job.line))
    return files


Result = tuple[Job, "JobOutput | None", "str | None"]  # a job, its output or None, its error or None


def _compute_group(runner: JobRunner, group: list[Job]) -> list[Result]:
    """The group in one call; if that call raises, one job at a time, so only the failing job fails."""
    try:
        return list(zip(group, runner.compute(group), [None] * len(group)))
    except Exception as error:  # noqa: BLE001 - a failing job is recorded and the sweep goes on
        if runner.options.verbose_errors:
            traceback.print_exc()
        if len(group) == 1:
            return [(group[0], None, _describe(error))]
    results: list[Result] = []
    for job in group:
        try:
            results.append((job, runner.compute([job])[0], None))
        except Exception as single:  # noqa: BLE001
            results.append((job, None, _describe(single)))
    return results


def run_jobs(out: Path, jobs: list[Job], runner: JobRunner, log: StatusLog, rank: int, maps=None,
             say: Callable[[str], None] = print) -> int:
    """Run ``jobs`` group by group, writing and recording each job; returns how many failed.

    A group whose shared call raises is run again one job at a time, so only the failing job is recorded failed.
    """
    options = job_options(runner.options)
    failed = count = 0
    for group in runner.groups(jobs):
        start = time.perf_counter()
        results = _compute_group(runner, group)
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
