"""The command line and the sweep on saved SD3 / PixArt-Σ / Sana pipeline folders (in-process ``cli.main``)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers/huggingface_hub read it: never dial out

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from promptcontrol.cli import main
from promptcontrol.pipeline_call import accepted_call_defaults
from promptcontrol.testing_dit import tiny_pixart, tiny_sana
from promptcontrol.testing_flux import tiny_flux
from promptcontrol.testing_sd3 import tiny_sd3

BUILDERS = {"sd3": tiny_sd3, "pixart": tiny_pixart, "sana": tiny_sana, "flux": tiny_flux}
SIZE = {"sd3": "32x32", "pixart": "32x24", "sana": "32x32", "flux": "32x32"}  # WxH; Sana's own default would be 1024x1024
PIXART_ADDED = {"use_resolution_binning": False, "clean_caption": False}
ADDED = {"sd3": None, "pixart": PIXART_ADDED, "sana": {**PIXART_ADDED, "complex_human_instruction": None}, "flux": None}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each tiny pipeline saved with ``save_pretrained`` (SD3 without T5: ``text_encoder_3`` saved as None)."""
    root = tmp_path_factory.mktemp("transformer-folders")
    for name, build in BUILDERS.items():
        build().save_pretrained(root / name)
    return root


def run(command: list[str], folders, which: str, out, *extra: str) -> int:
    """``promptcontrol COMMAND ... --model FOLDER`` with 2 steps at the model's test size; returns the status."""
    return main([*command, "--model", str(folders / which), "--steps", "2", "--size", SIZE[which],
                 "--device", "cpu", "--out", str(out), "--quiet", *extra])


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_call_defaults_come_from_the_signature_not_the_class():
    class Binned:
        def __call__(self, prompt, use_resolution_binning: bool = True, clean_caption: bool = True):
            pass

    class Plain:
        def __call__(self, prompt, height=None):
            pass

    assert accepted_call_defaults(Binned()) == PIXART_ADDED
    assert accepted_call_defaults(Plain()) == {}


@pytest.mark.parametrize("which", ["sd3", "pixart", "sana", "flux"])
def test_inspect_draws_a_map_per_prompt_word(folders, tmp_path, which):
    out = tmp_path / "inspect"
    assert run(["inspect", "a red circle"], folders, which, out) == 0
    width, height = (int(v) for v in SIZE[which].split("x"))
    assert Image.open(out / "image.png").size == (width, height)
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["image_a.png", "image_circle.png", "image_red.png"]
    with safe_open(str(out / "image_maps.safetensors"), "pt") as maps:
        assert json.loads(maps.metadata()["words"]) == ["a", "red", "circle"]
        red, circle = maps.get_tensor("01_red"), maps.get_tensor("02_circle")
    assert tuple(red.shape) == (height, width) and not np.allclose(red.numpy(), circle.numpy())
    record = json.loads((out / "run.json").read_text())
    assert record["parameters"].get("pipeline_arguments") == ADDED[which]
    assert set(record["files"]) == {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


@pytest.mark.parametrize("which", ["sd3", "pixart", "flux"])
def test_generate_depends_on_the_seed_and_the_weights(folders, tmp_path, which):
    outs = {key: tmp_path / key for key in ("seed0", "seed1", "weighted")}
    assert run(["generate", "a red circle"], folders, which, outs["seed0"], "--seed", "0") == 0
    assert run(["generate", "a red circle"], folders, which, outs["seed1"], "--seed", "1") == 0
    assert run(["generate", "a (red:3) circle"], folders, which, outs["weighted"], "--seed", "0") == 0
    seed0, seed1, weighted = (pixels(outs[key] / "image.png") for key in ("seed0", "seed1", "weighted"))
    assert np.abs(seed0 - seed1).max() > 0  # the seed reaches the noise
    assert np.abs(seed0 - weighted).max() > 0  # the weight reaches the attention


@pytest.mark.parametrize("which", ["sd3", "pixart", "sana", "flux"])
def test_edit_writes_source_edit_and_grid(folders, tmp_path, which):
    out = tmp_path / "edit"
    self_steps = "0" if which == "sana" else "0.4"  # Sana's self-attention is linear: nothing to inject into
    assert run(["edit", "a red circle", "a blue circle"], folders, which, out, "--self-steps", self_steps) == 0
    assert {p.name for p in out.iterdir()} == {"source.png", "edit_0.png", "grid.png", "run.json"}
    assert np.abs(pixels(out / "source.png") - pixels(out / "edit_0.png")).max() > 0


def _sweep(folders, which: str, mode: str, jobs, out) -> list[dict]:
    status = main(["sweep", str(jobs), "--mode", mode, "--model", str(folders / which), "--steps", "2",
                   "--size", SIZE[which], "--device", "cpu", "--out", str(out), "--quiet",
                   *(["--save-maps"] if mode == "inspect" else [])])
    assert status == 0
    return [json.loads(line) for line in (out / "status" / "rank-0.jsonl").read_text().splitlines()]


def test_sweep_runs_one_job_of_each_mode_on_sd3_and_pixart(folders, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps({"source": "a red circle", "edits": ["a blue circle"]}) + "\n")
    expected = {"inspect": {"image.png", "grid.png", "job.json"}, "generate": {"image.png", "job.json"},
                "edit": {"source.png", "edit_0.png", "grid.png", "job.json"}}
    runs = [("sd3", mode) for mode in expected] + [("pixart", "generate")]  # PixArt: the call defaults reach it
    for which, mode in runs:
        out = tmp_path / f"{which}-{mode}"
        (record,) = _sweep(folders, which, mode, edits if mode == "edit" else prompts, out)
        assert record["status"] == "done", record["error"]
        assert {p.name for p in (out / "jobs" / record["id"]).iterdir()} == expected[mode]
        if mode == "inspect":
            assert len(list((out / "maps").glob("*.safetensors"))) == 1
