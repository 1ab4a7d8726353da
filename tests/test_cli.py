"""The command line as a person uses it: a subprocess, exit codes, files written, run.json, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import promptcontrol as pc
from promptcontrol import cli as cli_module
from promptcontrol.outputs import OutputWriteError, RunFolder
from promptcontrol.toy import evaluate, world


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


def test_generate_several_prompts_with_one_negative_prompt(model_dir, tmp_path):
    """One --negative serves every prompt (the pipeline wants a list beside a list of prompts)."""
    from promptcontrol.cli import main

    out = tmp_path / "o"
    assert main(["generate", "a red circle", "a blue square", "--negative", "green", *map(str, common(model_dir, out))]) == 0
    assert (out / "image_0.png").is_file() and (out / "image_1.png").is_file()


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
def test_evaluate_prints_the_truth_table_and_writes_the_report(tmp_path, monkeypatch, capsys):
    """The reported caption accuracy equals the share worked out from the pictures given to the measurement: the
    world's own drawing for the even captions (all right), a blank canvas for the odd ones (all wrong)."""
    real_generate = evaluate.generate

    def half_drawn(pipe, samples, **kwargs):  # the pipeline still runs (the maps part traces it)
        gens = real_generate(pipe, samples, **kwargs)
        pictures = [s.image if i % 2 == 0 else np.full_like(s.image, world.BACKGROUND) for i, s in enumerate(samples)]
        return [evaluate.Generation(g.sample, g.seed, p, evaluate.segment(p)) for g, p in zip(gens, pictures)]

    monkeypatch.setattr(evaluate, "generate", half_drawn)
    out = tmp_path / "evaluate"
    code = cli_module.main(["evaluate", "--random", "--quick", "--only", "captions", "maps", "--steps", "2", "--out", str(out),
                     "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    for metric in ("colour accuracy", "position accuracy", "noun map mIoU", "map prefers own object"):
        assert metric in printed
    assert "swap IoU" not in printed  # --only leaves the edit rows out
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "random" and report["settings"]["captions"] == 16
    rows = {r["metric"]: r["value"] for r in report["rows"]}
    samples = evaluate.eval_samples(16, 1234)  # the --quick caption set
    objects = [len(s.scene.objects) for s in samples]
    assert rows["colour accuracy"] == pytest.approx(sum(objects[::2]) / sum(objects))
    assert rows["whole caption right"] == pytest.approx(0.5)
    assert (out / "report.md").read_text() == printed  # the file is the table that was printed
    assert json.loads((out / "run.json").read_text())["command"] == "evaluate"


def test_evaluate_rejects_an_unknown_measurement_before_loading(tmp_path):
    result = cli("evaluate", "--only", "colours", "--quiet")
    assert result.returncode == 2
    assert "unknown measurement 'colours'" in result.stderr and "captions, maps, edits, weights" in result.stderr


def test_python_m_toy_evaluate_is_the_same_command():
    result = subprocess.run([sys.executable, "-m", "promptcontrol.toy.evaluate", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--only" in result.stdout and "--random" in result.stdout


# ---- checked before the model loads (in-process) -------------------------------------------------------------------
@pytest.fixture
def no_model(monkeypatch):
    """Make loading a model an error the tests can see: input must be refused before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr("promptcontrol.loading.load_pipeline", refuse)


def run_main(capsys, *argv) -> tuple[int, list[str]]:
    """``cli.main(argv)`` in this process: (exit status, stderr lines); argparse refusals exit through SystemExit."""
    try:
        code = cli_module.main([str(a) for a in argv])
    except SystemExit as exited:
        code = exited.code
    return code, capsys.readouterr().err.strip().splitlines()


def assert_one_line_error(lines, job, *needles):
    """The reason is one line ``promptcontrol JOB: error: ...`` holding every needle (after argparse's usage, if
    the option parser refused it); nothing says "bug" or names a staging folder."""
    reason = lines[-1] if lines[0].startswith("usage:") else lines[0]
    assert reason.startswith(f"promptcontrol {job}: error: "), lines
    for needle in needles:
        assert needle in reason, (needle, reason)
    text = "\n".join(lines)
    assert "bug" not in text and ".partial-" not in text and "invalid" not in text, text
    if not lines[0].startswith("usage:"):
        assert len(lines) == 2 and lines[1].startswith("hint: "), lines


NUMBER_CASES = [
    (["inspect", "a red circle", "--steps", "0"], ["--steps", "1 or more", "'0'"]),
    (["inspect", "a red circle", "--steps", "-1"], ["--steps", "1 or more"]),
    (["generate", "a red circle", "--steps", "2.5"], ["--steps", "whole number"]),
    (["generate", "a red circle", "--batch", "0"], ["--batch", "1 or more"]),
    (["generate", "a red circle", "--batch", "-1"], ["--batch", "1 or more"]),
    (["generate", "a red circle", "--guidance", "nan"], ["--guidance", "finite"]),
    (["generate", "a red circle", "--guidance", "inf"], ["--guidance", "finite"]),
    (["generate", "a red circle", "--guidance", "-2"], ["--guidance", "0 or more"]),
    (["generate", "a red circle", "--seed", "-1"], ["--seed", "0 to 2**64 - 1"]),
    (["generate", "a red circle", "--seed", str(2**64)], ["--seed", "0 to 2**64 - 1"]),
    (["inspect", "a red circle", "--size", "0x32"], ["--size", "positive multiples of 8"]),
    (["edit", "a red circle", "a blue circle", "--cross-steps", "abc"], ["--cross-steps", "step fraction", "'abc'"]),
    (["edit", "a red circle", "a blue circle", "--self-steps", "nan"], ["--self-steps", "[0, 1]"]),
    (["edit", "a red circle", "a blue circle", "--reweight", "blue=inf"], ["--reweight", "'blue'", "finite"]),
    (["evaluate", "-n", "0"], ["--captions", "1 or more"]),
]


@pytest.mark.parametrize("argv, needles", NUMBER_CASES, ids=[" ".join([a[0], *a[-2:]]) for a, _ in NUMBER_CASES])
def test_numbers_are_checked_before_the_model_loads(tmp_path, capsys, no_model, argv, needles):
    out = tmp_path / "out"
    code, lines = run_main(capsys, *argv, *([] if argv[0] == "evaluate" else ["--out", out]))
    assert code == cli_module.EXIT_BAD_INPUT
    assert_one_line_error(lines, argv[0], *needles)
    assert not out.exists()


@pytest.mark.parametrize("out", [".", ""], ids=["dot", "empty"])
def test_out_of_the_current_folder_or_nothing_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys,
                                                                                 no_model, out):
    here = tmp_path / "here"
    here.mkdir()
    (here / "notes.txt").write_text("mine")
    monkeypatch.chdir(here)
    code, lines = run_main(capsys, "generate", "a red circle", "--out", out, "--force")
    assert code == cli_module.EXIT_BAD_INPUT
    assert_one_line_error(lines, "generate", "current folder" if out else "--out is empty")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["here", "notes.txt"]  # nothing staged, nothing moved


def _unwritable_place() -> str | None:
    """A folder where nothing can be created even by root (``/proc``), or None on systems without one."""
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(dir="/proc"))
    except OSError:
        return "/proc/x"
    return None


@pytest.mark.parametrize("case", ["file", "inside-a-file", "unwritable"])
def test_unusable_out_says_what_is_wrong_without_suggesting_force(tmp_path, capsys, no_model, case):
    (tmp_path / "notes.txt").write_text("mine")
    out = {"file": tmp_path / "notes.txt", "inside-a-file": tmp_path / "notes.txt" / "run",
           "unwritable": _unwritable_place()}[case]
    if out is None:
        pytest.skip("no folder here refuses new folders")
    needle = {"file": "is a file", "inside-a-file": "notes.txt is a file, so no folder", "unwritable": "cannot create a folder in /proc"}[case]
    code, lines = run_main(capsys, "generate", "a red circle", "--out", out, "--force")
    assert code == cli_module.EXIT_BAD_INPUT
    assert_one_line_error(lines, "generate", needle)
    assert "--force" not in "\n".join(lines)  # --force would fail the same way
    assert (tmp_path / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("put_back_fails", [False, True], ids=["old-restored", "old-left-aside"])
def test_a_failed_final_move_discards_the_staging_and_says_where_the_old_output_is(tmp_path, monkeypatch,
                                                                                   put_back_fails):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    real_rename = Path.rename

    def rename(self, target):
        if ".partial-" in self.name or (put_back_fails and ".old-" in self.name):
            raise OSError(18, "Invalid cross-device link")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OutputWriteError) as caught:
        with RunFolder(out, force=True) as run:
            run.file("image.png").write_text("new")
    message = str(caught.value)
    assert "Invalid cross-device link" in message and "discarded" in message
    staged = [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert staged == []  # the staging folder is gone
    if put_back_fails:
        (aside,) = [p for p in tmp_path.iterdir() if ".old-" in p.name]
        assert f"the old output is at {aside}" in message and (aside / "keep.txt").read_text() == "old"
    else:
        assert f"the old output is back at {out}" in message
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and (out / "keep.txt").read_text() == "old"


@pytest.mark.parametrize("damage", ["missing-weights", "truncated-unet", "truncated-text-encoder"])
def test_a_damaged_model_folder_is_one_line_naming_the_folder_and_the_file(model_dir, tmp_path, capsys, damage):
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(model_dir, broken)
    file = {"missing-weights": "unet/diffusion_pytorch_model.safetensors",
            "truncated-unet": "unet/diffusion_pytorch_model.safetensors",
            "truncated-text-encoder": "text_encoder/model.safetensors"}[damage]
    if damage == "missing-weights":
        (broken / file).unlink()
        needles = [f"cannot load the pipeline folder {broken}", "no file named", "unet"]
    else:
        data = (broken / file).read_bytes()
        (broken / file).write_bytes(data[: len(data) // 2])  # a copy cut short
        needles = [f"cannot load the pipeline folder {broken}", file, "truncated"]
    code, lines = run_main(capsys, "generate", "a red circle", *common(broken, tmp_path / "out"))
    assert code == cli_module.EXIT_BAD_INPUT
    assert_one_line_error(lines, "generate", *needles)
    assert not (tmp_path / "out").exists()


# ---- Ctrl-C while Python is importing (a subprocess: imports happen once per process) ------------------------------
INTERRUPT_IMPORT = """
import runpy, sys
module, out = sys.argv[1:]
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == module:
            raise KeyboardInterrupt  # what Ctrl-C raises in the middle of an import
sys.meta_path.insert(0, Interrupt())
sys.argv = ["promptcontrol", "generate", "a red circle", "--out", out]
runpy.run_module("promptcontrol", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("module", [
    "diffusers",  # imported by the command line itself
    "torch",  # imported on first use since the package __init__ is lazy
])
def test_ctrl_c_while_importing_is_one_line_and_status_130(tmp_path, module):
    result = subprocess.run([sys.executable, "-c", INTERRUPT_IMPORT, module, str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 130, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == ["promptcontrol: interrupted; nothing was written"]
    assert not (tmp_path / "out").exists()


# ---- the faces' rooms: one-way arrows, frozen sweep options, the commands table ------------------------------------
PACKAGE = Path(pc.__file__).resolve().parent


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports (top level, in functions, under TYPE_CHECKING), relative ones made absolute."""
    import ast

    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    base = package.split(".") if path.name == "__init__.py" else package.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            head = base[: len(base) - node.level + 1] if node.level else []
            module = ".".join(head + (node.module.split(".") if node.module else []))
            found.update(f"{module}.{alias.name}" for alias in node.names)
            found.add(module)
    return found


def test_the_sweep_and_the_measurement_do_not_import_the_command_line():
    """The arrows point faces -> jobs: sweep/ imports neither the CLI nor argparse; toy.evaluate (and its
    segmentation) import no CLI; checked in the source and in a fresh interpreter."""
    sweep_files = sorted((PACKAGE / "sweep").glob("*.py"))
    assert {p.name for p in sweep_files} >= {"jobs.py", "ledger.py", "runner.py", "launch.py", "options.py"}
    for path in sweep_files + [PACKAGE / "toy" / "evaluate.py", PACKAGE / "toy" / "segment.py"]:
        imported = _imported_modules(path)
        assert not [m for m in imported if m == "promptcontrol.cli" or m.startswith("promptcontrol.cli.")], path
        if path.parent.name == "sweep":
            assert "argparse" not in imported, path
    probe = ("import sys, promptcontrol.sweep, promptcontrol.toy.evaluate; "
             "print(sorted(m for m in sys.modules if m.startswith('promptcontrol.cli')))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_sweep_options_are_frozen_and_record_the_parameters_the_parser_gave():
    """The CLI builds SweepOptions once from its parser; sweep.json's parameters stay those of the command line,
    in the same order (the file is byte-identical to what the Namespace gave)."""
    import dataclasses

    from promptcontrol.cli.sweep_command import sweep_options
    from promptcontrol.sweep import SweepOptions, job_options

    args = cli_module.build_parser().parse_args(["sweep", "jobs.txt", "--out", "o", "--size", "32x48", "--save-maps",
                                                 "--seed", "9", "--quiet"])
    options = sweep_options(args)
    assert isinstance(options, SweepOptions) and options.size == (48, 32) and options.seed == 9
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.steps = 3  # type: ignore[misc]
    expected = {k: v for k, v in vars(args).items() if k not in {"run", "quiet"}}
    assert list(options.parameters().items()) == list(expected.items())
    assert job_options(options) == job_options(args)  # the same job ids either way
    with pytest.raises(TypeError, match="steps"):
        SweepOptions(**{k: v for k, v in dataclasses.asdict(options).items() if k != "steps"})


def test_a_sweep_runs_from_options_built_by_hand(tmp_path, model_dir):
    """No argparse in between: SweepOptions written out in Python, run_sweep, one job done and its files there."""
    from promptcontrol.sweep import SweepOptions, run_sweep

    jobs = tmp_path / "p.txt"
    jobs.write_text("a red circle\n")
    out = tmp_path / "run"
    options = SweepOptions(
        file=str(jobs), mode="generate", out=str(out), save_maps=False, words_from_prompt=False, map_size=64,
        normalize="none", maps_per_shard=64, no_grid=False, jobs_per_call=1, weight_mode="attention", edit_mode="auto",
        model=str(model_dir), steps=1, guidance=7.5, seed=0, size=(32, 32), device="cpu", dtype="auto", redo=False,
        barrier_hours=1.0, verbose_errors=False, quiet=True,
    )
    assert run_sweep(options) == 0
    (entry,) = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert entry["status"] == "done" and sorted(Path(f).name for f in entry["files"]) == ["image.png", "job.json"]
    assert Image.open(out / entry["files"][0]).size == (32, 32)


def test_a_delegated_command_gets_the_rest_of_the_command_line(monkeypatch, capsys):
    """The place left for commands with a parser of their own (``promptcontrol app``): listed by --help, called
    with the arguments after its name, its status returned."""
    from promptcontrol.cli import entry

    seen = []
    monkeypatch.setitem(entry.DELEGATED, "fake", ("a command with its own parser", lambda argv: seen.append(argv) or 5))
    assert cli_module.main(["fake", "--port", "1", "--help"]) == 5
    assert seen == [["--port", "1", "--help"]]
    with pytest.raises(SystemExit):
        cli_module.main(["--help"])
    assert "a command with its own parser" in capsys.readouterr().out


def test_inspect_weighting_resolution_writes_the_maps_of_that_weighting(model_dir, tmp_path):
    """``--weighting resolution``: the saved maps are ``tr.heatmaps(weighting="resolution")`` of the same run, and
    differ from the default ``level`` weighting's (the tiny model has two levels)."""
    from safetensors.torch import load_file

    from promptcontrol.cli import main

    outs = {w: tmp_path / w for w in ("level", "resolution")}
    for w, out in outs.items():
        assert main(["inspect", "a red circle", "--weighting", w, *map(str, common(model_dir, out))]) == 0
    pipe = pc.load_pipeline(str(model_dir), device="cpu")
    with pc.trace(pipe) as tr:
        pipe("a red circle", num_inference_steps=2, width=32, height=48, generator=torch.Generator().manual_seed(0))
    for w, out in outs.items():
        saved = load_file(str(out / "image_maps.safetensors"))
        expected = tr.heatmaps(weighting=w)
        for word in ("red", "circle"):
            torch.testing.assert_close(saved[next(k for k in saved if k.endswith(f"_{word}"))], expected[word].tensor,
                                       atol=1e-5, rtol=0)
    a = load_file(str(outs["level"] / "image_maps.safetensors"))
    b = load_file(str(outs["resolution"] / "image_maps.safetensors"))
    assert any((a[k] - b[k]).abs().max() > 1e-3 for k in a)
    assert json.loads((outs["resolution"] / "run.json").read_text())["parameters"]["weighting"] == "resolution"
