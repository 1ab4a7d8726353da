"""``promptcontrol sweep``: job files, ids, sharing, resuming, map shards; two processes under ``accelerate launch``.

The multi-process tests launch ``accelerate launch --multi_gpu --num_processes 2`` (torchrun; on a machine without
GPUs each process runs on the CPU with gloo). ``accelerate launch --cpu --num_processes 2`` starts a single
process in accelerate 1.x (multi-CPU needs mpirun), so it would not test the split.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import promptcontrol as pc
from promptcontrol import cli, sweep
from promptcontrol.sweep import launch as sweep_launch
from promptcontrol.mapsets import ShardWriter, load_maps

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "a red circle and a blue square",
    "a green triangle",
    "a small yellow star",
    "a blue square",
    "a red triangle above a green circle",
    "a yellow circle",
]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny-sd15")
    pc.testing.tiny_pipeline("sd15").save_pretrained(str(folder))
    return str(folder)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_cmd(*args: str) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "promptcontrol", "sweep", *args,
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own, so no killpg)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(pid: int) -> list[int]:
    targets = [*reversed(_descendants(pid)), pid]  # workers first, then the launcher
    for target in targets:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return targets


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _status_records(out: Path) -> list[dict]:
    records = []
    for path in sorted((out / "status").glob("rank-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a kill
    return records


def _index(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- job files ------------------------------------------------------------------------------------------------
def test_text_file_skips_blanks_and_comments(tmp_path):
    path = _write_lines(tmp_path / "p.txt", ["# header", "", "a red circle", "   ", "a blue square  ", "# end"])
    specs = sweep.read_jobs(path, "inspect", default_seed=7)
    assert specs == [(3, {"prompt": "a red circle", "seed": 7}), (5, {"prompt": "a blue square", "seed": 7})]


@pytest.mark.parametrize(
    "line, mode, message",
    [
        ('{"prompt": "a dog", "colour": 1}', "generate", "unknown key(s) colour"),
        ('{"prompt": "a dog", "seed": "3"}', "inspect", '"seed" must be an integer'),
        ('{"prompt": "a dog", "weights": {"dog": "big"}}', "generate", "maps words to numbers"),
        ('{"prompt": "a (dog:2)", "weights": {"dog": 2}}', "generate", "not both"),
        ('{"source": "a dog"}', "edit", "missing 'edits'"),
        ('{"source": "a dog", "edits": ["a cat"], "cross_steps": 1.5}', "edit", '"cross_steps" must be a number in [0, 1]'),
        ('{"prompt": "a dog",', "inspect", "not valid JSON"),
        ('["a dog"]', "inspect", "a job is a JSON object"),
        ('{"prompt": "a dog", "weights": {"dog": NaN}}', "generate", "the weight of 'dog' is nan; weights must be finite"),
        ('{"prompt": "a dog", "weights": {"dog": Infinity}}', "inspect", "weights must be finite"),
        ('{"source": "a dog", "edits": ["a cat"], "reweight": {"cat": -Infinity}}', "edit", "weights must be finite"),
        ('{"source": "a dog", "edits": ["a cat"], "self_steps": NaN}', "edit", '"self_steps" must be a number in [0, 1]'),
        ('{"prompt": "a dog", "seed": -1}', "inspect", '"seed" must be a whole number from 0 to 2**64 - 1'),
        ('{"prompt": "a dog", "seed": 18446744073709551616}', "generate", "from 0 to 2**64 - 1"),
    ],
)
def test_bad_job_names_its_line(tmp_path, line, mode, message):
    path = _write_lines(tmp_path / "jobs.jsonl", ['{"prompt": "a cat"}' if mode != "edit" else '{"source": "a", "edits": "b"}', "", line])
    with pytest.raises(sweep.JobFileError) as caught:
        sweep.read_jobs(path, mode)
    assert "jobs.jsonl:3: " in str(caught.value) and message in str(caught.value)


def test_softmax_weights_must_not_be_negative_in_the_file_or_the_prompt(tmp_path):
    lines = ['{"prompt": "a cat", "weights": {"cat": -0.5}}', '{"prompt": "a (cat:-1) and a dog"}']
    path = _write_lines(tmp_path / "jobs.jsonl", lines)
    assert len(sweep.read_jobs(path, "generate")) == 2  # the equalizer (attention mode) takes negative weights
    with pytest.raises(sweep.JobFileError, match=r"jobs.jsonl:1: the weight of 'cat' is -0.5, but --weight-mode softmax"):
        sweep.read_jobs(path, "generate", weight_mode="softmax")
    path = _write_lines(tmp_path / "jobs.jsonl", lines[1:])
    with pytest.raises(sweep.JobFileError, match=r"jobs.jsonl:1: the weight of 'cat' is -1, but --weight-mode softmax"):
        sweep.read_jobs(path, "generate", weight_mode="softmax")


def test_empty_or_missing_job_file(tmp_path):
    with pytest.raises(sweep.JobFileError, match="no job file"):
        sweep.read_jobs(tmp_path / "nothing.txt", "inspect")
    with pytest.raises(sweep.JobFileError, match="holds no jobs"):
        sweep.read_jobs(_write_lines(tmp_path / "p.txt", ["# only a comment"]), "inspect")
    with pytest.raises(sweep.JobFileError, match="JSON lines"):
        sweep.read_jobs(_write_lines(tmp_path / "p.txt", ["a dog"]), "edit")


def _args(**overrides):
    parser = cli.build_parser()
    args = parser.parse_args(["sweep", "jobs.txt", "--out", "out"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_job_id_depends_on_content_and_output_options_only():
    spec = {"prompt": "a red circle", "seed": 0}
    base = sweep.job_options(_args())
    same = sweep.job_id(dict(reversed(list(spec.items()))), sweep.job_options(_args(quiet=True, out="elsewhere")))
    assert sweep.job_id(spec, base) == same  # key order, --out and --quiet do not matter
    changed = [
        sweep.job_id({**spec, "seed": 1}, base),
        sweep.job_id({**spec, "prompt": "a red circles"}, base),
        sweep.job_id(spec, sweep.job_options(_args(steps=21))),
        sweep.job_id(spec, sweep.job_options(_args(guidance=7.0))),
        sweep.job_id(spec, sweep.job_options(_args(model="other"))),
        sweep.job_id(spec, sweep.job_options(_args(size=(32, 32)))),
        sweep.job_id(spec, sweep.job_options(_args(mode="generate"))),
        sweep.job_id(spec, sweep.job_options(_args(save_maps=True))),
    ]
    assert len(set(changed) | {same}) == len(changed) + 1


def test_repeated_jobs_run_once_and_sharing_covers_every_job_once():
    specs = [(i + 1, {"prompt": p, "seed": 0}) for i, p in enumerate(PROMPTS + PROMPTS[:2])]
    jobs = sweep.make_jobs(specs, {"mode": "inspect"})
    assert [j.line for j in jobs] == [1, 2, 3, 4, 5, 6] and jobs[0].lines == (1, 7) and jobs[1].lines == (2, 8)
    for processes in (1, 2, 3, 4, 7):
        parts = [sweep.share(jobs, rank, processes) for rank in range(processes)]
        flat = [j.id for part in parts for j in part]
        assert sorted(flat) == sorted(j.id for j in jobs)  # each job in exactly one part
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_status_log_survives_a_cut_last_line(tmp_path):
    path = tmp_path / "status" / "rank-0.jsonl"
    log = sweep.StatusLog(path)
    log.append({"id": "a", "status": "done", "files": [], "time": 1.0})
    log.close()
    with open(path, "ab") as handle:
        handle.write(b'{"id": "b", "status": "do')  # a kill in the middle of a write
    log = sweep.StatusLog(path)
    log.append({"id": "c", "status": "failed", "error": "E: x", "files": [], "time": 2.0})
    log.close()
    latest = sweep.read_status(tmp_path)
    assert set(latest) == {"a", "c"} and latest["c"]["error"] == "E: x"
    assert sweep.is_done(latest["a"], tmp_path) and not sweep.is_done(latest["c"], tmp_path)
    assert not sweep.is_done({"status": "done", "files": ["jobs/gone/image.png"]}, tmp_path)


def test_each_process_takes_its_own_accelerator():
    from types import SimpleNamespace

    launched = SimpleNamespace(num_processes=2, device=torch.device("cuda", 1))
    alone = SimpleNamespace(num_processes=1, device=torch.device("cuda", 0))
    assert sweep_launch._device(_args(device="auto"), launched) == torch.device("cuda", 1)
    assert sweep_launch._device(_args(device="cuda"), launched) == torch.device("cuda", 1)
    assert sweep_launch._device(_args(device="cpu"), launched) == "cpu"
    assert sweep_launch._device(_args(device="auto"), alone) is None  # load_pipeline picks cuda, mps or cpu
    assert sweep_launch._device(_args(device="cuda:0"), alone) == "cuda:0"


# ---- map shards -------------------------------------------------------------------------------------------------
def test_shards_roll_over_are_atomic_and_load_back(tmp_path):
    folder = tmp_path / "maps"
    writer = ShardWriter(folder, rank=1, jobs_per_shard=2)
    tensors = {f"job{i}": torch.rand(i + 1, 4, 6) for i in range(3)}
    names = [writer.add(k, [f"w{j}" for j in range(v.shape[0])], v, prompt=f"p{k}", line=i) for i, (k, v) in enumerate(tensors.items())]
    assert names == ["rank-1-000001.safetensors", "rank-1-000001.safetensors", "rank-1-000002.safetensors"]
    assert sorted(p.name for p in folder.iterdir()) == ["rank-1-000001.safetensors", "rank-1-000002.safetensors"]  # no tmp left
    maps = load_maps(tmp_path)
    assert set(maps) == set(tensors)
    for key, value in tensors.items():
        assert maps[key].words == [f"w{j}" for j in range(value.shape[0])]
        assert maps[key].maps.dtype == torch.float16 and maps[key].maps.shape == value.shape
        torch.testing.assert_close(maps[key].maps.float(), value.half().float())
    assert maps["job2"]["w1"].shape == (4, 6) and maps["job0"].prompt == "pjob0"
    with pytest.raises(KeyError, match="its words are: w0"):
        maps["job0"]["cat"]
    # a later writer of the same rank numbers on; a redone job's newer copy wins without an index ...
    again = ShardWriter(folder, rank=1)
    assert again.add("job0", ["w0"], torch.full((1, 4, 6), 0.5)) == "rank-1-000003.safetensors"
    assert float(load_maps(tmp_path)["job0"].maps.float().mean()) == 0.5
    # ... and the index's shard wins when there is one
    (tmp_path / "index.jsonl").write_text(json.dumps({"id": "job0", "status": "done", "files": ["maps/rank-1-000001.safetensors"]}) + "\n")
    torch.testing.assert_close(load_maps(tmp_path)["job0"].maps.float(), tensors["job0"].half().float())


def test_load_maps_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder"):
        load_maps(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="--save-maps"):
        load_maps(tmp_path)
    with pytest.raises(ValueError, match="one map per word"):
        ShardWriter(tmp_path, 0).add("x", ["a", "b"], torch.zeros(3, 2, 2))


# ---- one process, in this process ----------------------------------------------------------------------------------
def test_single_process_sweep_resumes_and_redoes_missing_files(tmp_path, model, capsys):
    jobs = _write_lines(tmp_path / "p.txt", PROMPTS[:3])
    out = tmp_path / "run"
    argv = ["sweep", str(jobs), "--out", str(out), "--model", model, "--steps", "2", "--size", "32x32", "--quiet"]
    assert cli.main(argv) == 0
    first = _status_records(out)
    assert len(first) == 3 and {r["status"] for r in first} == {"done"}
    index = _index(out)
    assert [e["prompt"] for e in index] == PROMPTS[:3] and all(e["status"] == "done" for e in index)
    for entry in index:
        assert sorted(Path(f).name for f in entry["files"]) == ["grid.png", "image.png", "job.json"]
        assert all((out / f).is_file() for f in entry["files"])
        assert json.loads((out / "jobs" / entry["id"] / "job.json").read_text())["job"]["prompt"] == entry["prompt"]
    assert json.loads((out / "sweep.json").read_text())["command"] == "sweep"

    assert cli.main(argv) == 0  # nothing to do: no new status lines
    assert len(_status_records(out)) == 3
    (out / "jobs" / index[1]["id"] / "image.png").unlink()  # a lost file: that job alone runs again
    assert cli.main(argv) == 0
    records = _status_records(out)
    assert len(records) == 4 and records[-1]["id"] == index[1]["id"]
    assert all(e["status"] == "done" for e in _index(out))


def test_bad_job_file_exits_2_with_the_line(tmp_path, model, capsys):
    jobs = _write_lines(tmp_path / "e.jsonl", ['{"source": "a red circle", "edits": ["a green circle"]}', '{"source": "x"}'])
    code = cli.main(["sweep", str(jobs), "--mode", "edit", "--out", str(tmp_path / "o"), "--model", model])
    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_INPUT and "e.jsonl:2: missing 'edits'" in err and "hint:" in err
    assert not (tmp_path / "o").exists()


def test_a_nan_weight_stops_the_sweep_before_any_job_runs(tmp_path, model, capsys):
    lines = ['{"prompt": "a red circle"}', '{"prompt": "a blue square", "weights": {"blue": NaN}}']
    jobs = _write_lines(tmp_path / "jobs.jsonl", lines)
    out = tmp_path / "o"
    code = cli.main(["sweep", str(jobs), "--mode", "generate", "--out", str(out), "--model", model, "--steps", "1",
                     "--size", "32x32", "--quiet"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_INPUT, err  # bad input (2), not a failed job (1)
    assert "jobs.jsonl:2: " in err and "finite" in err and "hint:" in err
    assert not out.exists()  # the first line did not run either


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--guidance", "nan", "finite"),
        ("--seed", "-3", "0 to 2**64 - 1"),
        ("--steps", "0", "1 or more"),
        ("--map-size", "abc", "whole number"),
        ("--barrier-hours", "0", "above 0"),
    ],
)
def test_bad_numeric_options_exit_2_naming_the_option(tmp_path, capsys, option, value, message):
    jobs = _write_lines(tmp_path / "p.txt", ["a red circle"])
    with pytest.raises(SystemExit) as exited:
        cli.main(["sweep", str(jobs), "--out", str(tmp_path / "o"), option, value])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exited.value.code == 2 and last.startswith(f"promptcontrol sweep: error: argument {option}: ")
    assert message in last and "invalid" not in last


def test_out_inside_a_file_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("promptcontrol.loading.load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    jobs = _write_lines(tmp_path / "p.txt", ["a red circle"])
    code = cli.main(["sweep", str(jobs), "--out", str(jobs / "run"), "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_BAD_INPUT and len(lines) == 2, lines
    assert "p.txt is a file, so no folder can be made inside it" in lines[0] and "bug" not in lines[1]


def test_a_truncated_model_folder_is_one_line_naming_it(tmp_path, model, capsys):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(model, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a download cut short
    jobs = _write_lines(tmp_path / "p.txt", ["a red circle"])
    code = cli.main(["sweep", str(jobs), "--out", str(tmp_path / "o"), "--model", str(broken), "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_BAD_INPUT and len(lines) == 2, lines
    assert f"cannot load the pipeline folder {broken}: unet/diffusion_pytorch_model.safetensors" in lines[0]
    assert "truncated" in lines[0] and "bug" not in lines[1]


def test_generate_and_edit_jobs_write_their_images(tmp_path, model):
    gen = _write_lines(tmp_path / "g.jsonl", ['{"prompt": "a red circle", "weights": {"red": 2.0}, "seed": 3}', '{"prompt": "a (blue:1.5) square"}'])
    out = tmp_path / "gen"
    assert cli.main(["sweep", str(gen), "--mode", "generate", "--out", str(out), "--model", model, "--steps", "2", "--size", "32x32", "--quiet"]) == 0
    assert [sorted(Path(f).name for f in e["files"]) for e in _index(out)] == [["image.png", "job.json"]] * 2
    edits = _write_lines(tmp_path / "e.jsonl", ['{"source": "a red circle", "edits": ["a green circle", "a blue circle"], "blend": ["circle"]}'])
    out = tmp_path / "edit"
    assert cli.main(["sweep", str(edits), "--mode", "edit", "--out", str(out), "--model", model, "--steps", "2", "--size", "32x32", "--quiet"]) == 0
    (entry,) = _index(out)
    assert entry["edits"] == ["a green circle", "a blue circle"]
    assert sorted(Path(f).name for f in entry["files"]) == ["edit_0.png", "edit_1.png", "grid.png", "job.json", "source.png"]


def test_jobs_per_call_matches_one_job_a_call_and_a_bad_job_fails_alone(tmp_path, model):
    lines = [
        json.dumps({"prompt": PROMPTS[0], "seed": 1}),
        json.dumps({"prompt": PROMPTS[1], "seed": 2, "weights": {"green": 2.0}}),
        json.dumps({"prompt": PROMPTS[2], "seed": 3, "words": ["unicorn"]}),  # fails inside its batch
        json.dumps({"prompt": PROMPTS[3], "seed": 4, "negative": "a red circle"}),
        json.dumps({"prompt": PROMPTS[4], "seed": 5, "words": ["triangle", "green circle"]}),
    ]
    jobs = _write_lines(tmp_path / "jobs.jsonl", lines)
    common = [str(jobs), "--model", model, "--steps", "2", "--size", "32x32", "--save-maps", "--quiet"]
    for name, extra in (("one", ["--jobs-per-call", "1"]), ("batched", ["--jobs-per-call", "5", "--no-grid"])):
        with pytest.raises(SystemExit) as exited:
            cli.main(["sweep", *common, "--out", str(tmp_path / name), *extra])
        assert exited.value.code == sweep.EXIT_FAILED_JOBS
    one, batched = _index(tmp_path / "one"), _index(tmp_path / "batched")
    assert [e["id"] for e in one] == [e["id"] for e in batched]  # batching does not change a job's id
    assert [e["status"] for e in batched] == ["done", "done", "failed", "done", "done"]
    assert "unicorn" in batched[2]["error"]
    assert sorted(Path(f).name for f in batched[0]["files"]) == ["image.png", "job.json", "rank-0-000001.safetensors"]
    assert sorted(Path(f).name for f in one[0]["files"]) == ["grid.png", "image.png", "job.json", "rank-0-000001.safetensors"]
    maps_one, maps_batched = load_maps(tmp_path / "one"), load_maps(tmp_path / "batched")
    assert maps_batched[batched[4]["id"]].words == ["triangle", "green circle"]
    for entry in (e for e in one if e["status"] == "done"):
        a = np.asarray(Image.open(tmp_path / "one" / "jobs" / entry["id"] / "image.png"), dtype=np.float32)
        b = np.asarray(Image.open(tmp_path / "batched" / "jobs" / entry["id"] / "image.png"), dtype=np.float32)
        assert np.abs(a - b).max() <= 2.0  # same noise per job: the same image up to rounding
        torch.testing.assert_close(maps_batched[entry["id"]].maps.float(), maps_one[entry["id"]].maps.float(), atol=2e-3, rtol=1e-2)


# ---- two processes under accelerate launch ---------------------------------------------------------------------
def test_two_processes_every_job_once_failure_recorded_maps_loaded(tmp_path, model):
    lines = [json.dumps({"prompt": p}) for p in PROMPTS[:5]]
    lines.append(json.dumps({"prompt": "a purple star", "words": ["unicorn"]}))  # fails: not a word of the prompt
    lines.append(json.dumps({"prompt": PROMPTS[0]}))  # the same job again: runs once
    jobs = _write_lines(tmp_path / "jobs.jsonl", lines)
    out = tmp_path / "sweep"
    done = subprocess.run(
        _launch_cmd(str(jobs), "--out", str(out), "--model", model, "--steps", "2", "--size", "32x32", "--save-maps"),
        env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode != 0, "a failed job makes the exit status non-zero"
    assert "1 failed" in done.stderr, done.stderr[-3000:]

    records = _status_records(out)
    assert {r["rank"] for r in records} == {0, 1}  # the jobs were split across both processes
    assert Counter(r["id"] for r in records).most_common(1)[0][1] == 1  # each job ran exactly once
    index = _index(out)
    assert [e["line"] for e in index] == [1, 2, 3, 4, 5, 6] and index[0]["lines"] == [1, 7]
    assert [e["status"] for e in index] == ["done"] * 5 + ["failed"]
    assert "unicorn" in index[5]["error"] and index[5]["error"].startswith("KeyError")
    assert {e["id"] for e in index} == {r["id"] for r in records}

    maps = load_maps(out)
    assert set(maps) == {e["id"] for e in index[:5]}
    for entry in index[:5]:
        job_maps = maps[entry["id"]]
        assert job_maps.words == entry["prompt"].split()
        assert job_maps.maps.shape == (len(job_maps.words), 32, 32) and job_maps.maps.dtype == torch.float16
        assert torch.isfinite(job_maps.maps.float()).all() and float(job_maps.maps.float().sum()) > 0


def test_killed_sweep_resumes_with_no_duplicate_and_no_loss(tmp_path, model):
    prompts = [f"a {colour} {shape}" for colour in ("red", "green", "blue") for shape in ("circle", "square", "star")]
    jobs = _write_lines(tmp_path / "p.txt", prompts)
    out = tmp_path / "sweep"
    args = [str(jobs), "--out", str(out), "--model", model, "--steps", "12", "--size", "32x32", "--save-maps", "--maps-per-shard", "3"]
    first = subprocess.Popen(_launch_cmd(*args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and first.poll() is None:
            if sum(r["status"] == "done" for r in _status_records(out)) >= 2:
                break
            time.sleep(0.02)
    finally:
        if first.poll() is None:
            killed = _kill_tree(first.pid)  # the launcher and both workers, mid-sweep
        first.wait(timeout=60)
    time.sleep(0.5)
    assert len(killed) >= 3 and not [p for p in killed if _alive(p)], "the launcher and both workers are gone"
    before = {r["id"] for r in _status_records(out) if r["status"] == "done"}
    assert 2 <= len(before) < len(prompts), "the sweep should have been killed part-way"
    assert not (out / "index.jsonl").exists()

    again = subprocess.run(_launch_cmd(*args), env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(before)} already done" in again.stderr
    records = _status_records(out)
    counts = Counter(r["id"] for r in records if r["status"] == "done")
    assert len(counts) == len(prompts) and set(counts.values()) == {1}  # no loss, no duplicate
    index = _index(out)
    assert [e["prompt"] for e in index] == prompts and all(e["status"] == "done" for e in index)
    assert sorted(p.name for p in (out / "jobs").iterdir()) == sorted(e["id"] for e in index)  # no staging left
    maps = load_maps(out)
    assert set(maps) == {e["id"] for e in index}
    assert all(maps[e["id"]].words == e["prompt"].split() for e in index)
