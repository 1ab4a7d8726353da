"""Replace, Refine and self-attention injection equal prompt-to-prompt's formulas, written out here with explicit
softmax, at a chosen site and step of a real (tiny) pipeline run (float32, ≤1e-5)."""

from __future__ import annotations

import pytest
import torch

import promptcontrol as pc
from promptcontrol.controllers.inject import InjectSelf
from promptcontrol.sites import attention_modules

STEPS = 4


def site_of(pipe, kind, level, place="up"):
    sites = [s for s in pc.find_sites(pipe.unet) if s.kind == kind and s.level == level and s.place == place]
    return sites[0]


class Capture:
    """Inputs and output of one Attention module at one call (= one denoising step)."""

    def __init__(self, module, call):
        self.call, self.count, self.seen = call, 0, None
        self.handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        if self.count == self.call:
            hidden = args[0] if args else kwargs["hidden_states"]
            ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            self.seen = (hidden.detach().clone(), None if ehs is None else ehs.detach().clone(), output.detach().clone())
        self.count += 1

    def remove(self):
        self.handle.remove()


def explicit(attn, hidden, ehs):
    """Explicit softmax probabilities (B, h, Q, K) and values (B, h, K, d) of an Attention module."""
    context = hidden if ehs is None else ehs
    q, k, v = attn.to_q(hidden), attn.to_k(context), attn.to_v(context)
    b, heads = q.shape[0], attn.heads
    d = q.shape[-1] // heads
    split = lambda t: t.view(b, -1, heads, d).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    logits = (q @ k.transpose(-1, -2)) * d**-0.5
    e = torch.exp(logits - logits.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True), v


def finish(attn, heads_out):
    """(B, h, Q, d) → the module's output (B, Q, C)."""
    b, h, q, d = heads_out.shape
    return attn.to_out[0](heads_out.transpose(1, 2).reshape(b, q, h * d))


def run_captured(pipe, site, call, prompts, *controllers, guidance=7.5):
    module = attention_modules(pipe.unet, [site])[site.key]
    cap = Capture(module, call)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)).repeat(len(prompts), 1, 1, 1)
    try:
        with torch.no_grad(), pc.control(pipe, *controllers):
            pipe(prompts, latents=latents, num_inference_steps=STEPS, guidance_scale=guidance, output_type="latent")
    finally:
        cap.remove()
    return module, cap.seen


def token_ids(pipe, prompt):
    return pipe.tokenizer(prompt)["input_ids"]


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_replace_same_token_count_takes_source_map(sd15, guidance):
    site = site_of(sd15, "cross", 1)
    prompts = ["a red circle", "a green circle"]
    assert len(token_ids(sd15, prompts[0])) == len(token_ids(sd15, prompts[1]))
    with torch.no_grad():
        module, (hidden, ehs, out) = run_captured(sd15, site, 1, prompts, pc.Replace(cross_steps=1.0), guidance=guidance)
        p, v = explicit(module, hidden, ehs)
        expected_heads = p @ v  # every row its own attention...
        src, edit = (2, 3) if guidance > 1 else (0, 1)  # rows: [uncond src, uncond edit, cond src, cond edit]
        expected_heads[edit] = p[src] @ v[edit]  # ...except the edited conditional row: source map, edit values
        expected = finish(module, expected_heads)
    assert torch.allclose(out, expected, atol=1e-5)
    if guidance > 1:  # the unconditional rows are not edited (prompt-to-prompt edits the conditional half)
        assert torch.allclose(out[1], finish(module, (p @ v))[1], atol=1e-5)


def test_replace_spreads_a_word_over_more_tokens(sd15):
    site = site_of(sd15, "cross", 0, "down")
    prompts = ["a red circle", "a photorealistic circle"]
    src_ids, dst_ids = token_ids(sd15, prompts[0]), token_ids(sd15, prompts[1])
    assert len(src_ids) == 5 and len(dst_ids) == 6  # photorealistic = 2 tokens
    with torch.no_grad():
        module, (hidden, ehs, out) = run_captured(sd15, site, 2, prompts, pc.Replace(cross_steps=1.0))
        p, v = explicit(module, hidden, ehs)
        k = p.shape[-1]
        mapped = torch.zeros_like(p[2])  # edit map built token by token (prompt-to-prompt's mapper, aligned tail)
        mapped[..., 0] = p[2][..., 0]
        mapped[..., 1] = p[2][..., 1]
        mapped[..., 2] = p[2][..., 2] / 2  # "red" spread over photo + realistic
        mapped[..., 3] = p[2][..., 2] / 2
        for j in range(4, k):  # circle, end token, padding: shifted by one
            mapped[..., j] = p[2][..., min(j - 1, k - 1)]
        expected_heads = p @ v
        expected_heads[3] = mapped @ v[3]
        expected = finish(module, expected_heads)
    assert torch.allclose(out, expected, atol=1e-5)


def test_replace_per_word_window_keeps_own_map_outside(sd15):
    site = site_of(sd15, "cross", 1)
    prompts = ["a red circle", "a green circle"]
    green = 2
    controller = pc.Replace(cross_steps={"default": 1.0, "green": (0.5, 1.0)})
    with torch.no_grad():
        module, (hidden, ehs, out) = run_captured(sd15, site, 1, prompts, controller)  # step 1 of 4: green outside
        p, v = explicit(module, hidden, ehs)
        new = p[2].clone()
        new[..., green] = p[3][..., green]
        expected_heads = p @ v
        expected_heads[3] = new @ v[3]
        expected = finish(module, expected_heads)
    assert torch.allclose(out, expected, atol=1e-5)
    with torch.no_grad():  # step 2 of 4: inside for every token
        module, (hidden, ehs, out) = run_captured(sd15, site, 2, prompts, controller)
        p, v = explicit(module, hidden, ehs)
        expected_heads = p @ v
        expected_heads[3] = p[2] @ v[3]
    assert torch.allclose(out, finish(module, expected_heads), atol=1e-5)


def test_replace_outside_window_is_plain_attention(sd15):
    site = site_of(sd15, "cross", 1)
    with torch.no_grad():
        module, (hidden, ehs, out) = run_captured(sd15, site, 3, ["a red circle", "a green circle"], pc.Replace(0.5))
        p, v = explicit(module, hidden, ehs)
    assert torch.allclose(out, finish(module, p @ v), atol=1e-5)


def test_refine_aligns_tokens_and_keeps_new_tokens_own_map(sd15):
    site = site_of(sd15, "cross", 1)
    prompts = ["a cat on grass", "a fluffy cat on green grass"]
    src_ids, dst_ids = token_ids(sd15, prompts[0]), token_ids(sd15, prompts[1])
    assert len(src_ids) == 6 and len(dst_ids) == 8
    # edit tokens: 0 bos, 1 a, 2 fluffy(new), 3 cat, 4 on, 5 green(new), 6 grass, 7 eos, 8.. padding
    mapper = {0: 0, 1: 1, 3: 2, 4: 3, 6: 4, 7: 5}
    with torch.no_grad():
        module, (hidden, ehs, out) = run_captured(sd15, site, 0, prompts, pc.Refine(cross_steps=1.0))
        p, v = explicit(module, hidden, ehs)
        k = p.shape[-1]
        for j in range(8, k):
            mapper[j] = min(j - 2, k - 1)
        new = p[3].clone()
        for j, i in mapper.items():
            new[..., j] = p[2][..., i]
        expected_heads = p @ v
        expected_heads[3] = new @ v[3]
    assert torch.allclose(out, finish(module, expected_heads), atol=1e-5)


def test_self_injection_uses_source_map_with_edit_values(sd15):
    site = site_of(sd15, "self", 1)
    prompts = ["a red circle", "a green circle"]
    with torch.no_grad():
        module, (hidden, ehs, out) = run_captured(sd15, site, 1, prompts, InjectSelf(0.5))
        p, v = explicit(module, hidden, None)
        expected_heads = p @ v
        expected_heads[3] = p[2] @ v[3]
    assert torch.allclose(out, finish(module, expected_heads), atol=1e-5)
    with torch.no_grad():  # step 2 of 4 is outside 0.5
        module, (hidden, ehs, out) = run_captured(sd15, site, 2, prompts, InjectSelf(0.5))
        p, v = explicit(module, hidden, None)
    assert torch.allclose(out, finish(module, p @ v), atol=1e-5)


@pytest.mark.parametrize("kind, expected", [("sd15", (0, 1)), ("sd15-deep", (2, 3))])
def test_self_injection_default_levels_are_the_two_coarsest(tiny_pipes, kind, expected):
    """Default levels: the two coarsest with attention (two levels: both; SD 1.5's four: the third down block's and
    the middle block's, 16² and 8² at 512²)."""
    from promptcontrol.controllers.inject import default_self_levels

    pipe = tiny_pipes(kind)
    sites = pc.find_sites(pipe.unet)
    assert default_self_levels(sites) == expected
    only = InjectSelf(0.4, levels=[1])
    assert [s.level for s in sites if only.applies_to(s)] == [1] * sum(1 for s in sites if s.kind == "self" and s.level == 1)


def run_capturing_all(pipe, sites, call, prompts, *controllers, height=32, width=32):
    """(module, (hidden, ehs, output)) of every site at one call, in a run of ``controllers`` from shared noise."""
    modules = attention_modules(pipe.unet, sites)
    captures = {key: Capture(module, call) for key, module in modules.items()}
    factor = pipe.vae_scale_factor
    latents = torch.randn(1, 4, height // factor, width // factor, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad(), pc.control(pipe, *controllers):
            pipe(prompts, latents=latents.repeat(len(prompts), 1, 1, 1), num_inference_steps=STEPS,
                 height=height, width=width, output_type="latent")
    finally:
        for capture in captures.values():
            capture.remove()
    return {key: (modules[key], captures[key].seen) for key in modules}


@pytest.mark.parametrize("size", [(32, 32), (48, 32)], ids=["square", "nonsquare"])
def test_self_injection_acts_only_at_the_two_coarsest_levels_of_sd15s_layout(tiny_pipes, injected_self_queries, size):
    """On SD 1.5's four-level layout the edited row takes the source map exactly at the self-attention layers whose
    query grid is one of the two coarsest with attention (prompt-to-prompt's ≤16² layers at 512²), and attends
    with its own map at the finer ones."""
    pipe = tiny_pipes("sd15-deep")
    factor = pipe.vae_scale_factor
    expected_queries = injected_self_queries(pipe.unet, (size[0] // factor, size[1] // factor))
    sites = [s for s in pc.find_sites(pipe.unet) if s.kind == "self"]
    seen = run_capturing_all(pipe, sites, 1, ["a red circle", "a green circle"], InjectSelf(1.0),
                             height=size[0], width=size[1])
    injected, expected = set(), set()
    with torch.no_grad():
        for key, (module, (hidden, _, out)) in seen.items():
            p, v = explicit(module, hidden, None)
            own = finish(module, p @ v)
            swapped_heads = p @ v
            swapped_heads[3] = p[2] @ v[3]  # rows: [uncond src, uncond edit, cond src, cond edit]
            swapped = finish(module, swapped_heads)
            assert not torch.allclose(own, swapped, atol=1e-4), key  # the two are told apart at this layer
            if torch.allclose(out, swapped, atol=1e-5):
                injected.add(key)
            else:
                assert torch.allclose(out, own, atol=1e-5), key
            if hidden.shape[1] in expected_queries:
                expected.add(key)
    assert 0 < len(expected) < len(seen)  # some layers, not all
    assert injected == expected


def test_replace_with_different_word_counts_says_use_refine(sd15):
    before = dict(sd15.unet.attn_processors)
    with pytest.raises(ValueError, match="Refine"):
        with pc.control(sd15, pc.Replace(0.8)):
            sd15(["a red circle", "a big red circle"], num_inference_steps=2, output_type="latent")
    assert {k: type(v) for k, v in sd15.unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}
    assert "encode_prompt" not in sd15.__dict__


def test_replace_per_word_key_missing_lists_words(sd15):
    with pytest.raises(KeyError, match="green, circle"):
        with pc.control(sd15, pc.Replace({"default": 0.8, "purple": 0.2})):
            sd15(["a red circle", "a green circle"], num_inference_steps=2, output_type="latent")


def test_replace_needs_an_edit(sd15):
    with pytest.raises(ValueError, match="source prompt and at least one edited prompt"):
        pc.Replace(0.8, prompts=["only one"])


def test_self_steps_rejects_per_word():
    with pytest.raises(TypeError, match="cross_steps only"):
        InjectSelf({"cat": 0.3})


def test_every_controller_lives_in_the_controllers_package():
    """One room per idea: the edit, prompt-schedule and inversion-guidance controllers sit beside the others."""
    import promptcontrol.controllers as controllers

    assert {"AutoEdit", "Refine", "Replace", "PromptSchedule", "InversionGuidance"} <= set(controllers.__all__)
    for name in controllers.__all__:
        obj = getattr(controllers, name)
        if isinstance(obj, type) and issubclass(obj, controllers.Controller):
            assert obj.__module__.startswith("promptcontrol.controllers."), (name, obj.__module__)


def test_a_swap_of_equal_token_counts_runs_no_token_mixing():
    """Replace with an identity token map and all-one weights: the fused term keeps only the source rows (no value
    map, no scale: no extra kernel per site); a map that spreads a word keeps its matrix."""
    from promptcontrol.controllers.replace import edit_plan

    size = 5
    eye, ones = torch.eye(size), torch.ones(size)
    plan = edit_plan(2, [(1, 0, eye, ones)], size)
    (term,) = plan.terms
    assert term.qk_rows.tolist() == [0, 0] and term.value_map is None and term.value_scale is None
    spread = eye.clone()
    spread[2, 2], spread[2, 3] = 0.5, 0.5
    (term,) = edit_plan(2, [(1, 0, spread, ones)], size).terms
    assert term.value_map is not None and torch.equal(term.value_map[1], spread)
    half = edit_plan(2, [(1, 0, eye, torch.full((size,), 0.5))], size)
    assert len(half.terms) == 2 and half.terms[0].value_scale is not None


def test_shared_row_tensors_live_with_their_session_only(sd15):
    """plan.row_index keeps the source-row tensors Replace and InjectSelf share per session: during the run both
    use one object; once the session is gone, nothing of it stays in the module's cache."""
    import gc

    from promptcontrol import plan as plan_module
    from promptcontrol.controllers.inject import InjectSelf

    seen = []
    replace, inject = pc.Replace(1.0), InjectSelf(1.0)

    def grab(pipe, step, timestep, tensors):
        seen.append((replace._plan.terms[0].qk_rows, inject._plan.terms[0].qk_rows))
        return tensors

    with pc.control(sd15, replace, inject):
        sd15(["a red car", "a blue car"], num_inference_steps=2, guidance_scale=1.0, output_type="latent",
             callback_on_step_end=grab)
    assert seen and all(a is b for a, b in seen)
    gc.collect()
    assert len(plan_module._ROW_INDEX) == 0
