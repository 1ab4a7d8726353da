"""The command line as a person uses it: a subprocess, exit codes, files written, run.json, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import promptcontrol as pc


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny SD 1.x pipeline saved as an ordinary diffusers folder (what --model takes)."""
    folder = tmp_path_factory.mktemp("tiny-model")
    pc.testing.tiny_pipeline("sd15").save_pretrained(folder)
    return folder


def cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run(
        [sys.executable, "-m", "promptcontrol", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def common(model_dir, out):
    return ["--model", model_dir, "--steps", "2", "--size", "32x48", "--device", "cpu", "--out", out, "--quiet"]


def test_help_lists_the_jobs():
    result = cli("--help")
    assert result.returncode == 0
    for job in ("inspect", "generate", "edit", "evaluate"):
        assert job in result.stdout


def test_inspect_writes_images_maps_and_a_repeatable_run_json(model_dir, tmp_path):
    out = tmp_path / "inspect"
    result = cli("inspect", "a red circle and a blue square", *common(model_dir, out))
    assert result.returncode == 0, result.stderr
    image = Image.open(out / "image.png")
    assert image.size == (32, 48)  # --size 32x48 is width x height; PIL reports (width, height)
    assert (out / "image_grid.png").is_file() and (out / "image_maps.safetensors").is_file()
    drawn = sorted(p.name for p in (out / "maps").iterdir())
    assert drawn == sorted(f"image_{w}.png" for w in ["a", "red", "circle", "and", "blue", "square"])
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "inspect"
    assert record["parameters"]["seed"] == 0 and record["parameters"]["prompt"] == "a red circle and a blue square"
    assert record["versions"]["torch"] and record["versions"]["diffusers"]
    assert set(record["files"]) == {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_same_seed_repeats_exactly(model_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert cli("generate", "a (red:1.5) circle", *common(model_dir, out)).returncode == 0
    assert Image.open(a / "image.png").tobytes() == Image.open(b / "image.png").tobytes()


def test_refuses_to_overwrite_without_force(model_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli("generate", "a red circle", *common(model_dir, out))
    assert result.returncode == 2
    assert "not empty" in result.stderr and "--force" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    result = cli("generate", "a red circle", *common(model_dir, out), "--force")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["image.png", "run.json"]


def test_edit_writes_source_edits_and_grid(model_dir, tmp_path):
    out = tmp_path / "edit"
    result = cli("edit", "a red circle", "a green circle", "--blend", "circle", "--cross-steps", "0.8", *common(model_dir, out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["edit_0.png", "grid.png", "run.json", "source.png"]


@pytest.mark.parametrize(
    "args, reason",
    [
        (["inspect", "a red circle", "--words", "dog"], "'dog' is not in the prompt"),
        (["edit", "a red circle", "a green circle", "--reweight", "green=abc"], "not a number"),
        (["edit", "a red circle", "a big green circle", "--edit-mode", "replace"], "Refine"),
    ],
    ids=["unknown-word", "weight-not-a-number", "replace-word-count"],
)
def test_bad_input_is_one_line_with_a_hint_and_writes_nothing(model_dir, tmp_path, args, reason):
    out = tmp_path / "bad"
    result = cli(*args, *common(model_dir, out))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    if lines[0].startswith("usage:"):  # rejected by the option parser: usage, then the reason
        assert f"promptcontrol {args[0]}: error:" in lines[-1] and reason in lines[-1]
    else:
        assert lines[0].startswith(f"promptcontrol {args[0]}: error:") and reason in lines[0]
        assert lines[1].startswith("hint:")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_missing_model_folder_and_unreachable_hub(tmp_path):
    result = cli("generate", "a red circle", "--model", tmp_path / "nope", "--out", tmp_path / "o", "--steps", "1")
    assert result.returncode == 2 and "hint:" in result.stderr
    result = cli("generate", "a red circle", "--model", "someone/not-a-cached-model", "--out", tmp_path / "o", "--steps", "1")
    assert result.returncode == 2
    assert "no network: pass a local folder" in result.stderr


# ---- evaluate -------------------------------------------------------------------------------------------------
def test_evaluate_prints_the_truth_table_and_writes_the_report(tmp_path):
    out = tmp_path / "evaluate"
    result = cli("evaluate", "--random", "--quick", "--only", "captions", "maps", "--steps", "2", "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    for metric in ("colour accuracy", "position accuracy", "noun map mIoU", "map prefers own object"):
        assert metric in result.stdout
    assert "swap IoU" not in result.stdout  # --only leaves the edit rows out
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "random" and report["settings"]["captions"] == 16
    rows = {r["metric"]: r for r in report["rows"]}
    assert 0.0 <= rows["colour accuracy"]["value"] <= 1.0
    assert (out / "report.md").read_text() == result.stdout  # the file is the table that was printed
    assert json.loads((out / "run.json").read_text())["command"] == "evaluate"


def test_evaluate_rejects_an_unknown_measurement_before_loading(tmp_path):
    result = cli("evaluate", "--only", "colours", "--quiet")
    assert result.returncode == 2
    assert "unknown measurement 'colours'" in result.stderr and "captions, maps, edits, weights" in result.stderr


def test_python_m_toy_evaluate_is_the_same_command():
    result = subprocess.run([sys.executable, "-m", "promptcontrol.toy.evaluate", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--only" in result.stdout and "--random" in result.stdout
