"""The embedded model's trainer, on a few steps: resumable state, the pipeline it writes, --init-from,
the 16×16-latent shape (--vae-channels) and --init-weights."""
from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from promptcontrol.loading import load_pipeline
from promptcontrol.toy import train
from promptcontrol.toy.model import ToyConfig, build_scheduler

TINY = ["--vae-steps", "2", "--vae-batch", "2", "--scenes", "8", "--batch", "2", "--warmup", "1", "--minutes", "10",
        "--unet-channels", "32,32"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("toy-run")
    assert train.main(["--ckpt-dir", str(ckpt), "--steps", "2", *TINY]) == 0
    return ckpt


def test_a_run_writes_a_loadable_v_prediction_pipeline(run_dir):
    config = json.loads((run_dir / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction" and config["rescale_betas_zero_snr"] is True
    assert config["timestep_spacing"] == "trailing"
    pipe = load_pipeline(run_dir / "pipeline", device="cpu")
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and torch.isfinite(torch.from_numpy(image)).all()
    assert pipe.unet.dtype == torch.float32  # loaded in float32 on the CPU, though written in float16
    assert pipe.vae.config.block_out_channels == [32, 64] and pipe.unet.config.sample_size == 16  # v3: ToyConfig()


def test_zero_snr_schedule_starts_sampling_from_pure_noise():
    scheduler = build_scheduler(ToyConfig())
    scheduler.set_timesteps(20)
    assert int(scheduler.timesteps[0]) == 999  # trailing: the first step is the last training step
    assert float(scheduler.alphas_cumprod[999]) < 1e-6  # no image left in x_T
    legacy = build_scheduler(ToyConfig.from_dict({}))  # a state from before these fields: SD 1.x's ε schedule
    assert legacy.config.prediction_type == "epsilon" and float(legacy.alphas_cumprod[999]) > 1e-3


def test_a_larger_steps_resumes_the_finished_run(run_dir):
    assert torch.load(run_dir / "state.pt", weights_only=False)["step"] == 2
    assert train.main(["--ckpt-dir", str(run_dir), "--steps", "3", *TINY]) == 0
    assert torch.load(run_dir / "state.pt", weights_only=False)["step"] == 3


def test_init_from_starts_the_diffusion_stage_from_the_other_runs_ema_weights(run_dir, tmp_path):
    source = torch.load(run_dir / "state.pt", weights_only=False)
    assert train.main(["--ckpt-dir", str(tmp_path), "--init-from", str(run_dir), "--steps", "1", "--until-step", "0",
                       *TINY]) == 0
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    assert state["step"] == 0 and state["stage"] == "diffusion" and state["init_step"] == source["step"]
    assert (tmp_path / "latents.pt").is_file()
    first_param = next(iter(dict(torch.nn.Module.named_parameters(load_pipeline(tmp_path / "pipeline").unet))))
    exported = load_pipeline(tmp_path / "pipeline").unet.state_dict()[first_param]
    assert torch.allclose(exported.float(), source["ema"][0].half().float())  # the source's EMA, not its raw weights
    assert not torch.equal(source["ema"][0], source["unet"][first_param])


def test_epsilon_on_the_zero_snr_schedule_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="needs --prediction v_prediction"):
        train.main(["--ckpt-dir", str(tmp_path), "--prediction", "epsilon", "--steps", "1", *TINY])


def test_the_state_keeps_every_chunks_options(run_dir):
    chunks = torch.load(run_dir / "state.pt", weights_only=False)["chunks"]
    assert chunks[0]["argv"][:4] == ["--ckpt-dir", str(run_dir), "--steps", "2"] and chunks[0]["step"] == 0


SHARP = ["--vae-channels", "16,32"]  # 2 VAE levels: the 32-px image ↔ a 16×16 latent


def unet_weights(pipeline_dir):
    return safetensors.torch.load_file(str(pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"))


def test_vae_channels_give_a_16x16_latent_and_the_run_resumes_in_that_shape(tmp_path):
    assert train.main(["--ckpt-dir", str(tmp_path), "--steps", "1", *TINY, *SHARP]) == 0
    assert train.main(["--ckpt-dir", str(tmp_path), "--steps", "2", *TINY]) == 0  # shape from the state, not argv
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    assert state["step"] == 2 and tuple(state["config"]["vae_channels"]) == (16, 32)
    pipe = load_pipeline(tmp_path / "pipeline", device="cpu")
    assert pipe.unet.config.sample_size == 16
    latents = pipe("a red circle", num_inference_steps=1, output_type="latent").images
    assert latents.shape == (1, 4, 16, 16)
    assert pipe("a red circle", num_inference_steps=1, output_type="np").images[0].shape == (32, 32, 3)


def test_init_weights_starts_unet_and_text_encoder_from_a_pipeline_folder(run_dir, tmp_path):
    source = run_dir / "pipeline"
    assert train.main(["--ckpt-dir", str(tmp_path), "--init-weights", str(source), "--steps", "1",
                       "--until-step", "0", *TINY, *SHARP]) == 0
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    assert state["init_weights"] == str(source) and state["stage"] == "diffusion" and state["vae_step"] == 2
    exported, original = unet_weights(tmp_path / "pipeline"), unet_weights(source)
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)  # the 8×8 model's UNet, on 16×16 latents
    te = lambda d: safetensors.torch.load_file(str(d / "text_encoder" / "model.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(te(tmp_path / "pipeline").values(), te(source).values()))
    assert load_pipeline(tmp_path / "pipeline").vae.config.block_out_channels == [16, 32]  # a new VAE


def test_init_weights_of_another_shape_is_refused_by_name(run_dir, tmp_path):
    with pytest.raises(SystemExit, match="does not fit this run's shape.*--unet-channels"):
        train.main(["--ckpt-dir", str(tmp_path), "--init-weights", str(run_dir / "pipeline"), "--steps", "1",
                    *TINY[:-1], "32,64"])
    with pytest.raises(SystemExit, match="no unet weights at"):
        train.main(["--ckpt-dir", str(tmp_path / "b"), "--init-weights", str(tmp_path), "--steps", "1", *TINY])


@pytest.mark.parametrize("options, message", [
    (["--vae-channels", "20,32"], "multiple of 16"),
    (["--vae-channels", "32,x"], "comma-separated integers"),
    (["--vae-channels", "16,16,16,16,16,16,16"], "do not divide"),
    (["--init-from", "a", "--init-weights", "b"], "exclude each other"),
])
def test_bad_shape_options_are_refused_with_the_reason(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit):
        train.parse_args(["--ckpt-dir", str(tmp_path), *options])
    assert message in capsys.readouterr().err
