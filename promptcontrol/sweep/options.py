"""The options of one sweep, frozen: built once (by the command line, or by hand) and read by every part."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True, kw_only=True)
class SweepOptions:
    """Everything a sweep is told; field order is the order of ``sweep.json``'s parameters.

    The command line builds it from its parser (``promptcontrol sweep --help`` says each option's default).
    """

    file: str  # the job file
    mode: str  # inspect | generate | edit (see jobs.MODES)
    out: str  # output folder; an existing sweep there is resumed
    save_maps: bool  # inspect: per-word maps in safetensors shards
    words_from_prompt: bool  # inspect: a map for every word, even where a job lists "words"
    map_size: int  # longest side of stored maps
    normalize: str  # stored maps: word | global | none
    maps_per_shard: int
    no_grid: bool  # skip each job's grid picture (not part of the job id)
    jobs_per_call: int  # inspect/generate: jobs run together in one pipeline call
    weight_mode: str  # attention | softmax | embedding
    edit_mode: str  # auto | replace | refine
    model: str | None  # hub id or folder; None: the embedded model
    steps: int
    guidance: float
    seed: int  # seed of jobs that give none
    size: tuple[int, int] | None  # (height, width); None: the model's
    device: str  # auto (each process's accelerator, else cpu), cuda, mps, cpu
    dtype: str  # auto | float32 | float16 | bfloat16
    redo: bool  # run every job again, even those recorded done
    barrier_hours: float  # how long processes wait for each other
    verbose_errors: bool  # print the traceback of failing jobs
    quiet: bool  # no progress lines

    @classmethod
    def from_values(cls, values: Any) -> "SweepOptions":
        """Read every field as an attribute of ``values`` (e.g. parsed command-line options)."""
        return cls(**{f.name: getattr(values, f.name) for f in fields(cls)})

    def parameters(self) -> dict[str, Any]:
        """The parameters recorded in ``sweep.json``: the command and every option but ``quiet``."""
        return {"command": "sweep", **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "quiet"}}
