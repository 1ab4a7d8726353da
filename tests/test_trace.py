"""pc.trace: the face of the inspect feature — the issue's example end to end, state restored, options checked."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import promptcontrol as pc


def processors(pipe):
    return dict(pipe.unet.attn_processors)


def test_issue_example_end_to_end(sd15):
    before = processors(sd15)
    with pc.trace(sd15) as tr:
        assert tr.session is not None
        out = sd15(["a red circle and a blue square", "a dog"], num_images_per_prompt=2, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0))
    assert processors(sd15) == before and tr.session is None
    assert tr.num_images == 4
    maps = tr.heatmaps(image_index=0)
    assert maps.words == ["a", "red", "circle", "and", "a", "blue", "square"]
    circle = maps["circle"]
    assert isinstance(circle, pc.HeatMap) and circle.shape == (32, 32)
    assert float(circle.tensor.min()) == 0.0 and float(circle.tensor.max()) == pytest.approx(1.0)
    assert isinstance(circle.overlay(out.images[0]), Image.Image)
    assert isinstance(maps.grid(out.images[0]), Image.Image)
    assert maps["red circle"].positions == (2, 3)
    dog = tr.heatmaps(image_index=3)
    assert dog.words == ["a", "dog"] and isinstance(dog, pc.HeatMaps)
    assert tr.heatmaps(-1).prompt == "a dog"


def test_restored_after_an_exception_and_recordings_kept(sd15):
    before = processors(sd15)
    hooks = (len(sd15.unet._forward_pre_hooks), len(sd15.unet._forward_hooks))
    with pytest.raises(RuntimeError, match="boom"):
        with pc.trace(sd15) as tr:
            sd15("a cat", num_inference_steps=2, output_type="latent")
            raise RuntimeError("boom")
    assert processors(sd15) == before
    assert (len(sd15.unet._forward_pre_hooks), len(sd15.unet._forward_hooks)) == hooks
    assert "encode_prompt" not in sd15.__dict__
    assert tr.heatmaps(0).words == ["a", "cat"]


def test_options_reach_the_store_and_bad_options_fail(sd15):
    with pc.trace(sd15, steps=range(1, 3), sites="up", per_step=True) as tr:
        sd15("a cat", num_inference_steps=4, output_type="latent")
    assert tr.store.steps(0) == [1, 2]
    assert {s.place for s in tr.store.recorded_sites(0)} == {"up"}
    assert [s for s, _ in tr.heatmaps(0).step_maps("cat")] == [1, 2]
    with pytest.raises(TypeError, match="unknown option"):
        pc.trace(sd15, per_steps=True)
    with pytest.raises(RuntimeError, match="already used"):
        with tr:
            pass


def test_records_alongside_another_controller(sd15):
    with pc.trace(sd15, pc.PassThrough()) as tr:
        sd15("a cat", num_inference_steps=2, output_type="latent")
    maps = tr.heatmaps(0, normalize=None)
    torch.testing.assert_close(maps.raw(range(77)), torch.ones(32, 32), atol=1e-5, rtol=0)


def test_sdxl_and_non_square(tiny_pipes):
    pipe = tiny_pipes("sdxl")
    with pc.trace(pipe) as tr:
        pipe("a red circle", height=32, width=48, num_inference_steps=2, output_type="latent")
    maps = tr.heatmaps(0)
    assert maps["circle"].shape == (32, 48)
    levels = sorted({s.level for s in maps.sites})
    assert levels == [0, 1] and [w for w, _ in maps.level_weights] == [0.5, 0.5]  # 3 vs 8 sites, equal say


def test_guidance_one_records_the_single_conditional_batch(sd15):
    with pc.trace(sd15) as tr:
        sd15(["a cat", "a dog"], guidance_scale=1.0, num_inference_steps=2, output_type="latent")
    assert [tr.store.image(i).prompt for i in range(2)] == ["a cat", "a dog"]
    assert tr.heatmaps(1).words == ["a", "dog"]


def test_bare_unet_with_tokenizer_and_forced_cfg(sd15):
    tok = pc.testing.clip_tokenizer()
    ids = tok(["", "a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        text = sd15.text_encoder(ids)[0]  # (2, 77, D): [uncond | cond]
    latents = torch.randn(1, 4, 16, 16).repeat(2, 1, 1, 1)
    with pc.trace(sd15.unet, cfg=True, tokenizer=tok) as tr:
        with torch.no_grad():
            sd15.unet(latents, 10, encoder_hidden_states=text)
    assert tr.num_images == 1 and tr.store.image(0).prompt is None
    with pytest.raises(ValueError, match="prompt="):
        tr.heatmaps(0)
    maps = tr.heatmaps(0, prompt="a red circle", size=20)
    assert maps["circle"].shape == (20, 20)
    with pc.trace(sd15.unet, tokenizer=tok) as alone:  # the conditional row alone, no CFG
        with torch.no_grad():
            sd15.unet(latents[1:], 10, encoder_hidden_states=text[1:])
    site = tr.store.recorded_sites(0)[0]
    torch.testing.assert_close(tr.store.site_map(0, site), alone.store.site_map(0, site), atol=1e-5, rtol=1e-4)
