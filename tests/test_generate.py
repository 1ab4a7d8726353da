"""pc.generate: parse → reweight → run equals the same run written by hand (an explicit-softmax equalizer, A1111's
emphasis on the text features); prompt editing against a callback swap."""

from __future__ import annotations

import pytest
import torch

import promptcontrol as pc

PROMPT = "a red circle and a blue square"  # red = position 2, square = 7
TOLERANCE = 1e-5  # explicit softmax against fused SDPA, float32 images after a few steps
EFFECT = 10 * TOLERANCE  # a weight must move the image this much, so a weight that does nothing fails


def stock(pipe, prompt, *, seed=0, steps=2, **kwargs):
    kwargs.setdefault("output_type", "np")
    return pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kwargs).images


def gen(pipe, prompt, *, seed=0, steps=2, **kwargs):
    kwargs.setdefault("output_type", "np")
    return pc.generate(pipe, prompt, seed=seed, num_inference_steps=steps, **kwargs)


def max_diff(a, b):
    return float(abs(torch.as_tensor(a) - torch.as_tensor(b)).max())


# ---- independent references ---------------------------------------------------------------------------------------
class Equalizer:
    """Attention written out with explicit softmax; at cross-attention, on the given steps, the probabilities of
    ``weights`` ``{batch row: {token position: w}}`` are multiplied by w (prompt-to-prompt's equalizer, mode
    ``"attention"``) and, for mode ``"softmax"``, renormalised over the tokens."""

    def __init__(self, weights, mode, steps, state):
        self.weights, self.mode, self.steps, self.state = weights, mode, steps, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        plain = attention_mask is None and attn.norm_cross is None and attn.group_norm is None and attn.spatial_norm is None
        assert plain and not attn.residual_connection and attn.rescale_output_factor == 1.0, (
            "this reference writes out plain attention only: no mask, norms, residual or output rescale"
        )
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        b, heads = q.shape[0], attn.heads
        d = q.shape[-1] // heads
        q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))  # (B, heads, tokens, d)
        logits = q @ k.transpose(-1, -2) * d**-0.5
        p = torch.exp(logits - logits.amax(-1, keepdim=True))
        p = p / p.sum(-1, keepdim=True)  # (B, heads, Q, K)
        if encoder_hidden_states is not None and (self.steps is None or self.state["step"] in self.steps):
            w = torch.ones(b, p.shape[-1], device=p.device)
            for row, table in self.weights.items():
                for position, weight in table.items():
                    w[row, position] = weight
            p = p * w[:, None, None, :]
            if self.mode == "softmax":
                p = p / p.sum(-1, keepdim=True)
        out = (p @ v).transpose(1, 2).reshape(b, -1, heads * d)
        return attn.to_out[1](attn.to_out[0](out))


def equalized(pipe, prompt, weights, *, mode="attention", weighted_steps=None, **kwargs):
    """``stock(pipe, prompt)`` with :class:`Equalizer` at every attention site (``weighted_steps``: step indices)."""
    state = {"step": -1}
    saved = dict(pipe.unet.attn_processors)
    pipe.unet.set_attn_processor({key: Equalizer(weights, mode, weighted_steps, state) for key in saved})
    hook = pipe.unet.register_forward_pre_hook(lambda *a: state.__setitem__("step", state["step"] + 1))
    try:
        with torch.no_grad():
            return stock(pipe, prompt, **kwargs)
    finally:
        hook.remove()
        pipe.unet.set_attn_processor(dict(saved))


def emphasised(pipe, prompt, weights):
    """AUTOMATIC1111's emphasis written out: the text features (1, K, D) of ``prompt`` times w at each token
    position of ``weights``, then rescaled so that their mean is the original mean."""
    with torch.no_grad():
        z = pipe.encode_prompt(prompt=prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    assert abs(z.mean()) > 0.1 * z.abs().mean(), "features with mean ~0: the mean restore is 0/0, use sd15_mean"
    w = torch.ones(z.shape[1])
    for position, weight in weights.items():
        w[position] = weight
    scaled = z * w[None, :, None]
    return scaled * (z.mean() / scaled.mean())


@pytest.fixture(scope="module")
def sd15_mean():
    """A tiny SD 1.5 pipeline whose text features have a clear mean (its final LayerNorm's bias set to 0.3): the
    random encoder's features have mean ~0 per token, where A1111's mean restore is 0/0 (the library skips it)."""
    pipe = pc.testing.tiny_pipeline("sd15")
    norm = next(m for name, m in pipe.text_encoder.named_modules() if name.endswith("final_layer_norm"))
    with torch.no_grad():
        norm.bias.fill_(0.3)
    return pipe


@pytest.mark.parametrize("kind", ["sd15", "sd21", "sdxl"])
@pytest.mark.parametrize("size", [(32, 32), (32, 48)], ids=["square", "nonsquare"])
def test_generate_equals_the_equalizer_by_hand(tiny_pipes, kind, size):
    pipe = tiny_pipes(kind)
    got = gen(pipe, "a (red:2.0) circle and a blue square-", height=size[0], width=size[1])
    expected = equalized(pipe, PROMPT, {1: {2: 2.0, 7: 0.9}}, height=size[0], width=size[1])  # row 1: conditional
    assert got.shape == (1, *size, 3)
    assert max_diff(got, expected) <= TOLERANCE
    assert max_diff(expected, stock(pipe, PROMPT, height=size[0], width=size[1])) > EFFECT  # the weights act


def test_generate_softmax_mode_renormalises(sd15):
    got = gen(sd15, "a ((red)) circle and a blue square", mode="softmax")
    expected = equalized(sd15, PROMPT, {1: {2: 1.1 * 1.1}}, mode="softmax")
    assert max_diff(got, expected) <= TOLERANCE
    assert max_diff(expected, stock(sd15, PROMPT)) > EFFECT
    assert max_diff(expected, equalized(sd15, PROMPT, {1: {2: 1.1 * 1.1}})) > EFFECT  # not the plain equalizer


def test_generate_embedding_mode_scales_the_text_features(sd15_mean):
    got = gen(sd15_mean, "a ((red)) circle and a blue square", mode="embedding")
    expected = stock(sd15_mean, None, prompt_embeds=emphasised(sd15_mean, PROMPT, {2: 1.1 * 1.1}))
    assert max_diff(got, expected) <= TOLERANCE
    assert max_diff(expected, stock(sd15_mean, PROMPT)) > EFFECT


def test_generate_batch_with_repeats(tiny_pipes):
    pipe = tiny_pipes("sdxl")
    got = gen(pipe, ["a (red:1.5) car", "a blue car+"], num_images_per_prompt=2)
    # rows: uncond 0-3 | cond 4, 5 ("a red car", red = 2), 6, 7 ("a blue car", car = 3)
    weights = {4: {2: 1.5}, 5: {2: 1.5}, 6: {3: 1.1}, 7: {3: 1.1}}
    expected = equalized(pipe, ["a red car", "a blue car"], weights, num_images_per_prompt=2)
    assert got.shape[0] == 4
    assert max_diff(got, expected) <= TOLERANCE
    plain = stock(pipe, ["a red car", "a blue car"], num_images_per_prompt=2)
    assert all(max_diff(expected[i], plain[i]) > EFFECT for i in range(4))  # every image weighted


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


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_prompt_editing_switch_at_step_zero(tiny_pipes, kind):
    """int(0.05 * 4) = 0: A1111 conditions every step on "blue" (issue 14.8)."""
    pipe = tiny_pipes(kind)
    got = gen(pipe, "a [red:blue:0.05] car", steps=4)
    assert max_diff(got, stock(pipe, "a blue car", steps=4)) <= 1e-6
    assert max_diff(got, stock(pipe, "a red car", steps=4)) > 1e-5


def test_prompt_editing_sdxl_switches_pooled_embedding_and_cleans_up(tiny_pipes):
    pipe = tiny_pipes("sdxl")
    hooks = dict(pipe.unet._forward_pre_hooks)
    got = gen(pipe, "a [red:blue:2] car", steps=4)
    assert dict(pipe.unet._forward_pre_hooks) == hooks
    text_only = swap_callback(pipe, 2, "a blue car", pooled=False)  # the same swap without the pooled one
    assert max_diff(got, stock(pipe, "a red car", steps=4, **text_only)) > 1e-6


def hooks_per_step(pipe, prompt, steps=4):
    """How many forward pre-hooks the UNet holds at the end of each step of ``pc.generate(pipe, prompt)``."""
    counts = []

    def count(p, step, timestep, tensors):
        counts.append(len(pipe.unet._forward_pre_hooks))
        return tensors

    gen(pipe, prompt, steps=steps, callback_on_step_end=count)
    return counts


def test_prompt_editing_adds_no_hook_of_its_own(tiny_pipes):
    """SDXL's pooled embedding is switched through the protocol (transform_inputs), not by a private UNet hook:
    a run with prompt editing holds the hooks of a run with weights only, at every step."""
    pipe = tiny_pipes("sdxl")
    assert hooks_per_step(pipe, "a [red:blue:2] car") == hooks_per_step(pipe, "a (red:1.5) car")


def test_prompt_schedule_swaps_the_pooled_embedding_of_its_rows():
    from promptcontrol.context import RunInfo, StepContext, batch_layout
    from promptcontrol.controllers.prompt_schedule import PromptSchedule

    g = torch.Generator().manual_seed(0)
    embeddings, pooled = torch.randn(2, 5, 4, generator=g), torch.randn(2, 3, generator=g)  # (N, K, D), (N, P)
    schedule = PromptSchedule(embeddings, [[None, None], [None, 1], [0, 1]], pooled)
    layout = batch_layout(4, RunInfo(prompts=["a", "b"], cfg=True))  # rows [uncond a, uncond b | cond a, cond b]
    text_embeds, time_ids = torch.randn(4, 3, generator=g), torch.randn(4, 6, generator=g)
    inputs = {"encoder_hidden_states": torch.randn(4, 5, 4, generator=g),
              "added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}}
    kept = text_embeds.clone()

    def at(step):
        return StepContext(index=step, timestep=999.0, total=3, latent_hw=(8, 8), layout=layout)

    assert schedule.transform_inputs(at(0), inputs) is inputs  # nothing to swap at step 0
    out = schedule.transform_inputs(at(1), inputs)["added_cond_kwargs"]
    assert torch.equal(out["text_embeds"], torch.cat([kept[:3], pooled[1:]]))  # prompt b's cond row only
    assert out["time_ids"] is time_ids
    out = schedule.transform_inputs(at(2), inputs)["added_cond_kwargs"]
    assert torch.equal(out["text_embeds"], torch.cat([kept[:2], pooled[[0, 1]]]))
    assert torch.equal(text_embeds, kept)  # the pipeline's own tensor is not changed in place
    without_pooled = PromptSchedule(embeddings, [[None, None], [None, 1], [0, 1]])
    assert without_pooled.transform_inputs(at(2), inputs) is inputs


def test_prompt_editing_with_weights(sd15):
    got = gen(sd15, "a [red:(blue:1.5):2] car", steps=4)
    swap = swap_callback(sd15, 2, "a blue car")
    expected = equalized(sd15, "a red car", {1: {2: 1.5}}, weighted_steps={2, 3}, steps=4, **swap)
    assert max_diff(got, expected) <= TOLERANCE
    assert max_diff(expected, stock(sd15, "a red car", steps=4, **swap)) > EFFECT


def test_prompt_editing_embedding_mode(sd15_mean):
    pipe = sd15_mean
    got = gen(pipe, "a [(red:1.5):blue:1] car", steps=3, mode="embedding")
    swap = swap_callback(pipe, 1, "a blue car")
    expected = stock(pipe, None, prompt_embeds=emphasised(pipe, "a red car", {2: 1.5}), steps=3, **swap)
    assert max_diff(got, expected) <= TOLERANCE
    assert max_diff(expected, stock(pipe, "a red car", steps=3, **swap)) > EFFECT


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
def test_negative_prompt_weights_act_on_unconditional_rows(sd15, sd15_mean, mode):
    # "a blue car": blue = position 2; "red photo": red = position 1
    pipe = sd15 if mode == "attention" else sd15_mean
    got = gen(pipe, "a (blue:1.2) car", negative_prompt="(red:1.5) photo", mode=mode)
    if mode == "attention":
        expected = equalized(pipe, "a blue car", {1: {2: 1.2}, 0: {1: 1.5}}, negative_prompt="red photo")
    else:
        expected = stock(pipe, None, prompt_embeds=emphasised(pipe, "a blue car", {2: 1.2}),
                         negative_prompt_embeds=emphasised(pipe, "red photo", {1: 1.5}))
    assert max_diff(got, expected) <= TOLERANCE
    assert max_diff(got, gen(pipe, "a (blue:1.2) car", negative_prompt="red photo", mode=mode)) > EFFECT


def test_negative_prompt_per_prompt_and_editing(sd15):
    got = gen(sd15, ["a red car", "a blue car"], negative_prompt=["photo", "(photo:0.5)"])
    # rows: uncond 0 ("photo"), 1 ("photo", photo = position 1) | cond 2, 3
    expected = equalized(sd15, ["a red car", "a blue car"], {1: {1: 0.5}}, negative_prompt=["photo", "photo"])
    assert max_diff(got, expected) <= TOLERANCE
    plain = stock(sd15, ["a red car", "a blue car"], negative_prompt=["photo", "photo"])
    assert max_diff(expected[0], plain[0]) <= TOLERANCE and max_diff(expected[1], plain[1]) > EFFECT  # only the second
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
