"""pc.control / pc.trace on img2img pipelines (SD and SDXL): fewer steps than scheduled (strength < 1,
SDXL ``denoising_start``), and the step bookkeeping controllers see stays right."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionXLImg2ImgPipeline,
)
from PIL import Image

import promptcontrol as pc

PROMPT = "a red circle and a blue square"
CLASSES = {"sd15": StableDiffusionImg2ImgPipeline, "sdxl": StableDiffusionXLImg2ImgPipeline}


class StepLog(pc.Controller):
    """Records what each UNet call's context says."""

    def __init__(self):
        self.seen: list[tuple[int, int | None, float, float | None, tuple[int, ...], tuple[int, ...]]] = []

    def begin_step(self, ctx):
        self.seen.append((ctx.index, ctx.total, ctx.timestep, ctx.fraction, ctx.layout.uncond_rows, ctx.layout.cond_rows))


def image(seed=0, size=32):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def img2img(tiny_pipes):
    def make(kind: str, scheduler=None):
        pipe = CLASSES[kind](**tiny_pipes(kind).components)  # shares the modules; the scheduler is replaced below
        pipe.scheduler = (scheduler or DDIMScheduler).from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


def run_logged(pipe, log, **kwargs):
    """Call the pipeline inside pc.control(log); return the (index, timestep) pairs the pipeline itself reports."""
    ran = []

    def on_step_end(_pipe, i, t, tensors):
        ran.append((i, float(t)))
        return tensors

    with pc.control(pipe, log):
        pipe(PROMPT, image=image(), output_type="latent", callback_on_step_end=on_step_end, **kwargs)
    return ran


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("scheduler", [DDIMScheduler, EulerDiscreteScheduler])
@pytest.mark.parametrize("strength, run", [(0.6, 3), (0.3, 1), (1.0, 5)])
def test_steps_index_from_zero_and_total_is_steps_run(img2img, kind, scheduler, strength, run):
    pipe = img2img(kind, scheduler)
    log = StepLog()
    ran = run_logged(pipe, log, strength=strength, num_inference_steps=5)
    assert len(ran) == run  # strength < 1 runs fewer steps than scheduled
    assert [s[0] for s in log.seen] == list(range(run))
    assert {s[1] for s in log.seen} == {run}
    assert [s[2] for s in log.seen] == [t for _, t in ran]
    assert [s[3] for s in log.seen] == pytest.approx([i / run for i in range(run)])
    assert all(s[4] == (0,) and s[5] == (1,) for s in log.seen)  # CFG: [uncond | cond]


def test_consecutive_calls_in_one_session_restart_the_count(img2img):
    pipe = img2img("sd15")
    log = StepLog()
    with pc.control(pipe, log):
        pipe(PROMPT, image=image(), strength=0.6, num_inference_steps=5, output_type="latent")
        pipe(PROMPT, image=image(), strength=0.8, num_inference_steps=10, output_type="latent")
    assert [(s[0], s[1]) for s in log.seen] == [(i, 3) for i in range(3)] + [(i, 8) for i in range(8)]


def test_sdxl_denoising_start(img2img):
    pipe = img2img("sdxl")
    log = StepLog()
    ran = run_logged(pipe, log, strength=0.9, denoising_start=0.5, num_inference_steps=6)
    assert [s[0] for s in log.seen] == list(range(len(ran))) and {s[1] for s in log.seen} == {len(ran)}
    assert 0 < len(ran) < 6  # fewer than scheduled


def test_guidance_off_has_conditional_rows_only(img2img):
    pipe = img2img("sd15")
    log = StepLog()
    run_logged(pipe, log, strength=0.6, num_inference_steps=5, guidance_scale=1.0)
    assert all(s[4] == () and s[5] == (0,) for s in log.seen)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_trace_on_img2img(img2img, kind):
    pipe = img2img(kind)
    before = dict(pipe.unet.attn_processors)
    with pc.trace(pipe, per_step=True) as tr:
        out = pipe(PROMPT, image=image(), strength=0.6, num_inference_steps=5, output_type="pil")
    assert dict(pipe.unet.attn_processors) == before and "encode_prompt" not in pipe.__dict__
    assert tr.store.steps(0) == [0, 1, 2]
    maps = tr.heatmaps(0)
    assert maps.words == ["a", "red", "circle", "and", "a", "blue", "square"]
    square = maps["square"]
    assert square.shape == (32, 32) and float(square.tensor.max()) == pytest.approx(1.0)
    assert isinstance(square.overlay(out.images[0]), Image.Image)


def test_edit_windows_on_img2img_count_the_steps_run(img2img):
    """strength 0.6 of 5 steps runs 3: a Replace window (0, 0.5) covers step 0 only (int(0.5 * 3) = 1), the same
    steps as (0, 0.34), and fewer than (0, 0.67) (steps 0 and 1). Counted against the 5 scheduled steps, (0, 0.5)
    would cover steps 0 and 1 instead."""
    pipe = img2img("sd15")

    def edited(window):
        log = StepLog()
        with pc.control(pipe, pc.Replace(window), log):
            out = pipe([PROMPT, "a red circle and a green square"], image=[image(), image()], strength=0.6,
                       num_inference_steps=5, output_type="latent",
                       generator=[torch.Generator().manual_seed(0) for _ in range(2)])
        assert [(s[0], s[1]) for s in log.seen] == [(0, 3), (1, 3), (2, 3)]
        return out.images

    half, third, two_thirds = edited((0.0, 0.5)), edited((0.0, 0.34)), edited((0.0, 0.67))
    torch.testing.assert_close(half, third)
    assert not torch.allclose(half[1], two_thirds[1], atol=1e-4)
    torch.testing.assert_close(half[0], two_thirds[0])  # the source row is never edited
