"""load_pipeline: the embedded model offline, local folders, and clear errors for what cannot load."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers/huggingface_hub read it: fail fast, never dial out

import numpy as np
import pytest
import torch

from promptcontrol.loading import EMBEDDED, ModelUnavailableError, load_pipeline
from promptcontrol.toy.model import build_pipeline
from promptcontrol.toy.train import write_pipeline

needs_embedded = pytest.mark.skipif(not (EMBEDDED / "model_index.json").is_file(),
                                    reason="embedded weights not built (python -m promptcontrol.toy.train)")


@needs_embedded
def test_embedded_loads_offline_on_cpu_and_draws_a_32px_image():
    pipe = load_pipeline(device="cpu")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    assert pipe.tokenizer.model_max_length == 77 and len(pipe.tokenizer) == 49408
    out = pipe("a red circle on the left", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
               output_type="np")
    assert out.images.shape == (1, 32, 32, 3)
    assert np.isfinite(out.images).all() and out.images.std() > 0.05  # a picture, not a flat or broken one


@needs_embedded
def test_embedded_weights_are_small_fp16_safetensors_with_the_package_tokenizer():
    files = list(EMBEDDED.rglob("*.safetensors"))
    assert {f.parent.name for f in files} == {"unet", "vae", "text_encoder"}
    assert sum(f.stat().st_size for f in files) <= 25 * 2 ** 20
    from safetensors import safe_open
    for f in files:
        with safe_open(str(f), "pt") as sf:
            assert {sf.get_tensor(k).dtype for k in sf.keys()} == {torch.float16}


def test_local_folder_round_trips_weights(tmp_path):
    pipe = build_pipeline(seed=3)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.to(torch.float16)
    write_pipeline(pipe, tmp_path / "p")
    loaded = load_pipeline(tmp_path / "p", device="cpu")
    assert type(loaded).__name__ == "StableDiffusionPipeline" and loaded.unet.dtype == torch.float32
    ref = pipe.unet.state_dict()
    for k, v in loaded.unet.state_dict().items():
        assert torch.equal(v, ref[k].float()), k
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "temp folder left behind"


def test_half_precision_on_request(tmp_path):
    pipe = build_pipeline(seed=1)
    write_pipeline(pipe, tmp_path / "p")
    assert load_pipeline(tmp_path / "p", device="cpu", torch_dtype=torch.float16).unet.dtype == torch.float16
    assert load_pipeline(tmp_path / "p", device="cpu", dtype="fp16").unet.dtype == torch.float16


def test_missing_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder at"):
        load_pipeline(tmp_path / "nowhere" / "model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(tmp_path / "empty")


def test_unreachable_hub_id_says_no_network():
    with pytest.raises(ModelUnavailableError, match="no network: pass a local folder"):
        load_pipeline("promptcontrol-test-nobody/no-such-model-zz", device="cpu")


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="unknown dtype"):
        load_pipeline(device="cpu", dtype="float12")
    with pytest.raises(ValueError, match="not both"):
        load_pipeline(device="cpu", dtype=torch.float32, torch_dtype=torch.float32)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            load_pipeline(device="cuda")


def test_sd3_folder_without_t5_loads_with_its_none_components(tmp_path):
    """SD3 saved with text_encoder_3 = tokenizer_3 = None ([null, null] in model_index.json) loads as saved."""
    from promptcontrol.testing_sd3 import tiny_sd3

    pipe = tiny_sd3()
    pipe.save_pretrained(tmp_path / "sd3")
    loaded = load_pipeline(tmp_path / "sd3", device="cpu")
    assert type(loaded).__name__ == "StableDiffusion3Pipeline"
    assert loaded.text_encoder_3 is None and loaded.tokenizer_3 is None
    ref = pipe.transformer.state_dict()
    for k, v in loaded.transformer.state_dict().items():
        assert torch.equal(v, ref[k]), k


@pytest.mark.parametrize("which", ["pixart", "sana"])
def test_pixart_and_sana_folders_load_as_their_pipeline_class(tmp_path, which):
    from promptcontrol import testing_dit

    pipe = getattr(testing_dit, f"tiny_{which}")()
    pipe.save_pretrained(tmp_path / which)
    loaded = load_pipeline(tmp_path / which, device="cpu")
    assert type(loaded) is type(pipe) and loaded.transformer.dtype == torch.float32
    ref = pipe.transformer.state_dict()
    for k, v in loaded.transformer.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_unreadable_model_index_names_the_file(tmp_path):
    from promptcontrol.loading import ModelFolderError

    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "model_index.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="model_index.json cannot be read"):
        load_pipeline(tmp_path / "p", device="cpu")


@needs_embedded
def test_the_embedded_model_is_also_loadable_by_the_name_toy():
    by_name, default = load_pipeline("toy", device="cpu"), load_pipeline(device="cpu")
    assert type(by_name).__name__ == "StableDiffusionPipeline"
    names = sorted(by_name.unet.state_dict())
    assert names == sorted(default.unet.state_dict())
    assert all(torch.equal(by_name.unet.state_dict()[n], default.unet.state_dict()[n]) for n in names[:8])


def test_toy_sd3_by_name_loads_its_folder_or_says_how_to_build_it(tmp_path, monkeypatch):
    import promptcontrol.loading as loading
    from promptcontrol.testing_sd3 import tiny_sd3

    folder = tmp_path / "toy-sd3"
    monkeypatch.setitem(loading.EMBEDDED_MODELS, "toy-sd3", (folder, "scripts/train_sd3.sh"))
    with pytest.raises(FileNotFoundError, match=r"'toy-sd3' is not shipped.*scripts/train_sd3.sh"):
        load_pipeline("toy-sd3")
    tiny_sd3().save_pretrained(folder)
    pipe = load_pipeline("toy-sd3", device="cpu")
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.transformer.dtype == torch.float32
    assert pipe.text_encoder_3 is None and pipe._progress_bar_config.get("disable") is True
