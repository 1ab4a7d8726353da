"""pc.generate: parse → reweight → run equals the same run written by hand; prompt editing against a callback swap."""

from __future__ import annotations

import pytest
import torch

import promptcontrol as pc

PROMPT = "a red circle and a blue square"  # red = position 2, square = 7


def stock(pipe, prompt, *, seed=0, steps=2, **kwargs):
    kwargs.setdefault("output_type", "np")
    return pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kwargs).images


def gen(pipe, prompt, *, seed=0, steps=2, **kwargs):
    kwargs.setdefault("output_type", "np")
    return pc.generate(pipe, prompt, seed=seed, num_inference_steps=steps, **kwargs)


def max_diff(a, b):
    return float(abs(torch.as_tensor(a) - torch.as_tensor(b)).max())


@pytest.mark.parametrize("kind", ["sd15", "sd21", "sdxl"])
@pytest.mark.parametrize("size", [(32, 32), (32, 48)], ids=["square", "nonsquare"])
def test_generate_equals_reweight_by_hand(tiny_pipes, kind, size):
    pipe = tiny_pipes(kind)
    got = gen(pipe, "a (red:2.0) circle and a blue square-", height=size[0], width=size[1])
    with pc.control(pipe, pc.Reweight({"red": 2.0, "square": 0.9})):
        expected = stock(pipe, PROMPT, height=size[0], width=size[1])
    assert got.shape == (1, *size, 3)
    assert max_diff(got, expected) <= 1e-6
    assert max_diff(got, stock(pipe, PROMPT, height=size[0], width=size[1])) > 1e-5  # the weights did something


@pytest.mark.parametrize("mode", ["softmax", "embedding"])
def test_generate_modes(sd15, mode):
    got = gen(sd15, "a ((red)) circle and a blue square", mode=mode)
    with pc.control(sd15, pc.Reweight({"red": 1.1 * 1.1}, mode=mode)):
        expected = stock(sd15, PROMPT)
    assert max_diff(got, expected) <= 1e-6


def test_generate_batch_with_repeats(tiny_pipes):
    pipe = tiny_pipes("sdxl")
    got = gen(pipe, ["a (red:1.5) car", "a blue car+"], num_images_per_prompt=2)
    with pc.control(pipe, pc.Reweight([{"red": 1.5}, {"car": 1.1}])):
        expected = stock(pipe, ["a red car", "a blue car"], num_images_per_prompt=2)
    assert got.shape[0] == 4
    assert max_diff(got, expected) <= 1e-6


def test_plain_prompt_is_a_plain_run(sd15):
    assert max_diff(gen(sd15, PROMPT), stock(sd15, PROMPT)) == 0.0
    assert max_diff(gen(sd15, "a blue square-", compel=False), stock(sd15, "a blue square-")) == 0.0


def test_seed(sd15):
    assert max_diff(gen(sd15, "a (red:2) car", seed=3), gen(sd15, "a (red:2) car", seed=3)) == 0.0
    assert max_diff(gen(sd15, "a (red:2) car", seed=3), gen(sd15, "a (red:2) car", seed=4)) > 1e-4


# ---- prompt editing against an independent swap (the pipeline's own step-end callback) ---------------------------
def swap_callback(pipe, switch_at: int, text: str, pooled: bool = True):
    """After step ``switch_at - 1``, replace the conditional text features (and SDXL's pooled embedding, as A1111
    does) with those of ``text``."""
    encoded = pipe.encode_prompt(prompt=text, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    sdxl = len(encoded) == 4
    names = ["prompt_embeds", "add_text_embeds"] if sdxl and pooled else ["prompt_embeds"]
    new = {"prompt_embeds": encoded[0], "add_text_embeds": encoded[2] if sdxl else None}

    def callback(p, step, timestep, tensors):
        if step == switch_at - 1:
            for name in names:  # rows: [uncond | cond]
                tensors[name] = torch.cat([tensors[name][:1], new[name].to(tensors[name])])
        return tensors

    return dict(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=names)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_prompt_editing_swaps_text_at_the_step(tiny_pipes, kind):
    pipe = tiny_pipes(kind)
    got = gen(pipe, "a [red:blue:2] car", steps=4)
    expected = stock(pipe, "a red car", steps=4, **swap_callback(pipe, 2, "a blue car"))
    assert max_diff(got, expected) <= 1e-6
    assert max_diff(got, stock(pipe, "a red car", steps=4)) > 1e-5
    # a fraction: int(0.5 * 4) = 2, the same switch
    assert max_diff(gen(pipe, "a [red:blue:0.5] car", steps=4), got) == 0.0


def test_prompt_editing_sdxl_switches_pooled_embedding_and_cleans_up(tiny_pipes):
    pipe = tiny_pipes("sdxl")
    hooks = dict(pipe.unet._forward_pre_hooks)
    got = gen(pipe, "a [red:blue:2] car", steps=4)
    assert dict(pipe.unet._forward_pre_hooks) == hooks
    text_only = swap_callback(pipe, 2, "a blue car", pooled=False)  # the same swap without the pooled one
    assert max_diff(got, stock(pipe, "a red car", steps=4, **text_only)) > 1e-6


def test_prompt_editing_with_weights(sd15):
    got = gen(sd15, "a [red:(blue:1.5):2] car", steps=4)
    with pc.control(sd15, pc.Reweight({2: 1.5}, steps=[2, 3])):
        expected = stock(sd15, "a red car", steps=4, **swap_callback(sd15, 2, "a blue car"))
    assert max_diff(got, expected) <= 1e-6


def test_prompt_editing_embedding_mode(sd15):
    got = gen(sd15, "a [(red:1.5):blue:1] car", steps=3, mode="embedding")
    with pc.control(sd15, pc.Reweight({2: 1.5}, mode="embedding", steps=[0])):
        expected = stock(sd15, "a red car", steps=3, **swap_callback(sd15, 1, "a blue car"))
    assert max_diff(got, expected) <= 1e-6


def test_prompt_editing_in_one_prompt_of_a_batch(sd15):
    got = gen(sd15, ["a red car", "a [red:green:1] car"], steps=2)
    new = sd15.encode_prompt(prompt="a green car", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]

    def callback(p, step, timestep, tensors):
        if step == 0:
            embeds = tensors["prompt_embeds"].clone()  # rows: uncond 0, 1 | cond 2 ("a red car"), 3 (edited)
            embeds[3] = new[0]
            tensors["prompt_embeds"] = embeds
        return tensors

    expected = stock(
        sd15, ["a red car", "a red car"], steps=2, callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
    )
    assert max_diff(got, expected) <= 1e-6


# ---- bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["attention", "embedding"])
def test_negative_prompt_weights_act_on_unconditional_rows(sd15, mode):
    # <start> red photo <end>: red = position 1
    got = gen(sd15, "a (blue:1.2) car", negative_prompt="(red:1.5) photo", mode=mode)
    with pc.control(sd15, pc.Reweight({"blue": 1.2}, mode=mode), pc.Reweight({}, negative={1: 1.5}, mode=mode)):
        expected = stock(sd15, "a blue car", negative_prompt="red photo")
    assert max_diff(got, expected) <= 1e-6
    assert max_diff(got, gen(sd15, "a (blue:1.2) car", negative_prompt="red photo", mode=mode)) > 1e-6


def test_negative_prompt_per_prompt_and_editing(sd15):
    got = gen(sd15, ["a red car", "a blue car"], negative_prompt=["photo", "(photo:0.5)"])
    with pc.control(sd15, pc.Reweight([{}, {}], negative=[{}, {1: 0.5}])):
        expected = stock(sd15, ["a red car", "a blue car"], negative_prompt=["photo", "photo"])
    assert max_diff(got, expected) <= 1e-6
    with pytest.warns(UserWarning, match="negative prompt"):
        gen(sd15, "a car", negative_prompt="[blurry:sharp:1]")


def test_cut_off_word_warns(sd15):
    with pytest.warns(UserWarning, match="dragon"):
        gen(sd15, " ".join(["cat"] * 80) + " (dragon:1.5)", steps=1)


def test_bad_input(sd15):
    with pytest.raises(TypeError, match="prompt"):
        pc.generate(sd15, 5)
    with pytest.raises(TypeError, match="prompt"):
        pc.generate(sd15, [])
    with pytest.raises(ValueError, match="prompt_embeds"):
        pc.generate(sd15, "a car", prompt_embeds=torch.zeros(1, 77, 32))
    with pytest.raises(ValueError, match="mode"):
        pc.generate(sd15, "a (red:2) car", mode="loud")


def test_prompt_editing_needs_the_real_step_count(tiny_pipes):
    pipe = tiny_pipes("sdxl")
    hooks = dict(pipe.unet._forward_pre_hooks)
    with pytest.raises(ValueError, match="built for 4 steps but the pipeline runs 2"):
        gen(pipe, "a [red:blue:2] car", steps=4, denoising_end=0.5)  # SDXL stops after half the steps
    assert dict(pipe.unet._forward_pre_hooks) == hooks
    with pytest.raises(ValueError, match="prompt_2"):
        gen(pipe, "a [red:blue:2] car", steps=4, prompt_2="a car")
