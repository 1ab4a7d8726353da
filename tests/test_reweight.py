"""Reweight: each mode against an explicit reference written out here, row/token isolation, step windows, errors."""

from __future__ import annotations

import math

import pytest
import torch

import promptcontrol as pc
from promptcontrol.plan import IDENTITY, run_plan

PROMPT = "a red circle and a blue square"  # <start> a red circle and a blue square <end>: red = 2, square = 7
SITE = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
UP_SITE = "up_blocks.1.attentions.1.transformer_blocks.0.attn2"


def run(pipe, prompts=PROMPT, *, steps=2, seed=0, **kwargs):
    kwargs.setdefault("output_type", "latent")
    out = pipe(prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kwargs)
    return out.images


class Capture:
    """Forward hook on one attention module: (step, hidden_states, encoder_hidden_states, output) of every call."""

    def __init__(self, pipe, path, session=None):
        self.module = pipe.unet.get_submodule(path)
        self.session = session
        self.calls = []

    def __enter__(self):
        self.handle = self.module.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def _hook(self, module, args, kwargs, output):
        step = self.session.context.index if self.session is not None else len(self.calls)
        self.calls.append((step, args[0].detach().clone(), kwargs["encoder_hidden_states"].detach().clone(), output.detach()))


def split_heads(x, heads):
    b, n, inner = x.shape
    return x.view(b, n, heads, inner // heads).transpose(1, 2)  # (B, heads, N, d)


def explicit_probs(attn, hs, ehs, bias=None):
    """softmax(q k^T / sqrt(d) + bias), written out: (B, heads, Q, K)."""
    q, k = split_heads(attn.to_q(hs), attn.heads), split_heads(attn.to_k(ehs), attn.heads)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias[:, None, None, :]
    e = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


def reference_output(attn, hs, ehs, w, mode):
    """The attention module's output with weights ``w`` (B, K), computed explicitly."""
    if mode == "softmax":
        p = explicit_probs(attn, hs, ehs, bias=torch.log(w))
    else:
        p = explicit_probs(attn, hs, ehs) * w[:, None, None, :]  # P2P equalizer: scaled, not renormalised
    v = split_heads(attn.to_v(ehs), attn.heads)
    o = (p @ v).transpose(1, 2).reshape(hs.shape[0], -1, attn.heads * v.shape[-1])
    return attn.to_out[1](attn.to_out[0](o))


def weight_matrix(batch, keys, entries):
    """(B, K) ones with ``entries`` = {(row, position): weight}."""
    w = torch.ones(batch, keys)
    for (row, position), value in entries.items():
        w[row, position] = value
    return w


# ---- each mode against its explicit reference ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd15", "sd21"])
@pytest.mark.parametrize("mode", ["attention", "softmax"])
@pytest.mark.parametrize("path", [SITE, UP_SITE])
def test_attention_modes_equal_explicit_reference(tiny_pipes, kind, mode, path):
    pipe = tiny_pipes(kind)
    with pc.control(pipe, pc.Reweight({"red": 2.0, "square": 0.5}, mode=mode)) as session:
        with Capture(pipe, path, session) as cap, torch.no_grad():
            run(pipe)
            assert [c[0] for c in cap.calls] == [0, 1]
            for _, hs, ehs, out in cap.calls:
                w = weight_matrix(2, ehs.shape[1], {(1, 2): 2.0, (1, 7): 0.5})  # CFG: row 1 is the prompt
                ref = reference_output(cap.module, hs, ehs, w, mode)
                assert (out - ref).abs().max() <= 1e-5


def test_negative_weight_attention_mode(sd15):
    with pc.control(sd15, pc.Reweight({"blue": -1.0})) as session:
        with Capture(sd15, SITE, session) as cap, torch.no_grad():
            run(sd15)
            for _, hs, ehs, out in cap.calls:
                w = weight_matrix(2, ehs.shape[1], {(1, 6): -1.0})
                assert (out - reference_output(cap.module, hs, ehs, w, "attention")).abs().max() <= 1e-5


def a1111_emphasis(z, w):
    """A1111: z *= w per token; z *= original_mean / new_mean. z (K, D), w (K,)."""
    original_mean = z.mean()
    scaled = z * w[:, None]
    return scaled * (original_mean / scaled.mean())


@pytest.fixture(scope="module")
def trained_like_pipes():
    """Tiny pipelines whose text features have a clearly non-zero mean, as trained CLIP encoders do (an untrained
    final LayerNorm gives features of mean ~0, where A1111's mean restore divides by ~0)."""
    cache = {}

    def get(kind):
        if kind not in cache:
            pipe = pc.testing.tiny_pipeline(kind)
            with torch.no_grad():
                for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
                    if encoder is not None:
                        model = getattr(encoder, "text_model", encoder)
                        model.final_layer_norm.bias.add_(0.3)
                        model.encoder.layers[-2].mlp.fc2.bias.add_(0.3)  # SDXL reads the penultimate layer
            cache[kind] = pipe
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_embedding_mode_equals_a1111(trained_like_pipes, kind):
    pipe = trained_like_pipes(kind)
    path = SITE if kind == "sd15" else "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    with Capture(pipe, path) as plain, torch.no_grad():
        run(pipe, steps=2)
    with pc.control(pipe, pc.Reweight({"red": 2.0, "square": 0.5}, mode="embedding")) as session:
        with Capture(pipe, path, session) as cap, torch.no_grad():
            run(pipe, steps=2)
    w = torch.ones(plain.calls[0][2].shape[1])
    w[2], w[7] = 2.0, 0.5
    for (_, _, raw, _), (_, _, got, _) in zip(plain.calls, cap.calls):
        assert torch.equal(got[0], raw[0])  # unconditional row untouched
        if kind == "sdxl":  # two text encoders (16 + 16 features): A1111 restores each encoder's mean
            expected = torch.cat([a1111_emphasis(raw[1][:, :16], w), a1111_emphasis(raw[1][:, 16:], w)], dim=-1)
        else:
            expected = a1111_emphasis(raw[1], w)
        assert (got[1] - expected).abs().max() <= 1e-5
        assert not torch.allclose(got[1], raw[1])


# ---- what a weight changes and what it does not -------------------------------------------------------------------
def effective_maps(pipe, controller, prompts=PROMPT, path=SITE, **kwargs):
    """[(step, effective map, explicit map)] at one site: the fused plan run with identity values gives the map."""
    maps = []
    with pc.control(pipe, controller) as session:
        site = next(s for s in session.sites if s.module_path == path)
        module = pipe.unet.get_submodule(path)

        def hook(mod, args, kw, output):
            hs, ehs = args[0], kw["encoder_hidden_states"]
            q, k = split_heads(mod.to_q(hs), mod.heads), split_heads(mod.to_k(ehs), mod.heads)
            b, h, keys = q.shape[0], q.shape[1], k.shape[2]
            eye = torch.eye(keys).expand(b, h, keys, keys)
            plan = controller.plan(site, session.context, IDENTITY)
            # run_plan scales by 1/sqrt(d) of q: identical for every value width
            maps.append((session.context.index, run_plan(plan, q, k, eye, None), explicit_probs(mod, hs, ehs)))

        handle = module.register_forward_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                run(pipe, prompts, **kwargs)
        finally:
            handle.remove()
    return maps


def test_weight_changes_only_that_words_columns(sd15):
    for _, effective, explicit in effective_maps(sd15, pc.Reweight({"red": 3.0})):
        others = [k for k in range(effective.shape[-1]) if k != 2]
        assert (effective[..., others] - explicit[..., others]).abs().max() <= 1e-6
        assert (effective[0] - explicit[0]).abs().max() <= 1e-6  # unconditional row untouched
        assert (effective[1, :, :, 2] - 3.0 * explicit[1, :, :, 2]).abs().max() <= 1e-6


def test_phrase_repeat_and_occurrence(sd15):
    prompt = "a red red car"  # <start> a red red car: red = 2 and 3, car = 4
    cases = {
        "red": {2: 2.0, 3: 2.0},
        ("red", 2): {3: 2.0},
        "red car": {3: 2.0, 4: 2.0},  # the phrase "red car" is the second red and car
        4: {4: 2.0},
    }
    for key, expected in cases.items():
        effective, explicit = effective_maps(sd15, pc.Reweight({key: 2.0}), prompt, steps=1)[0][1:]
        scale = torch.ones(effective.shape[-1])
        for position, weight in expected.items():
            scale[position] = weight
        assert (effective[1] - explicit[1] * scale).abs().max() <= 1e-6, key


def test_per_prompt_weights_touch_only_that_prompt(sd15):
    # batch 2 prompts x 2 images, CFG: rows 0-3 uncond, 4-5 "a red car", 6-7 "a green car"; green = position 2
    maps = effective_maps(sd15, pc.Reweight([{}, {"green": 1.5}]), ["a red car", "a green car"], num_images_per_prompt=2)
    for _, effective, explicit in maps:
        assert effective.shape[0] == 8
        assert (effective[:6] - explicit[:6]).abs().max() <= 1e-6
        scale = torch.ones(effective.shape[-1])
        scale[2] = 1.5
        assert (effective[6:] - explicit[6:] * scale).abs().max() <= 1e-6


@pytest.mark.parametrize("mode", ["attention", "softmax", "embedding"])
def test_weight_one_changes_nothing(sd15, mode):
    prompts = ["a red car", "a green car"]
    stock = run(sd15, prompts)
    with pc.control(sd15, pc.Reweight({"a": 1.0, "car": 1.0, 0: 1.0}, mode=mode)):
        same = run(sd15, prompts)
    assert torch.equal(same, stock)
    # prompt 0 weighted 1.0 while prompt 1 is weighted: prompt 0 runs the fused path with scale 1 / bias 0
    with pc.control(sd15, pc.Reweight([{"red": 1.0}, {"green": 2.0}], mode=mode)):
        mixed = run(sd15, prompts)
    assert (mixed[0] - stock[0]).abs().max() <= 1e-6
    assert (mixed[1] - stock[1]).abs().max() > 1e-4


def test_negative_weights_touch_only_unconditional_rows(sd15):
    for _, effective, explicit in effective_maps(sd15, pc.Reweight({}, negative={2: 2.0})):
        assert (effective[1] - explicit[1]).abs().max() <= 1e-6
        scale = torch.ones(effective.shape[-1])
        scale[2] = 2.0
        assert (effective[0] - explicit[0] * scale).abs().max() <= 1e-6


def test_negative_weights_embedding_equal_a1111(trained_like_pipes):
    pipe = trained_like_pipes("sd15")
    with Capture(pipe, SITE) as plain, torch.no_grad():
        run(pipe, steps=1, negative_prompt="a blurry photo")
    with pc.control(pipe, pc.Reweight({}, mode="embedding", negative={2: 1.4})) as session:
        with Capture(pipe, SITE, session) as cap, torch.no_grad():
            run(pipe, steps=1, negative_prompt="a blurry photo")
    raw, got = plain.calls[0][2], cap.calls[0][2]
    w = torch.ones(raw.shape[1])
    w[2] = 1.4
    assert torch.equal(got[1], raw[1])
    assert (got[0] - a1111_emphasis(raw[0], w)).abs().max() <= 1e-5


def test_guidance_off_weights_every_row(sd15):
    for _, effective, explicit in effective_maps(sd15, pc.Reweight({"square": 0.5}), guidance_scale=1.0):
        assert effective.shape[0] == 1
        scale = torch.ones(effective.shape[-1])
        scale[7] = 0.5
        assert (effective - explicit * scale).abs().max() <= 1e-6


# ---- steps and sites ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "steps, active",
    [((1, 3), {1, 2}), ((0.25, 0.75), {1, 2}), ([0, 3], {0, 3}), ((0.0, 1.0), {0, 1, 2, 3}), ((0.5, 0.5), set()), (None, {0, 1, 2, 3}),
     (lambda ctx: ctx.index % 2 == 1, {1, 3})],  # the shared vocabulary (schedule.step_filter) takes a function too
)
def test_steps_window(sd15, steps, active):
    controller = pc.Reweight({"red": 2.0}, steps=steps)
    maps = effective_maps(sd15, controller, steps=4)
    assert sorted({s for s, _, _ in maps}) == [0, 1, 2, 3]
    for step, effective, explicit in maps:
        changed = (effective - explicit).abs().max() > 1e-3
        assert bool(changed) == (step in active), step


def test_steps_window_embedding(sd15):
    with Capture(sd15, SITE) as plain, torch.no_grad():
        run(sd15, steps=4)
    with pc.control(sd15, pc.Reweight({"red": 2.0}, mode="embedding", steps=[1, 2])) as session:
        with Capture(sd15, SITE, session) as cap, torch.no_grad():
            run(sd15, steps=4)
    changed = [not torch.equal(a[2], b[2]) for a, b in zip(plain.calls, cap.calls)]
    assert changed == [False, True, True, False]


def _controlled_keys(pipe):
    return {k for k, v in pipe.unet.attn_processors.items() if type(v).__name__ == "ControlledAttnProcessor"}


@pytest.mark.parametrize(
    "sites, keep",
    [
        ("up", lambda s: s.place == "up"),
        (["down", "mid"], lambda s: s.place in ("down", "mid")),
        ({"levels": [1]}, lambda s: s.level == 1),
        ({"places": "up", "levels": 0}, lambda s: s.place == "up" and s.level == 0),
        (lambda s: s.block == 0, lambda s: s.block == 0),
        # the shared vocabulary (schedule.site_filter): module paths and patterns, kinds and blocks
        ("up_blocks.1.*", lambda s: s.key.startswith("up_blocks.1.")),
        (["mid", "down_blocks.1.attentions.0.*"], lambda s: s.place == "mid" or s.key.startswith("down_blocks.1.attentions.0.")),
        ({"kinds": "cross", "blocks": 1}, lambda s: s.block == 1),
    ],
)
def test_sites_filter(sd15, sites, keep):
    with pc.control(sd15, pc.Reweight({"red": 2.0}, sites=sites)) as session:
        expected = {s.key for s in session.sites if s.kind == "cross" and keep(s)}
        assert expected and _controlled_keys(sd15) == expected


def test_embedding_mode_installs_no_processor(sd15):
    with pc.control(sd15, pc.Reweight({"red": 2.0}, mode="embedding")):
        assert _controlled_keys(sd15) == set()


# ---- bare UNet --------------------------------------------------------------------------------------------------
def test_bare_unet_positions():
    unet = pc.testing.tiny_unet("sd15")
    g = torch.Generator().manual_seed(0)
    sample, ehs = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        stock = unet(sample, 10, ehs).sample
        with pc.control(unet, pc.Reweight({3: 1.0}), cfg=True):
            same = unet(sample, 10, ehs).sample
        with pc.control(unet, pc.Reweight({3: 2.0}), cfg=True):
            weighted = unet(sample, 10, ehs).sample
    assert torch.equal(same, stock)
    assert (weighted[0] - stock[0]).abs().max() <= 1e-6  # unconditional row unchanged
    assert (weighted[1] - stock[1]).abs().max() > 1e-4


# ---- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "weights, error, match",
    [
        ({"red": float("nan")}, ValueError, "red"),
        ({"red": float("inf")}, ValueError, "finite"),
        ({"red": "2"}, TypeError, "red"),
        ({"red": None}, TypeError, "number"),
        ({"red": torch.tensor([1.0, 2.0])}, TypeError, "single number"),
        ({1.5: 2.0}, TypeError, "word"),
        ({-1: 2.0}, ValueError, "negative"),
        ({("red", 0): 2.0}, ValueError, "occurrence"),
        ([], ValueError, "empty"),
        ("red", TypeError, "dict"),
        ([{"red": 2.0}, "x"], TypeError, "dicts"),
    ],
)
def test_bad_weights(weights, error, match):
    with pytest.raises(error, match=match):
        pc.Reweight(weights)
    with pytest.raises(error, match=match):
        pc.Reweight({}, negative=weights)


def test_negative_weights_need_positions():
    with pytest.raises(TypeError, match="token position"):
        pc.Reweight({}, negative={"blurry": 0.5})


def test_bad_options():
    with pytest.raises(ValueError, match="mode"):
        pc.Reweight({"red": 2.0}, mode="loud")
    with pytest.raises(ValueError, match="log"):
        pc.Reweight({"red": -1.0}, mode="softmax")
    with pytest.raises(ValueError, match="sites"):
        pc.Reweight({"red": 2.0}, mode="embedding", sites="up")
    with pytest.raises(ValueError, match="place"):
        pc.Reweight({"red": 2.0}, sites="left")
    with pytest.raises(ValueError, match="levels"):
        pc.Reweight({"red": 2.0}, sites={"levels": ["x"]})
    with pytest.raises(ValueError, match="start <= end"):
        pc.Reweight({"red": 2.0}, steps=(0.8, 0.2))
    with pytest.raises(TypeError, match="steps"):
        pc.Reweight({"red": 2.0}, steps="early")


def snapshot(pipe):
    unet = pipe.unet
    return (
        {k: id(v) for k, v in unet.attn_processors.items()},
        (dict(unet._forward_pre_hooks), dict(unet._forward_hooks)),
        set(vars(pipe)),
        set(vars(pipe.scheduler)),
    )


@pytest.mark.parametrize(
    "controller, prompts, error, match",
    [
        (pc.Reweight({"purple": 2.0}), PROMPT, KeyError, "purple.*red, circle, and, a, blue, square"),
        (pc.Reweight({"red": 2.0}), ["a red car", "a green car"], KeyError, "prompt 1 of the batch"),
        (pc.Reweight({"red": 2.0, "red circle": 0.5}), PROMPT, ValueError, "conflicting"),
        (pc.Reweight({"red": 2.0, 2: 1.5}), PROMPT, ValueError, "conflicting"),
        (pc.Reweight([{"red": 2.0}]), ["a red car", "a green car"], ValueError, "1 prompt"),
        (pc.Reweight({100: 2.0}), PROMPT, ValueError, "position 100"),
        (pc.Reweight({}, negative=[{1: 2.0}]), ["a red car", "a green car"], ValueError, "negative weights for 1"),
    ],
)
def test_errors_inside_the_run_propagate_and_restore(sd15, controller, prompts, error, match):
    before = snapshot(sd15)
    with pytest.raises(error, match=match):
        with pc.control(sd15, controller):
            run(sd15, prompts)
    assert snapshot(sd15) == before
    assert controller._session is None


def test_same_weight_twice_is_not_a_conflict(sd15):
    maps = effective_maps(sd15, pc.Reweight({"red": 2.0, "red circle": 2.0}), steps=1)
    effective, explicit = maps[0][1:]
    scale = torch.ones(effective.shape[-1])
    scale[2] = scale[3] = 2.0
    assert (effective[1] - explicit[1] * scale).abs().max() <= 1e-6


def test_cut_off_word_warns(sd15):
    prompt = " ".join(["cat"] * 80) + " dragon"
    with pytest.warns(UserWarning, match="dragon"):
        with pc.control(sd15, pc.Reweight({"dragon": 2.0})):
            run(sd15, prompt, steps=1)


def test_fraction_steps_need_a_step_count():
    unet = pc.testing.tiny_unet("sd15")
    with pytest.raises(ValueError, match="fractions"):
        with pc.control(unet, pc.Reweight({3: 2.0}, steps=(0.0, 0.5))), torch.no_grad():
            unet(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 77, 32))


def test_words_need_prompt_text():
    unet = pc.testing.tiny_unet("sd15")
    with pytest.raises(ValueError, match="prompt text"):
        with pc.control(unet, pc.Reweight({"red": 2.0})), torch.no_grad():
            unet(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 77, 32))


def test_each_pipeline_call_resolves_its_own_prompt(sd15):
    controller = pc.Reweight({"red": 2.0})
    maps = []
    with pc.control(sd15, controller) as session:
        site = next(s for s in session.sites if s.module_path == SITE)
        module = sd15.unet.get_submodule(SITE)

        def hook(mod, args, kw, output):
            hs, ehs = args[0], kw["encoder_hidden_states"]
            q, k = split_heads(mod.to_q(hs), mod.heads), split_heads(mod.to_k(ehs), mod.heads)
            eye = torch.eye(k.shape[2]).expand(q.shape[0], q.shape[1], k.shape[2], k.shape[2])
            plan = controller.plan(site, session.context, IDENTITY)
            maps.append((run_plan(plan, q, k, eye, None), explicit_probs(mod, hs, ehs)))

        handle = module.register_forward_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                run(sd15, "a red car", steps=1)  # red = position 2
                run(sd15, "a big red car", steps=1)  # red = position 3
        finally:
            handle.remove()
    for (effective, explicit), position in zip(maps, (2, 3)):
        scale = torch.ones(effective.shape[-1])
        scale[position] = 2.0
        assert (effective[1] - explicit[1] * scale).abs().max() <= 1e-6


def test_new_weights_do_not_recompile():
    """Weights are tensor inputs, not constants: other values (and other words) reuse the compiled graphs."""
    from torch._dynamo.utils import counters

    pipe = pc.testing.tiny_pipeline("sd15")
    raw = pipe.unet
    compiled = torch.compile(raw, backend="eager")
    graphs = []
    for weights in [{"red": 2.0}, {"red": 3.0}, {"car": 0.5}]:
        with pc.control(pipe, pc.Reweight(weights)):  # the session is built on the plain UNet...
            pipe.unet = compiled  # ...and the pipeline calls the compiled one, which runs the same hooks
            try:
                run(pipe, "a red car")
            finally:
                pipe.unet = raw
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] == graphs[0] and graphs[2] == graphs[0]
