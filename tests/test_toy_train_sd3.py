"""The toy-sd3 trainer on a tiny configuration: the collapsed T5 segment equals the pipeline's 256 zero tokens,
the training text encoding is the pipeline's, a resumed run reaches the unbroken run's state, and the exported
folder is a stock StableDiffusion3Pipeline that ``load_pipeline`` loads and ``pc.trace`` records on."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

import promptcontrol as pc
from promptcontrol.loading import load_pipeline
from promptcontrol.testing_sd3 import tiny_sd3_transformer
from promptcontrol.toy import train_sd3
from promptcontrol.toy.model import EMBEDDED, TOKENIZER, build_tokenizer
from promptcontrol.toy.model_sd3 import (
    DEFAULT_VAE, ToySD3Config, adaln_zero_, assemble, build_scheduler, build_text_encoders, build_transformer,
    config_for_vae, load_vae, parameter_counts,
)

TINY = ["--scenes", "8", "--batch", "2", "--warmup", "1", "--width", "32", "--layers", "2", "--log-every", "1",
        "--minutes", "10"]


def _state(folder: Path) -> dict:
    return torch.load(folder / "state.pt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("sd3-unbroken")
    assert train_sd3.main(["--ckpt-dir", str(ckpt), "--steps", "3", *TINY]) == 0
    return ckpt


# --------------------------------------------------------------------------- the T5 segment


def _forward(model, clip, t5_tokens, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(2, c.in_channels, 8, 8, generator=g)  # (B, C, h, w)
    pooled = torch.randn(2, c.pooled_projection_dim, generator=g)
    text = torch.cat([clip, torch.zeros(2, t5_tokens, c.joint_attention_dim)], dim=1)  # (B, 77 + n, D)
    with torch.no_grad():
        return model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                     timestep=torch.tensor([300.0, 800.0])).sample


@pytest.mark.parametrize("make", [lambda: build_transformer(ToySD3Config(width=64, layers=3)),
                                  lambda: tiny_sd3_transformer(layers=3, dual=(0, 1))],
                         ids=["toy-sd3 shape", "sd3.5 dual attention"])
def test_256_zero_t5_tokens_equal_one_token_with_a_log256_key_bias(make):
    model = make().eval()
    clip = torch.randn(2, 77, model.config.joint_attention_dim, generator=torch.Generator().manual_seed(0))
    full = _forward(model, clip, 256)  # stock processors, the pipeline's 256 zero vectors
    plain_one = _forward(model, clip, 1)
    train_sd3.install_collapsed_t5(model, 256)
    collapsed = _forward(model, clip, 1)
    assert (collapsed - full).abs().max() <= 1e-5
    assert (plain_one - full).abs().max() > 1e-3  # one token without the bias is another function: the bias does it


def test_the_collapsed_processor_refuses_a_call_without_text():
    proc = train_sd3.CollapsedT5Processor(256)
    attn = build_transformer(ToySD3Config(width=32, layers=1)).transformer_blocks[0].attn
    with pytest.raises(ValueError, match="joint"):
        proc(attn, torch.zeros(1, 4, 32))
    with pytest.raises(ValueError, match="copies"):
        train_sd3.CollapsedT5Processor(0)


# --------------------------------------------------------------------------- text and time as the pipeline has them


def test_training_text_is_what_encode_prompt_gives_with_the_t5_segment_as_one_token(unbroken):
    tr = train_sd3.Trainer(train_sd3.parse_args(["--ckpt-dir", str(unbroken), "--steps", "3", *TINY]), [])
    pipe = assemble(tr.transformer, tr.vae, tr.te1, tr.te2, tr.tok, build_scheduler(tr.cfg))
    captions = ["a red circle on the left", "at the top a blue square and a green triangle"]
    with torch.no_grad():
        ref, _, ref_pooled, _ = pipe.encode_prompt(captions, captions, captions, do_classifier_free_guidance=False)
        ours, pooled, _ = tr.encode_text(tr.tokenize(captions), pad_fix=False)
    assert ref.shape == (2, 77 + 256, tr.cfg.joint_dim) and ours.shape == (2, 77 + 1, tr.cfg.joint_dim)
    torch.testing.assert_close(ours[:, :77], ref[:, :77], rtol=0, atol=1e-6)
    assert not ours[:, 77:].any() and not ref[:, 77:].any()
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=0)
    assert not pooled.any()  # zero, frozen text projections: the caption reaches the image only through attention


def test_the_padding_fix_gives_every_caption_the_empty_prompts_states_from_the_end_token_on():
    tr = train_sd3.Trainer.__new__(train_sd3.Trainer)
    tr.cfg, tr.dev, tr.tok = ToySD3Config(), torch.device("cpu"), build_tokenizer(TOKENIZER)
    torch.manual_seed(0)
    tr.te1, tr.te2 = build_text_encoders(tr.cfg, tr.tok)
    ids = tr.tokenize(["a red circle", "on the left a blue square and a yellow triangle"])
    with torch.no_grad():
        fixed, _, pad_loss = tr.encode_text(ids, pad_fix=True)
        raw, _, _ = tr.encode_text(ids, pad_fix=False)
        empty, _, _ = tr.encode_text(tr.tokenize([""]), pad_fix=False)
    for row in range(2):
        end = int((ids[row] == tr.tok.eos_token_id).nonzero()[0])
        torch.testing.assert_close(fixed[row, end:77], empty[0, end:77], rtol=0, atol=0)
        torch.testing.assert_close(fixed[row, :end], raw[row, :end], rtol=0, atol=0)
        assert (raw[row, end:77] - empty[0, end:77]).abs().max() > 1e-3  # a causal encoder leaks the caption there
    assert pad_loss > 0


def test_the_euler_sampler_with_the_trained_velocity_lands_on_the_clean_latent():
    """An oracle that answers the trainer's own target (``flow_pair`` at timestep 1000 t) for the x_t it is given,
    stepped by the exported scheduler from pure noise, must end at x0: sign and time convention agree."""
    scheduler = build_scheduler(ToySD3Config())
    scheduler.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    x0, x = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    for step in scheduler.timesteps:
        t = (step / train_sd3.NUM_TRAIN_TIMESTEPS).reshape(1)
        noise = (x - (1 - t) * x0) / t  # the ε that makes x the trainer's x_t at this t
        xt, target = train_sd3.flow_pair(x0, noise, t)
        torch.testing.assert_close(xt, x)
        x = scheduler.step(target, step, x).prev_sample
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- state, resume, export


def test_a_resumed_run_reaches_the_unbroken_runs_state(unbroken, tmp_path):
    assert train_sd3.main(["--ckpt-dir", str(tmp_path), "--steps", "3", "--until-step", "2", *TINY]) == 0
    assert _state(tmp_path)["step"] == 2 and (tmp_path / "pipeline" / "model_index.json").is_file()
    assert train_sd3.main(["--ckpt-dir", str(tmp_path), "--steps", "3", *TINY]) == 0
    a, b = _state(unbroken), _state(tmp_path)
    assert a["step"] == b["step"] == 3 and a["stage"] == b["stage"] == "done"
    for part in ("transformer", "text_encoder", "text_encoder_2"):
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), f"{part}.{name} differs after resuming"
    assert all(torch.equal(x, y) for x, y in zip(a["ema"], b["ema"], strict=True))
    assert [c["step"] for c in b["chunks"]] == [0, 2]  # each chunk's options are kept


def test_the_exported_folder_loads_as_a_stock_sd3_pipeline_and_trace_records_on_it(unbroken):
    folder = unbroken / "pipeline"
    pipe = load_pipeline(folder, device="cpu")
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.text_encoder_3 is None
    assert pipe.transformer.dtype == torch.float32  # loaded in float32 though written in float16
    vae_config = json.loads((DEFAULT_VAE / "config.json").read_text())
    assert pipe.vae.config.shift_factor == 0.0 and pipe.vae.config.scaling_factor == vae_config["scaling_factor"]
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.shift == 1.0
    assert all(type(p).__name__ == "JointAttnProcessor2_0" for p in pipe.transformer.attn_processors.values())
    assert (folder / "tokenizer" / "vocab.json").read_bytes() == (TOKENIZER / "vocab.json").read_bytes()
    assert (folder / "tokenizer_2" / "merges.txt").read_bytes() == (TOKENIZER / "merges.txt").read_bytes()
    with pc.trace(pipe) as tr:
        image = pipe("a red circle", num_inference_steps=2, output_type="np").images[0]  # default 256 T5 tokens
    assert image.shape == (32, 32, 3)
    circle = tr.heatmaps()["circle"].to_tensor()
    assert circle.shape == (32, 32) and torch.isfinite(circle).all() and circle.max() > circle.min()


def test_the_exported_weights_are_the_ema_in_float16(unbroken):
    state = _state(unbroken)
    weights = safetensors.torch.load_file(str(unbroken / "pipeline" / "transformer" /
                                              "diffusion_pytorch_model.safetensors"))
    first = next(iter(build_transformer(ToySD3Config.from_dict(state["config"])).named_parameters()))[0]
    assert weights[first].dtype == torch.float16
    torch.testing.assert_close(weights[first], state["ema"][0].half(), rtol=0, atol=0)
    assert not torch.equal(state["ema"][0], state["transformer"][first])  # the EMA, not the raw weights


def test_a_new_run_starts_from_adaln_zero():
    model = adaln_zero_(build_transformer(ToySD3Config(width=32, layers=2)))
    out = _forward(model, torch.randn(2, 77, model.config.joint_attention_dim), 1)
    assert not out.any()  # zero output projection; each block's modulation zero too:
    assert all(not b.norm1.linear.weight.any() and not b.norm1_context.linear.weight.any()
               for b in model.transformer_blocks)


def test_init_text_copies_the_toy_models_encoder_and_refuses_another_width():
    cfg = ToySD3Config()
    torch.manual_seed(0)
    te1, te2 = build_text_encoders(cfg, build_tokenizer(TOKENIZER))
    assert "tensors copied" in train_sd3.init_text_encoder(te1, EMBEDDED)
    source = safetensors.torch.load_file(str(EMBEDDED / "text_encoder" / "model.safetensors"))
    token_table = next(k for k in source if k.endswith("token_embedding.weight"))
    torch.testing.assert_close(te1.text_model.embeddings.token_embedding.weight, source[token_table].float())
    assert not te1.text_projection.weight.any()  # still the frozen zero projection
    with pytest.raises(SystemExit, match="width 16"):
        train_sd3.init_text_encoder(te2, EMBEDDED)
    with pytest.raises(SystemExit, match="no text_encoder"):
        train_sd3.init_text_encoder(te1, DEFAULT_VAE)


def test_resuming_with_another_seed_is_refused(unbroken):
    with pytest.raises(SystemExit, match="--seed 0, not 5"):
        train_sd3.Trainer(train_sd3.parse_args(["--ckpt-dir", str(unbroken), "--seed", "5", *TINY]), [])


def test_a_vae_folder_that_is_not_one_is_refused_by_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="not an AutoencoderKL"):
        load_vae(tmp_path)


@pytest.mark.parametrize("options, message", [(["--batch", "0"], "--batch must be > 0"),
                                              (["--uniform-share", "1.5"], "between 0 and 1"),
                                              (["--device", "tpu"], "--device must be cpu or cuda")])
def test_bad_options_are_refused_with_the_reason(options, message, capsys):
    with pytest.raises(SystemExit):
        train_sd3.parse_args(options)
    assert message in capsys.readouterr().err


def test_bad_sizes_are_refused_by_field():
    with pytest.raises(ValueError, match="head_dim"):
        ToySD3Config(width=48).check()
    with pytest.raises(ValueError, match="text_layers must be >= 2"):
        ToySD3Config(text_layers=1).check()


def test_the_default_model_fits_the_20_mb_budget():
    """fp16 weights of the trained parts + the VAE file + two tokenizer copies ≤ 20 MB (the asset's limit)."""
    cfg = config_for_vae(ToySD3Config(), load_vae())
    counts = parameter_counts(cfg)
    files = [*DEFAULT_VAE.iterdir(), *TOKENIZER.iterdir(), *TOKENIZER.iterdir()]
    total = 2 * sum(counts.values()) + sum(f.stat().st_size for f in files)
    assert total <= 20e6, f"{total / 1e6:.1f} MB: {counts}"
    assert cfg.grid == 8  # patch 1 on the 8×8 latent: maps at 8×8
