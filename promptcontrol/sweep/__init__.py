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

The rooms: :mod:`.options` (:class:`SweepOptions`, frozen, built once by the command line or by hand),
:mod:`.jobs` (reading, checking, ids, sharing), :mod:`.ledger` (status logs, index), :mod:`.runner` (computing
and writing jobs), :mod:`.launch` (the processes). Nothing here imports the command line or argparse: the
parser is ``promptcontrol.cli.sweep_command``.
"""

from .jobs import (JOB_KEYS, MODES, REQUIRED, Job, JobFileError, check_job, job_id, job_options, make_jobs, read_jobs,
                   share)
from .launch import EXIT_FAILED_JOBS, run_sweep, write_index_and_record
from .ledger import StatusLog, atomic_write, index_entries, is_done, read_status, write_index
from .options import SweepOptions
from .runner import JobOutput, JobRunner, run_jobs, write_job

__all__ = [
    "SweepOptions", "run_sweep", "EXIT_FAILED_JOBS",
    "MODES", "JOB_KEYS", "REQUIRED", "Job", "JobFileError", "check_job", "read_jobs", "job_id", "job_options",
    "make_jobs", "share",
    "StatusLog", "read_status", "is_done", "atomic_write", "index_entries", "write_index", "write_index_and_record",
    "JobOutput", "JobRunner", "write_job", "run_jobs",
]
