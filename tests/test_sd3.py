"""SD3 / SD3.5 joint attention: pass-through equals the stock processor; maps, weights and edits equal explicit
softmax references written here (from the attention module's own projections, one explicit softmax over
``[image | text]`` keys)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from diffusers.models.attention_processor import FusedJointAttnProcessor2_0, JointAttnProcessor2_0

import promptcontrol as pc
from promptcontrol.plan import AttentionPlan, AttentionTerm
from promptcontrol.processors.joint import (
    ControlledJointAttnProcessor,
    joint_text_probs,
    padded_term,
    run_joint_plan,
)
from promptcontrol.schedule import window
from promptcontrol.testing_sd3 import tiny_sd3, tiny_sd3_transformer

RUN = dict(height=32, width=48, num_inference_steps=2, max_sequence_length=8, output_type="latent")


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3(dual=(0,))


def _processors(model):
    return {k: type(v) for k, v in model.attn_processors.items()}


def _inputs(model, batch, hw=(8, 12), text=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    config = model.config
    return dict(
        hidden_states=torch.randn(batch, config.in_channels, *hw, generator=g),
        encoder_hidden_states=torch.randn(batch, text, config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, config.pooled_projection_dim, generator=g),
        timestep=torch.rand(batch, generator=g) * 1000,
    )


# ---- explicit references ------------------------------------------------------------------------------------
def _split(x, heads):
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)  # (B, heads, n, d)


def projections(attn, hidden, context):
    """q, k, v of the image tokens and of the text tokens, (B, heads, n, d), from the module's own layers."""
    h = attn.heads
    q, k, v = (_split(f(hidden), h) for f in (attn.to_q, attn.to_k, attn.to_v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if context is None:
        return q, k, v, None, None, None
    qt, kt, vt = (_split(f(context), h) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    return q, k, v, attn.norm_added_q(qt), attn.norm_added_k(kt), vt


def module_out(attn, img, txt):
    """The module's outputs from per-head attention outputs (B, heads, n, d)."""
    merge = lambda x: x.transpose(1, 2).reshape(x.shape[0], -1, x.shape[1] * x.shape[-1])  # noqa: E731
    out = attn.to_out[1](attn.to_out[0](merge(img)))
    if txt is None:
        return out
    t = merge(txt)
    return out, (t if attn.context_pre_only else attn.to_add_out(t))


def softmax_rows(logits):
    return torch.softmax(logits.double(), dim=-1).float()


def plain_text_queries(q, k, v, qt, kt, vt):
    scale = q.shape[-1] ** -0.5
    keys, values = torch.cat([k, kt], 2), torch.cat([v, vt], 2)
    return softmax_rows(qt @ keys.transpose(-1, -2) * scale) @ values


@contextlib.contextmanager
def captured(model):
    """Every call of every attention module: [hidden, context, output] by module path."""
    calls, handles = {}, []
    for name, module in model.named_modules():
        if not (name.endswith(".attn") or name.endswith(".attn2")):
            continue

        def pre(mod, args, kwargs, name=name):
            calls.setdefault(name, []).append([kwargs["hidden_states"], kwargs.get("encoder_hidden_states")])

        def post(mod, args, kwargs, out, name=name):
            calls[name][-1].append(out)

        handles += [module.register_forward_pre_hook(pre, with_kwargs=True),
                    module.register_forward_hook(post, with_kwargs=True)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _check_calls(model, calls, reference, atol=2e-5):
    """Each captured call's output equals ``reference(attn, step, q, k, v, qt, kt, vt) -> (img, txt)``."""
    modules = dict(model.named_modules())
    checked = 0
    for name, per_call in calls.items():
        attn = modules[name]
        for step, (hidden, context, out) in enumerate(per_call):
            with torch.no_grad():
                parts = projections(attn, hidden, context)
                img, txt = reference(attn, step, *parts)
                expected = module_out(attn, img, txt)
            if context is None:
                torch.testing.assert_close(out, expected, atol=atol, rtol=1e-4)
            else:
                torch.testing.assert_close(out[0], expected[0], atol=atol, rtol=1e-4)
                torch.testing.assert_close(out[1], expected[1], atol=atol, rtol=1e-4)
            checked += 1
    assert checked > 0
    return checked


# ---- 1. pass-through equals the stock processor -------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 3])
def test_pass_through_equals_stock_joint_attention_with_dual_attention_and_qk_norm(batch):
    model = tiny_sd3_transformer(layers=3, dual=(0, 1))  # last block: context_pre_only
    assert model.transformer_blocks[-1].attn.context_pre_only
    assert isinstance(model.transformer_blocks[0].attn2.processor, JointAttnProcessor2_0)
    inputs = _inputs(model, batch, hw=(8, 12))  # non-square latent
    with torch.no_grad():
        stock = model(**inputs).sample
        before = _processors(model)
        with pc.control(model, pc.PassThrough()):
            ours = {type(p) for p in model.attn_processors.values()}
            controlled = model(**inputs).sample
    assert ours == {ControlledJointAttnProcessor}
    assert _processors(model) == before
    torch.testing.assert_close(controlled, stock, atol=1e-5, rtol=0)


class _PlainPlan(pc.Controller):
    """A plan that is not the identity object but computes plain attention: the fused joint path, all of it."""

    def applies_to(self, site):
        return site.attends_text

    def plan(self, site, ctx, plan):
        return AttentionPlan((AttentionTerm(value_scale=torch.ones(ctx.batch_size, 3)),))


def test_the_fused_joint_plan_path_with_a_neutral_plan_equals_stock():
    """Image queries under a plan (text queries apart, tokens past the plan's 3 padded) still give stock outputs."""
    model = tiny_sd3_transformer(layers=2, dual=(1,))
    inputs = _inputs(model, 2, hw=(6, 10), text=7)
    with torch.no_grad():
        stock = model(**inputs).sample
        with pc.control(model, _PlainPlan()):
            controlled = model(**inputs).sample
    torch.testing.assert_close(controlled, stock, atol=1e-5, rtol=0)


def _fused(model):
    for block in model.transformer_blocks:
        block.attn.fuse_projections()
    model.set_attn_processor(FusedJointAttnProcessor2_0())
    return model


def test_pass_through_equals_stock_fused_projections():
    model = _fused(tiny_sd3_transformer(layers=2, dual=(), qk_norm=None))
    inputs = _inputs(model, 2)
    with torch.no_grad():
        stock = model(**inputs).sample
        with pc.control(model, _PlainPlan()):
            planned = model(**inputs).sample
        with pc.control(model, pc.PassThrough()):
            passed = model(**inputs).sample
    assert {type(p) for p in model.attn_processors.values()} == {FusedJointAttnProcessor2_0}
    torch.testing.assert_close(passed, stock, atol=1e-5, rtol=0)
    torch.testing.assert_close(planned, stock, atol=1e-5, rtol=0)


def test_fused_projections_with_qk_norm_keep_the_norms_of_the_unfused_model():
    """Deliberate difference: diffusers' FusedJointAttnProcessor2_0 skips qk-norm (so fusing changes SD3.5's
    function); promptcontrol's processor applies it, as the unfused model does (docs/transformers.md)."""
    inputs = _inputs(tiny_sd3_transformer(layers=2, dual=()), 2)
    with torch.no_grad():
        unfused = tiny_sd3_transformer(layers=2, dual=())(**inputs).sample
        model = _fused(tiny_sd3_transformer(layers=2, dual=()))
        with pc.control(model, pc.PassThrough()):
            passed = model(**inputs).sample
    torch.testing.assert_close(passed, unfused, atol=1e-5, rtol=0)


@pytest.mark.parametrize("guidance,images", [(1.0, 1), (4.0, 1), (4.0, 3)])
def test_pass_through_equals_stock_on_the_tiny_sd3_pipeline(sd3, guidance, images):
    def run():
        g = torch.Generator().manual_seed(1)
        return sd3("a red circle", guidance_scale=guidance, num_images_per_prompt=images, generator=g, **RUN).images

    stock = run()
    before = _processors(sd3.transformer)
    with pc.control(sd3, pc.PassThrough()) as session:
        controlled = run()
        assert session.context.layout.size == images * (2 if guidance > 1 else 1)
    assert _processors(sd3.transformer) == before
    torch.testing.assert_close(controlled, stock, atol=1e-5, rtol=0)


# ---- 3. maps ------------------------------------------------------------------------------------------------
def test_joint_text_probs_equal_the_explicit_joint_softmax_in_any_chunking():
    g = torch.Generator().manual_seed(0)
    q, k, kt = (torch.randn(2, 3, n, 4, generator=g) * 2 for n in (10, 10, 5))
    full = softmax_rows(torch.cat([q @ k.transpose(-1, -2), q @ kt.transpose(-1, -2)], -1) * 0.5)
    for chunk in (None, 1, 3, 64):
        torch.testing.assert_close(joint_text_probs(q, k, kt, chunk=chunk), full[..., 10:], atol=1e-6, rtol=1e-5)


class _Grab(pc.Controller):
    def __init__(self, joint_norm):
        self.joint_norm = joint_norm
        self.maps = {}

    def applies_to(self, site):
        return site.kind == "joint"

    def wants_probs(self, site, ctx):
        return True

    def record(self, site, ctx, probs, plan):
        self.maps.setdefault(site.module_path, []).append(probs.clone())


def test_recorded_maps_are_image_queries_by_text_keys_of_the_explicit_joint_softmax():
    model = tiny_sd3_transformer(layers=2, dual=(0,))
    inputs = _inputs(model, 2, hw=(6, 10), text=7)
    joint, text = _Grab("joint"), _Grab("text")
    with torch.no_grad(), captured(model) as calls, pc.control(model, joint, text):
        model(**inputs)
    modules = dict(model.named_modules())
    for name, maps in joint.maps.items():
        hidden, context, _ = calls[name][0]
        with torch.no_grad():
            q, k, v, qt, kt, vt = projections(modules[name], hidden, context)
        n = k.shape[2]
        logits = torch.cat([q @ k.transpose(-1, -2), q @ kt.transpose(-1, -2)], -1) * q.shape[-1] ** -0.5
        expected = softmax_rows(logits)[..., n:]  # (B, heads, N_img, K_txt): the image × text block
        assert maps[0].shape == (2, model.config.num_attention_heads, 3 * 5, 7)
        torch.testing.assert_close(maps[0], expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(text.maps[name][0], softmax_rows(logits[..., n:]), atol=1e-6, rtol=1e-5)
    assert len(joint.maps) == 2


def test_store_keeps_joint_or_text_normalised_maps(sd3):
    stores = {norm: pc.AttentionStore(joint_norm=norm) for norm in ("joint", "text")}
    for norm, store in stores.items():
        with pc.control(sd3, store):
            sd3("a red circle", generator=torch.Generator().manual_seed(0), **RUN)
    key = next(iter(stores["joint"].runs[0].sums))
    joint, text = stores["joint"].runs[0].sums[key], stores["text"].runs[0].sums[key]  # (1, Q, K) summed
    counts = stores["text"].runs[0].counts[key]
    torch.testing.assert_close(text.sum(-1), torch.full_like(text.sum(-1), float(counts)), atol=1e-4, rtol=0)
    assert (joint.sum(-1) < counts - 1e-3).all()  # some mass goes to image keys
    assert joint.shape[-1] == 77 + RUN["max_sequence_length"]  # CLIP segment then the (zero) T5 segment
    with pytest.raises(ValueError, match="joint_norm must be 'joint'.*or 'text'"):
        pc.AttentionStore(joint_norm="image")


def test_trace_heatmaps_on_sd3(sd3):
    with pc.trace(sd3) as tr:
        sd3("a red circle", generator=torch.Generator().manual_seed(0), **RUN)
    maps = tr.heatmaps()
    assert maps.words == ["a", "red", "circle"]  # padding and the T5 segment are no words
    circle = maps["circle"]
    assert tuple(circle.shape) == (RUN["height"], RUN["width"])
    assert torch.isfinite(circle.to_tensor()).all() and float(circle.to_tensor().max()) > 0


# ---- 4. weights ---------------------------------------------------------------------------------------------
def _positions(pipe, word):
    ids = pipe.tokenizer("a red circle").input_ids
    return [i for i, t in enumerate(ids) if t == pipe.tokenizer.convert_tokens_to_ids(f"{word}</w>")]


@pytest.mark.parametrize("mode", ["attention", "softmax"])
def test_reweight_on_joint_sites_equals_the_explicit_reference(sd3, mode):
    """Equalizer: the conditional rows' image queries give the word's keys w × their probability (not
    renormalised); softmax mode: logit bias log w. Text queries and unconditional rows untouched."""
    w, pos = 1.6, _positions(sd3, "red")
    with captured(sd3.transformer) as calls, pc.control(sd3, pc.Reweight({"red": w}, mode=mode)):
        sd3("a red circle", guidance_scale=4.0, generator=torch.Generator().manual_seed(0), **RUN)

    def reference(attn, step, q, k, v, qt, kt, vt):
        if qt is None:  # dual attention's attn2: plain self-attention
            return softmax_rows(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5) @ v, None
        weights = torch.ones(q.shape[0], kt.shape[2])
        weights[1, pos] = w  # row 1: the conditional row (batch [uncond | cond])
        logits = torch.cat([q @ k.transpose(-1, -2), q @ kt.transpose(-1, -2)], -1) * q.shape[-1] ** -0.5
        n = k.shape[2]
        if mode == "softmax":
            logits[..., n:] += weights.log()[:, None, None, :]
            p = softmax_rows(logits)
            img = p @ torch.cat([v, vt], 2)
        else:
            p = softmax_rows(logits)
            img = p[..., :n] @ v + (p[..., n:] * weights[:, None, None, :]) @ vt
        return img, plain_text_queries(q, k, v, qt, kt, vt)

    assert _check_calls(sd3.transformer, calls, reference) >= 4


def test_generate_with_weight_syntax_on_sd3(sd3):
    plain = pc.generate(sd3, "a red car", seed=0, **RUN)
    weighted = pc.generate(sd3, "a (red:1.6) car", seed=0, **RUN)
    again = pc.generate(sd3, "a (red:1.6) car", seed=0, **RUN)
    assert not torch.allclose(torch.as_tensor(plain), torch.as_tensor(weighted))
    torch.testing.assert_close(torch.as_tensor(weighted), torch.as_tensor(again))


# ---- 5. edits -----------------------------------------------------------------------------------------------
def _explicit_joint(q, k, v, kt, vt, text_rows, image_rows, terms):
    """Image-query outputs of ``terms`` [(value_map (B,K,K) or None, scale (B,K) or None, bias or None)], each
    term's text logits from ``text_rows`` (first term only) and image logits from ``image_rows``; image values in
    the first term only."""
    scale = q.shape[-1] ** -0.5
    out = 0
    for index, (mapping, value_scale, bias) in enumerate(terms):
        rows_t = text_rows if index == 0 else torch.arange(q.shape[0])
        lt = q[rows_t] @ kt[rows_t].transpose(-1, -2) * scale
        li = q[image_rows] @ k[image_rows].transpose(-1, -2) * scale
        if bias is not None:
            lt = lt + bias[:, None, None, :]
        p = softmax_rows(torch.cat([li, lt], -1))
        n = k.shape[2]
        values = vt if value_scale is None else vt * value_scale[:, None, :, None]
        if mapping is not None:
            values = torch.einsum("bij,bhjd->bhid", mapping, values)
        out = out + (p[..., :n] @ v if index == 0 else 0) + p[..., n:] @ values
    return out


def test_run_joint_plan_equals_explicit_references_for_replace_refine_and_injection():
    g = torch.Generator().manual_seed(3)
    B, H, N, K, d = 3, 2, 6, 5, 4
    q, k, v = (torch.randn(B, H, N, d, generator=g) for _ in range(3))
    kt, vt = (torch.randn(B, H, K, d, generator=g) for _ in range(2))
    source = torch.tensor([0, 0, 2])  # row 1 edits row 0; row 2 keeps its own
    mapping = torch.softmax(torch.randn(B, K, K, generator=g), -1)
    alpha = torch.rand(B, K, generator=g)
    bias = torch.randn(B, K, generator=g) * 0.3
    own = torch.arange(B)
    cases = {
        "equalizer": (AttentionPlan((AttentionTerm(value_scale=alpha),)), None, own, own, [(None, alpha, None)]),
        "renormalised": (AttentionPlan((AttentionTerm(logit_bias=bias),)), None, own, own, [(None, None, bias)]),
        "replace, cross from the source, self from the edit": (
            AttentionPlan((AttentionTerm(qk_rows=source, value_map=mapping),)), None, source, own,
            [(mapping, None, None)]),
        "replace with self injection": (
            AttentionPlan((AttentionTerm(qk_rows=source, value_map=mapping),)), source, source, source,
            [(mapping, None, None)]),
        "refine, two terms": (
            AttentionPlan((AttentionTerm(qk_rows=source, value_map=mapping, value_scale=alpha),
                           AttentionTerm(value_scale=1 - alpha))), None, source, own,
            [(mapping, alpha, None), (None, 1 - alpha, None)]),
        "self injection alone": (AttentionPlan((AttentionTerm(),)), source, own, source, [(None, None, None)]),
    }
    for name, (plan, image_rows, text_rows, ref_image_rows, terms) in cases.items():
        got = run_joint_plan(plan, image_rows, q, k, v, kt, vt)
        expected = _explicit_joint(q, k, v, kt, vt, text_rows, ref_image_rows, terms)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=name)


def test_a_plan_over_fewer_tokens_is_padded_like_its_last_token():
    term = AttentionTerm(value_scale=torch.tensor([[2.0, 3.0]]), value_map=torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]),
                         logit_bias=torch.tensor([[0.5, -0.5]]))
    padded = padded_term(term, 4)
    assert padded.value_scale.tolist() == [[2.0, 3.0, 3.0, 3.0]]
    assert padded.value_map[0].tolist() == [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert padded.logit_bias.tolist() == [[0.5, -0.5, 0.0, 0.0]]
    with pytest.raises(ValueError, match="covers 2 text tokens but the site has only 1"):
        padded_term(term, 1)


def test_edit_on_sd3_equals_cross_from_the_source_and_self_injection_reference(sd3):
    steps = 5
    noise = torch.randn(1, 16, RUN["height"] // 2, RUN["width"] // 2, generator=torch.Generator().manual_seed(0))
    run = {**RUN, "num_inference_steps": steps}
    with captured(sd3.transformer) as calls:
        out = pc.edit(sd3, "a red car", "a blue car", cross_steps=0.8, self_steps=0.4, latents=noise,
                      guidance_scale=4.0, **run)
    cross, inject = window(0.8, "cross_steps"), window(0.4, "self_steps")
    own = torch.arange(4)  # rows [uncond src, uncond edit, cond src, cond edit]
    to_source = torch.tensor([0, 1, 2, 2])

    def reference(attn, step, q, k, v, qt, kt, vt):
        image_rows = to_source if inject.contains(step, steps) else own
        if qt is None:  # attn2: self-attention, injected from the source row
            return softmax_rows(q[image_rows] @ k[image_rows].transpose(-1, -2) * q.shape[-1] ** -0.5) @ v, None
        text_rows = to_source if cross.contains(step, steps) else own
        img = _explicit_joint(q, k, v, kt, vt, text_rows, image_rows, [(None, None, None)])
        return img, plain_text_queries(q, k, v, qt, kt, vt)

    assert _check_calls(sd3.transformer, calls, reference) == steps * 4  # 3 joint + 1 attn2 sites
    assert len(out.images) == 2
    assert not torch.allclose(torch.as_tensor(out.images[0]), torch.as_tensor(out.images[1]))


def test_an_edit_with_self_injection_runs_one_plain_sdpa_per_joint_site(sd3, monkeypatch):
    """Replace and InjectSelf pick the same source rows: the joint site sees that by identity (no device read) and
    runs one plain-width SDPA call, not the concatenated-features one (head dim 2d) meant for differing rows."""
    import promptcontrol.processors.joint as joint

    widths = []
    real = joint.F.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        widths.append(int(q.shape[-1]))
        return real(q, *args, **kwargs)

    monkeypatch.setattr(joint.F, "scaled_dot_product_attention", spy)
    pc.edit(sd3, "a red circle", "a blue circle", cross_steps=1.0, self_steps=1.0, seed=0, **RUN)
    head_dim = sd3.transformer.config.attention_head_dim  # (F is patched globally: the text encoders' calls count too)
    assert head_dim in widths and 2 * head_dim not in widths


def test_prompt_editing_swaps_the_text_and_the_pooled_vector_like_the_pipelines_own_callback(sd3):
    """pc.generate "a [red:blue:0.5] circle" (4 steps: "blue" from step 2 on) = the plain pipeline whose own
    step-end callback swaps the conditional half of prompt_embeds and pooled_prompt_embeds to "a blue circle"'s
    after step 1 — the text features and the pooled vector both follow the schedule."""
    run = {**RUN, "num_inference_steps": 4, "guidance_scale": 7.5}
    edited = pc.generate(sd3, "a [red:blue:0.5] circle", seed=0, **run)
    blue, _, blue_pooled, _ = sd3.encode_prompt("a blue circle", None, None, do_classifier_free_guidance=False,
                                                max_sequence_length=RUN["max_sequence_length"])

    def swap(pipe, step, timestep, tensors):
        if step == 1:  # after step 1: steps 2 and 3 use the new prompt (rows [uncond | cond])
            tensors["prompt_embeds"][1:] = blue
            tensors["pooled_prompt_embeds"][1:] = blue_pooled
        return tensors

    expected = sd3("a red circle", generator=torch.Generator().manual_seed(0), callback_on_step_end=swap,
                   callback_on_step_end_tensor_inputs=["prompt_embeds", "pooled_prompt_embeds"], **run).images
    torch.testing.assert_close(torch.as_tensor(edited), expected, atol=1e-5, rtol=0)
    text_only = sd3("a red circle", generator=torch.Generator().manual_seed(0), **run).images
    assert not torch.allclose(torch.as_tensor(edited), text_only, atol=1e-5)  # the switch changed the image


def test_embedding_mode_on_joint_attention_warns_that_the_text_streams_layernorm_undoes_it(sd3):
    """SD3's text stream is LayerNormed before every block's attention and feed-forward: a per-token scale of the
    embedder's output (bias left out) is removed exactly, which is why A1111's embedding weights barely act there.
    pc.generate(mode="embedding") says so; the attention mode does not warn."""
    import warnings

    from promptcontrol.controllers.reweight import JOINT_EMBEDDING_WARNING

    hidden = torch.randn(1, 5, sd3.transformer.config.joint_attention_dim)
    emb = sd3.transformer.context_embedder
    scaled = hidden.clone()
    scaled[:, 2] *= 2.0
    ln = torch.nn.LayerNorm(emb.out_features, elementwise_affine=False, eps=1e-6)  # AdaLayerNormZero's norm
    no_bias = lambda x: x @ emb.weight.T  # noqa: E731
    torch.testing.assert_close(ln(no_bias(scaled)), ln(no_bias(hidden)), atol=1e-4, rtol=0)  # the scale is gone
    assert not torch.allclose(no_bias(scaled), no_bias(hidden))
    with pytest.warns(UserWarning, match="LayerNorm") as caught:
        pc.generate(sd3, "a (red:1.6) car", mode="embedding", seed=0, num_inference_steps=1, output_type="np")
    assert any(str(w.message) == JOINT_EMBEDDING_WARNING for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pc.generate(sd3, "a (red:1.6) car", mode="attention", seed=0, num_inference_steps=1, output_type="np")
