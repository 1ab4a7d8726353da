"""``benchmarks/transformers.py`` on tiny SD3 and Flux configs: the run writes every mode, each mode computes what
its name says (so the ratios time real work), nothing stays installed, the block times and the full-depth
estimate add up, and bad options are refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import run as bench_run
from benchmarks import transformers as bt

MODE_NAMES = [
    "pass-through (pc.control + PassThrough, all sites)",
    "record: pc.trace default store",
    "reweight: Reweight({'red': 2.0})",
    "edit: Replace + self injection (every site)",
]
STOCK = {"sd3": "stock JointAttnProcessor2_0", "flux": "stock FluxAttnProcessor"}


def modes(arch: str) -> list[str]:
    """The report's rows in order: stock, three 1-prompt modes, stock on 2 prompts, the edit."""
    return [STOCK[arch], *MODE_NAMES[:3], f"{STOCK[arch]}, 2 prompts", MODE_NAMES[3]]


@pytest.fixture(scope="module", params=["sd3", "flux"])
def bench(request):
    arch = bt.ARCHITECTURES[request.param]
    return bt.make_bench(arch, 64, arch.cpu_layers, "cpu", torch.float32, tiny=True)


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
    names = modes("sd3")
    assert [r["name"] for r in report["rows"]] == names
    for row in report["rows"]:
        assert len(row["times_s"]) == 2 and all(t > 0 for t in row["times_s"])
        assert 0 < row["ratio_min"] <= row["ratio"] <= row["ratio_max"] and row["best_ratio"] > 0
        assert row["peak_mb"] is not None
    stock = {r["name"]: r for r in report["rows"] if r["name"] == r["baseline"]}
    assert set(stock) == {names[0], names[4]} and all(r["best_ratio"] == 1.0 for r in stock.values())
    assert report["rows"][-1]["baseline"] == names[4]  # the edit is compared on the same 4 rows
    assert (report["image_tokens"], report["config"]["num_layers"]) == (16, 2)
    assert "Tiny config (2 blocks)" in text and (tmp_path / "sd3-cpu-float32.md").read_text() == text


def test_tiny_flux_run_has_both_block_kinds_and_no_cfg_rows(tmp_path):
    text = bt.main(["--tiny", "--arch", "flux", "--no-memory", "--out", str(tmp_path / "flux")])
    report = json.loads((tmp_path / "flux-cpu-float32.json").read_text())
    assert [r["name"] for r in report["rows"]] == modes("flux")
    assert {r["group"] for r in report["rows"]} == {"1 prompt (batch 1)", "source + edit (batch 2)"}
    assert (report["config"]["num_layers"], report["config"]["num_single_layers"]) == (1, 1)
    assert report["full_layers"] == {"double-stream": 19, "single-stream": 38}
    assert (report["image_tokens"], report["text_tokens"]) == (16, 16)  # 64² → latent 8² → packed 4×4
    for row in report["rows"]:
        assert set(row["blocks"]) == {"double-stream", "single-stream"} and len(row["block_s"]) == 2
        for kind, seconds in ((k, [b[k] for b in row["block_s"]]) for k in row["blocks"]):
            assert all(0 < s < t for s, t in zip(seconds, row["times_s"]))  # inside the forward's own time
    assert "double-stream block ratio" in text and "19 × double-stream + 38 × single-stream" in text


def test_each_mode_does_what_its_name_says(bench):
    out, sessions = outputs(bench)
    names = modes(bench.arch.name)
    stock1, stock2 = out[names[0]], out[names[4]]
    torch.testing.assert_close(out[names[1]], stock1, atol=1e-5, rtol=1e-5)  # pass-through: the stock numbers
    torch.testing.assert_close(out[names[2]], stock1, atol=1e-5, rtol=1e-5)  # recording leaves the output alone
    assert sessions[names[2]].store.memory_bytes() > 0  # ... and recorded
    reweighted = out[names[3]]
    prompt = 1 if bench.arch.cfg else 0  # SD3: [uncond, cond]; Flux: the prompt's row alone
    if bench.arch.cfg:
        torch.testing.assert_close(reweighted[0], stock1[0], atol=1e-5, rtol=1e-5)  # uncond row untouched
    assert (reweighted[prompt] - stock1[prompt]).abs().max() > 1e-3  # the word's weight acted on the prompt's row
    edited = out[names[5]]  # SD3 rows [uncond src, uncond edit, src, edit]; Flux [src, edit]
    source, edit = (2, 3) if bench.arch.cfg else (0, 1)
    torch.testing.assert_close(edited[source], stock2[source], atol=1e-5, rtol=1e-5)  # the source row is as it is
    assert (edited[edit] - stock2[edit]).abs().max() > 1e-3  # the edit row takes the source's attention


def test_the_stock_processors_are_back_after_every_mode(bench):
    before = {k: type(v) for k, v in bench.model.attn_processors.items()}
    outputs(bench)
    assert {k: type(v) for k, v in bench.model.attn_processors.items()} == before
    assert {v.__name__ for v in before.values()} == {bench.arch.stock_processor}
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in bench.model.modules())


def test_a_session_left_installed_is_reported(bench):
    before = {k: type(v).__name__ for k, v in bench.model.attn_processors.items()}
    for module in (bench.model, bench.model.transformer_blocks[0]):  # a block hook too: the clock's kind
        handle = module.register_forward_pre_hook(lambda *args: None)
        try:
            with pytest.raises(RuntimeError, match="left something installed"):
                bt.check_installed_nothing(bench, before)
        finally:
            handle.remove()
    bt.check_installed_nothing(bench, before)


def test_block_clock_splits_a_forward_by_kind_and_removes_its_hooks(bench):
    run = bench.forward(1, "probe")
    bench.clock = bt.BlockClock(bench.model, bench.arch.kinds, "wall")
    try:
        with bench.clock.installed(), torch.inference_mode():
            run()
            run()
    finally:
        bench.clock = None
    times = bench.block_times.pop("probe")
    assert len(times) == 2 and all(set(t) == {k.name for k in bench.arch.kinds} for t in times)
    assert all(s > 0 for t in times for s in t.values())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in bench.model.modules())


def test_full_depth_estimate_recomposes_outside_plus_blocks_at_full_count():
    # 10 s forward: 2 s in 1 double block, 3 s in 2 single blocks, 5 s outside → 5 + 19·2 + 38·1.5 = 100 s
    assert bt.full_depth_time(10.0, {"d": 2.0, "s": 3.0}, {"d": 1, "s": 2}, {"d": 19, "s": 38}) == 100.0
    row = {"name": "x", "baseline": "s", "times_s": [12.0]}
    base = {"name": "s", "baseline": "s", "times_s": [10.0]}
    bench = type("B", (), {})()
    bench.arch, bench.layers = bt.ARCHITECTURES["flux"], (1, 1)
    bench.block_times = {"x": [{"double-stream": 3.0, "single-stream": 4.0}],
                         "s": [{"double-stream": 2.0, "single-stream": 3.0}]}
    bt.add_block_ratios(bench, [row, base], repeats=1)
    assert row["blocks"]["double-stream"]["ratio"] == pytest.approx(1.5)
    assert row["blocks"]["single-stream"]["ratio"] == pytest.approx(4 / 3)
    # x: 5 + 19·3 + 38·4 = 214; stock: 5 + 19·2 + 38·3 = 157 (the whole forward's 1.2 weights the kinds 1:1)
    assert row["full_depth"]["ratio"] == pytest.approx(214 / 157)


def test_a_shallow_model_says_which_depth_was_measured():
    class Shallow:
        pass

    sd3, flux = Shallow(), Shallow()
    sd3.arch, sd3.layers = bt.ARCHITECTURES["sd3"], (2,)
    flux.arch, flux.layers = bt.ARCHITECTURES["flux"], (1, 1)
    note = bt.depth_note(sd3, tiny=False)
    assert "Measured: 2 of the SD3-medium architecture's 24 joint blocks (`--layers 2`)" in note
    assert "identical" in note and "per-block ratios carry" in note
    note = bt.depth_note(flux, tiny=False)
    assert "1 of the Flux.1-dev architecture's 19 double-stream and 1 of its 38 single-stream blocks" in note
    assert "per-block ratio carries" in note and "weights the kinds 1:1" in note and "19:38" in note


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--layers", "0"], "--layers must give at least 1 block"),
        (["--size", "72"], "needs a multiple of 16"),
        (["--arch", "flux", "--layers", "2"], "flux takes 2 block count"),
        (["--arch", "flux", "--layers", "1,-1"], "no negative count"),
        (["--arch", "flux", "--size", "72"], r"multiple of 16 \(VAE ×8, packed 2×2"),
    ],
)
def test_bad_options_are_refused_by_name(argv, message):
    with pytest.raises(ValueError, match=message):
        bt.run(bt.parse(["--tiny", *argv]))


def test_a_malformed_layer_count_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit):
        bt.parse(["--arch", "flux", "--layers", "one,1"])
    assert "block counts, N or D,S" in capsys.readouterr().err


def test_run_dispatches_only_sd3_to_the_transformer_case(tmp_path, capsys):
    bench_run.main(["--only", "sd3", "--tiny", "--repeats", "1", "--no-memory", "--out", str(tmp_path / "run")])
    report = json.loads((tmp_path / "sd3-cpu-float32.json").read_text())
    assert [r["name"] for r in report["rows"]] == modes("sd3") and report["args"]["repeats"] == 1
    assert "not measured (--no-memory)" in (tmp_path / "sd3-cpu-float32.md").read_text()
    assert not (tmp_path / "flux-cpu-float32.json").exists()
    with pytest.raises(SystemExit):  # the UNet table has no --layers
        bench_run.main(["--quick", "--layers", "2"])
    assert "unrecognized arguments: --layers 2" in capsys.readouterr().err


def test_run_dispatches_flux_and_both(tmp_path):
    bench_run.main(["--only", "flux", "--tiny", "--repeats", "1", "--no-memory", "--out", str(tmp_path / "run")])
    flux = json.loads((tmp_path / "flux-cpu-float32.json").read_text())
    assert [r["name"] for r in flux["rows"]] == modes("flux") and flux["args"]["arch"] == "flux"
    assert not (tmp_path / "sd3-cpu-float32.json").exists()
    text = bench_run.main(["--only", "sd3", "flux", "--tiny", "--repeats", "1", "--no-memory",
                           "--out", str(tmp_path / "both" / "run")])
    assert {p.name for p in (tmp_path / "both").glob("*.json")} == {"sd3-cpu-float32.json", "flux-cpu-float32.json"}
    assert text.index("tiny sd3 config") < text.index("tiny flux config")


def test_layers_for_both_refuse_a_count_for_one(tmp_path):
    with pytest.raises(ValueError, match="sd3 takes 1 block count"):
        bench_run.main(["--only", "sd3", "flux", "--tiny", "--layers", "1,1", "--out", str(tmp_path / "run")])


def test_defaults_are_the_briefs_sizes():
    cpu, gpu = bt.parse([]), bt.parse(["--gpu"])
    assert (cpu.device, cpu.dtype, cpu.size, cpu.layers, cpu.clock) == ("cpu", "float32", 512, (2,), "cpu")
    assert (gpu.device, gpu.dtype, gpu.size, gpu.layers, gpu.clock) == ("cuda", "float16", 1024, (24,), "wall")
    assert bt.SD3_MEDIUM_CONFIG["num_attention_heads"] * bt.SD3_MEDIUM_CONFIG["attention_head_dim"] == 1536
    cpu, gpu = bt.parse(["--arch", "flux"]), bt.parse(["--arch", "flux", "--gpu"])
    assert (cpu.dtype, cpu.size, cpu.layers, cpu.out) == ("float32", 512, (1, 1), "benchmarks/results/flux")
    assert (gpu.dtype, gpu.size, gpu.layers) == ("bfloat16", 1024, (19, 38))


def test_flux_dev_config_is_the_published_one():
    flux = bt.FLUX_DEV_CONFIG
    assert flux["num_attention_heads"] * flux["attention_head_dim"] == 3072 == 24 * 128
    assert (flux["num_layers"], flux["num_single_layers"], flux["in_channels"]) == (19, 38, 64)
    assert (flux["joint_attention_dim"], flux["pooled_projection_dim"], flux["guidance_embeds"]) == (4096, 768, True)
    assert sum(flux["axes_dims_rope"]) == flux["attention_head_dim"]


def test_flux_inputs_are_what_flux_pipeline_passes():
    from diffusers import FluxPipeline

    ids = bt.flux_image_ids(3, 5)
    torch.testing.assert_close(ids, FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32))
