"""``benchmarks/transformers.py`` on a tiny SD3 config: the run writes every mode, each mode computes what its
name says (so the ratios time real work), nothing stays installed, and bad options are refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import run as bench_run
from benchmarks import transformers as bt

MODES = [
    "stock JointAttnProcessor2_0",
    "pass-through (pc.control + PassThrough, all sites)",
    "record: pc.trace default store",
    "reweight: Reweight({'red': 2.0})",
    "stock JointAttnProcessor2_0, 2 prompts",
    "edit: Replace + self injection (every site)",
]


@pytest.fixture(scope="module")
def bench():
    return bt.make_bench(bt.ARCHITECTURES["sd3"], 64, 2, "cpu", torch.float32, tiny=True)


def outputs(bench) -> dict[str, torch.Tensor]:
    """Each case's transformer output, run once inside its own session; and what each session yielded."""
    out, sessions = {}, {}
    for entry in bt.transformer_cases(bench):
        with entry.case.context() as session, torch.inference_mode():
            out[entry.case.name] = entry.case.run()[0]
        sessions[entry.case.name] = session
    return out, sessions


def test_tiny_run_writes_a_row_per_mode_against_its_stock(tmp_path):
    text = bt.main(["--tiny", "--out", str(tmp_path / "sd3")])
    report = json.loads((tmp_path / "sd3-cpu-float32.json").read_text())
    assert [r["name"] for r in report["rows"]] == MODES
    for row in report["rows"]:
        assert len(row["times_s"]) == 2 and all(t > 0 for t in row["times_s"])
        assert 0 < row["ratio_min"] <= row["ratio"] <= row["ratio_max"] and row["best_ratio"] > 0
        assert row["peak_mb"] is not None
    stock = {r["name"]: r for r in report["rows"] if r["name"] == r["baseline"]}
    assert set(stock) == {MODES[0], MODES[4]} and all(r["best_ratio"] == 1.0 for r in stock.values())
    assert report["rows"][-1]["baseline"] == MODES[4]  # the edit is compared on the same 4 rows
    assert (report["image_tokens"], report["config"]["num_layers"]) == (16, 2)
    assert "Tiny config (2 blocks)" in text and (tmp_path / "sd3-cpu-float32.md").read_text() == text


def test_each_mode_does_what_its_name_says(bench):
    out, sessions = outputs(bench)
    stock1, stock2 = out[MODES[0]], out[MODES[4]]
    torch.testing.assert_close(out[MODES[1]], stock1, atol=1e-5, rtol=1e-5)  # pass-through: the stock numbers
    torch.testing.assert_close(out[MODES[2]], stock1, atol=1e-5, rtol=1e-5)  # recording leaves the output alone
    assert sessions[MODES[2]].store.memory_bytes() > 0  # ... and recorded
    reweighted = out[MODES[3]]
    torch.testing.assert_close(reweighted[0], stock1[0], atol=1e-5, rtol=1e-5)  # uncond row untouched
    assert (reweighted[1] - stock1[1]).abs().max() > 1e-3  # the word's weight acted on the prompt's row
    edited = out[MODES[5]]  # rows [uncond src, uncond edit, src, edit]
    torch.testing.assert_close(edited[2], stock2[2], atol=1e-5, rtol=1e-5)  # the source row is left as it is
    assert (edited[3] - stock2[3]).abs().max() > 1e-3  # the edit row takes the source's attention


def test_the_stock_processors_are_back_after_every_mode(bench):
    before = {k: type(v) for k, v in bench.model.attn_processors.items()}
    outputs(bench)
    assert {k: type(v) for k, v in bench.model.attn_processors.items()} == before
    assert {v.__name__ for v in before.values()} == {"JointAttnProcessor2_0"}
    assert not bench.model._forward_pre_hooks and not bench.model._forward_hooks


def test_a_session_left_installed_is_reported(bench):
    before = {k: type(v).__name__ for k, v in bench.model.attn_processors.items()}
    handle = bench.model.register_forward_pre_hook(lambda *args: None)
    try:
        with pytest.raises(RuntimeError, match="left something installed"):
            bt.check_installed_nothing(bench, before)
    finally:
        handle.remove()
    bt.check_installed_nothing(bench, before)


def test_a_shallow_model_says_which_depth_was_measured(bench):
    note = bt.depth_note(bench, tiny=False)
    assert "Measured: 2 of the SD3-medium architecture's 24 joint blocks (`--layers 2`)" in note
    assert "identical" in note and "per-block ratios carry" in note


@pytest.mark.parametrize(
    "argv, message",
    [(["--layers", "0"], "--layers must be at least 1"), (["--size", "72"], "needs a multiple of 16")],
)
def test_bad_options_are_refused_by_name(argv, message):
    with pytest.raises(ValueError, match=message):
        bt.run(bt.parse(["--tiny", *argv]))


def test_run_dispatches_only_sd3_to_the_transformer_case(tmp_path, capsys):
    bench_run.main(["--only", "sd3", "--tiny", "--repeats", "1", "--no-memory", "--out", str(tmp_path / "run")])
    report = json.loads((tmp_path / "sd3-cpu-float32.json").read_text())
    assert [r["name"] for r in report["rows"]] == MODES and report["args"]["repeats"] == 1
    assert "not measured (--no-memory)" in (tmp_path / "sd3-cpu-float32.md").read_text()
    with pytest.raises(SystemExit):  # the UNet table has no --layers
        bench_run.main(["--quick", "--layers", "2"])
    assert "unrecognized arguments: --layers 2" in capsys.readouterr().err


def test_defaults_are_the_briefs_sizes():
    cpu, gpu = bt.parse([]), bt.parse(["--gpu"])
    assert (cpu.device, cpu.dtype, cpu.size, cpu.layers, cpu.clock) == ("cpu", "float32", 512, 2, "cpu")
    assert (gpu.device, gpu.dtype, gpu.size, gpu.layers, gpu.clock) == ("cuda", "float16", 1024, 24, "wall")
    assert bt.SD3_MEDIUM_CONFIG["num_attention_heads"] * bt.SD3_MEDIUM_CONFIG["attention_head_dim"] == 1536
