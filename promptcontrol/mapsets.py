"""Map datasets: per-word heat maps of many prompts, one safetensors shard per process, and ``pc.load_maps``.

A sweep in inspect mode with ``--save-maps`` (see :mod:`promptcontrol.sweep`) gives each process a
:class:`ShardWriter`. Every finished job adds one tensor ``(words, H, W)`` (float16) named by the job id to the
process's current shard ``maps/rank-<k>-<n>.safetensors``; the shard is rewritten atomically (temporary file +
rename) after every job, so a killed process loses at most the job it was running. A shard holds at most
``jobs_per_shard`` jobs, then the writer starts the next one. The shard's metadata lists, per job, its id,
words (one label per map, in order), prompt and line in the job file.

``pc.load_maps(dir)`` reads every shard's metadata into a :class:`MapSet`: ``maps[job_id].words`` at once, and
``maps[job_id].maps`` (words, H, W) from its shard when first asked for (a big sweep's maps need not fit in memory). A job redone after a kill may sit in two shards; when the sweep's
``index.jsonl`` is there, the shard it names wins, otherwise the newest shard does (both hold the same maps).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = "promptcontrol.maps/1"
_SHARD = re.compile(r"^rank-(\d+)-(\d+)\.safetensors$")


class JobMaps:
    """The maps of one job: ``maps[i]`` is the heat map of ``words[i]``; read from its shard on first use."""

    def __init__(self, id: str, words: list[str], shard: Path, prompt: str = "", line: int | None = None):
        self.id, self.words, self.prompt, self.line = id, list(words), prompt, line
        self.path = Path(shard)
        self._maps: torch.Tensor | None = None

    @property
    def shard(self) -> str:
        return self.path.name

    @property
    def maps(self) -> torch.Tensor:
        """(len(words), H, W) float16, read from the shard once (a MapSet of a big sweep holds only metadata)."""
        if self._maps is None:
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as handle:
                self._maps = handle.get_tensor(self.id)
        return self._maps

    def __getitem__(self, word: str) -> torch.Tensor:
        """The (H, W) map of ``word`` (its first occurrence among :attr:`words`)."""
        try:
            return self.maps[self.words.index(word)]
        except ValueError:
            raise KeyError(f"no map for {word!r} in job {self.id}; its words are: {', '.join(self.words)}") from None

    def __repr__(self) -> str:
        return f"JobMaps({self.id!r}, words={self.words!r}, shard={self.shard!r})"


@dataclass
class MapSet(Mapping):
    """Every job's maps in a sweep folder, by job id (a read-only mapping ``id -> JobMaps``)."""

    root: Path
    jobs: dict[str, JobMaps] = field(default_factory=dict)

    def __getitem__(self, job_id: str) -> JobMaps:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise KeyError(f"no maps for job {job_id!r} in {self.root} ({len(self.jobs)} jobs have maps)") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.jobs)

    def __len__(self) -> int:
        return len(self.jobs)

    def by_prompt(self, prompt: str) -> list[JobMaps]:
        """The jobs whose prompt is ``prompt`` (e.g. the same prompt under several seeds)."""
        return [j for j in self.jobs.values() if j.prompt == prompt]

    def __repr__(self) -> str:
        return f"MapSet({str(self.root)!r}, jobs={len(self.jobs)})"


def shard_name(rank: int, number: int) -> str:
    return f"rank-{rank}-{number:06d}.safetensors"


def _atomic_save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as handle:  # the bytes are on disk before the name points at them
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Collects one process's maps into shards ``<folder>/rank-<rank>-<n>.safetensors``.

    ``add(job_id, words, maps, prompt=..., line=...)`` returns the shard's file name (relative to ``folder``)
    once the maps are on disk. A new writer never touches shards of earlier runs: it numbers on from the
    highest shard number of its rank.
    """

    def __init__(self, folder: str | os.PathLike, rank: int, *, jobs_per_shard: int = 64, dtype=torch.float16):
        if jobs_per_shard < 1:
            raise ValueError(f"jobs_per_shard must be at least 1, got {jobs_per_shard}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rank = int(rank)
        self.jobs_per_shard = int(jobs_per_shard)
        self.dtype = dtype
        taken = [int(m.group(2)) for p in self.folder.iterdir() if (m := _SHARD.match(p.name)) and int(m.group(1)) == rank]
        self.number = max(taken, default=0)
        self._tensors: dict[str, torch.Tensor] = {}
        self._entries: list[dict] = []

    @property
    def current(self) -> str:
        return shard_name(self.rank, self.number)

    def add(self, job_id: str, words: list[str], maps: torch.Tensor, *, prompt: str = "", line: int | None = None) -> str:
        """Store ``maps`` (len(words), H, W) for ``job_id``; returns the shard file name holding them."""
        if maps.ndim != 3 or maps.shape[0] != len(words):
            raise ValueError(f"maps must be (words, H, W) with one map per word; got {tuple(maps.shape)} for {len(words)} words")
        if not self._entries or len(self._entries) >= self.jobs_per_shard:
            self.number += 1
            self._tensors, self._entries = {}, []
        self._tensors[job_id] = maps.detach().to("cpu", self.dtype)
        self._entries.append({"id": job_id, "words": list(words), "prompt": prompt, "line": line})
        metadata = {"format": FORMAT, "rank": str(self.rank), "jobs": json.dumps(self._entries)}
        _atomic_save(self.folder / self.current, self._tensors, metadata)
        return self.current


def _index_shards(root: Path) -> dict[str, str]:
    """job id -> shard file name, from ``index.jsonl`` (done jobs only; empty when there is no index)."""
    index = root / "index.jsonl"
    chosen: dict[str, str] = {}
    if not index.is_file():
        return chosen
    for line in index.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("status") != "done":
            continue
        for name in record.get("files", []):
            if name.startswith("maps/") and name.endswith(".safetensors"):
                chosen[record["id"]] = name.removeprefix("maps/")
    return chosen


def load_maps(folder: str | os.PathLike) -> MapSet:
    """Read every map shard of a sweep folder (or of its ``maps/`` folder) into a :class:`MapSet`."""
    from safetensors import safe_open

    root = Path(folder)
    shards_dir = root / "maps" if (root / "maps").is_dir() else root
    if not shards_dir.is_dir():
        raise FileNotFoundError(f"no folder at {root}: pass the --out folder of a sweep run with --save-maps")
    shards = sorted((p for p in shards_dir.iterdir() if _SHARD.match(p.name)), key=lambda p: (p.stat().st_mtime_ns, p.name))
    if not shards:
        raise FileNotFoundError(f"no map shards (rank-<k>-<n>.safetensors) in {shards_dir}: was the sweep run with --save-maps?")
    chosen = _index_shards(shards_dir.parent if shards_dir.name == "maps" else shards_dir)
    found: dict[str, list[tuple[Path, dict]]] = {}  # job id -> [(shard, entry)], oldest shard first
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{shard} is not a promptcontrol map shard (format {metadata.get('format')!r})")
        for entry in json.loads(metadata["jobs"]):
            found.setdefault(entry["id"], []).append((shard, entry))
    result = MapSet(root)
    for job_id, copies in found.items():
        # the shard the index names, else the newest copy (a redone job's copies hold the same maps)
        shard, entry = next(((p, e) for p, e in copies if p.name == chosen.get(job_id)), copies[-1])
        result.jobs[job_id] = JobMaps(job_id, entry["words"], shard, entry.get("prompt", ""), entry.get("line"))
    return result
