"""pc.LocalBlend on transformer backbones: the mask is made from the joint (SD3) or cross (PixArt) maps of the
blend words, and outside it the edited image keeps the source's latents exactly; Flux (packed latents) and a
`levels=` that selects no text site are refused clearly."""
from __future__ import annotations

import pytest
import torch

import promptcontrol as pc
from promptcontrol.testing_dit import tiny_pixart, tiny_sana
from promptcontrol.testing_flux import tiny_flux
from promptcontrol.testing_sd3 import tiny_sd3

SD3_RUN = dict(height=32, width=48, num_inference_steps=4, max_sequence_length=8, output_type="latent")
PIXART_RUN = dict(height=24, width=32, num_inference_steps=4, max_sequence_length=16, output_type="latent",
                  use_resolution_binning=False)
SANA_RUN = dict(height=32, width=64, num_inference_steps=4, max_sequence_length=16, output_type="latent",
                complex_human_instruction=None,
                use_resolution_binning=False)


def _pipes():
    # (pipeline, call, blend threshold): the random models' word maps are nearly flat, so a threshold near 1 is
    # what leaves part of the image outside the mask (measured: PixArt 0.95 → 83 % inside, 0.98 → 42 %)
    return {"sd3": (tiny_sd3(), SD3_RUN, 0.6), "pixart": (tiny_pixart(), PIXART_RUN, 0.98),
            "sana": (tiny_sana(), SANA_RUN, 0.98)}


@pytest.fixture(scope="module")
def pipes():
    return _pipes()


@pytest.mark.parametrize("which", ["sd3", "pixart", "sana"])
def test_blend_keeps_the_source_latents_outside_the_words_mask(pipes, which):
    pipe, run, threshold = pipes[which]
    pipe.set_progress_bar_config(disable=True)
    blend = pc.LocalBlend([["red"], ["blue"]], threshold=threshold, start=0.0)
    out = pc.edit(pipe, "a red circle", "a blue circle", blend=blend, seed=0, **run)
    plain = pc.edit(pipe, "a red circle", "a blue circle", seed=0, **run)
    assert blend.last_mask is not None, "the blend never made a mask: it read no site"
    keep = blend.last_mask[0] | blend.last_mask[1]  # (1, H, W): where the edit may differ
    assert 0.0 < keep.float().mean() < 1.0  # partial at this threshold (so both sides are checked)
    source, edited = torch.as_tensor(out.images[0]), torch.as_tensor(out.images[1])
    outside = (~keep).expand_as(source)
    assert torch.equal(edited[outside], source[outside])
    plain_edit = torch.as_tensor(plain.images[1])
    assert not torch.allclose(plain_edit[outside], source[outside])  # without the blend they differ there


def test_blend_on_flux_is_refused_clearly_and_installs_nothing():
    pipe = tiny_flux()
    before = {k: type(v) for k, v in pipe.transformer.attn_processors.items()}
    with pytest.raises(NotImplementedError, match=r"LocalBlend on Flux.*packed"):
        pc.edit(pipe, "a red car", "a blue car", blend=["car"], seed=0, height=32, width=32, num_inference_steps=1,
                max_sequence_length=16, output_type="latent")
    assert {k: type(v) for k, v in pipe.transformer.attn_processors.items()} == before


def test_blend_levels_that_select_no_text_site_are_refused(pipes):
    pipe, run, _ = pipes["sd3"]
    with pytest.raises(ValueError, match=r"levels=\(3,\) select no attention site.*levels \[0\]"):
        pc.edit(pipe, "a red circle", "a blue circle", blend=pc.LocalBlend(["circle"], levels=[3]), seed=0, **run)
