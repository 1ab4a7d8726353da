"""Flux.1 attention, double- and single-stream: pass-through equals the stock FluxAttnProcessor; maps, weights
and edits equal explicit softmax references written here (from the attention module's own projections, rotary
embeddings and one explicit softmax over ``[text | image]`` keys)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

import promptcontrol as pc
from promptcontrol.plan import AttentionPlan, AttentionTerm
from promptcontrol.processors.flux import ControlledFluxAttnProcessor
from promptcontrol.schedule import window
from promptcontrol.testing_flux import MAX_SEQUENCE_LENGTH, tiny_flux, tiny_flux_transformer
from promptcontrol.tokens import tokenize

RUN = dict(height=32, width=48, num_inference_steps=2, max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="latent")
TRUE_CFG = dict(negative_prompt="blur", true_cfg_scale=2.0)


@pytest.fixture(scope="module")
def flux():
    return tiny_flux()


def _processors(model):
    return {k: type(v) for k, v in model.attn_processors.items()}


def _inputs(model, batch, grid=(3, 5), text=7, seed=0):
    """A bare transformer call as FluxPipeline makes it (packed latents, txt_ids, img_ids, guidance)."""
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(seed)
    config = model.config
    return dict(
        hidden_states=torch.randn(batch, grid[0] * grid[1], config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, text, config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, config.pooled_projection_dim, generator=g),
        timestep=torch.rand(batch, generator=g),
        guidance=torch.full((batch,), 3.5) if config.guidance_embeds else None,
        txt_ids=torch.zeros(text, 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(batch, grid[0], grid[1], "cpu", torch.float32),
    )


# ---- explicit references ------------------------------------------------------------------------------------
def flux_qkv(attn, hidden, context, rotary):
    """q, k, v of the whole ``[text | image]`` sequence, (B, heads, N, d), from the module's own layers."""
    heads = lambda x: x.unflatten(-1, (-1, attn.head_dim))  # noqa: E731
    q, k, v = heads(attn.to_q(hidden)), heads(attn.to_k(hidden)), heads(attn.to_v(hidden))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if context is not None:
        qt, kt = attn.norm_added_q(heads(attn.add_q_proj(context))), attn.norm_added_k(heads(attn.add_k_proj(context)))
        q, k, v = torch.cat([qt, q], 1), torch.cat([kt, k], 1), torch.cat([heads(attn.add_v_proj(context)), v], 1)
    q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def flux_out(attn, out, context):
    """The module's output from the attention output (B, heads, N, d) of the whole sequence."""
    flat = out.transpose(1, 2).flatten(2, 3)
    if context is None:
        return flat
    n = context.shape[1]
    return attn.to_out[1](attn.to_out[0](flat[:, n:])), attn.to_add_out(flat[:, :n])


def softmax_rows(logits):
    return torch.softmax(logits.double(), dim=-1).float()


def explicit_attention(q, k, v, n, terms=((None, None, None),), text_rows=None, image_rows=None):
    """Attention over ``[text | image]``: text queries plain; image queries the sum of ``terms`` [(value_map
    (B, K, K), value_scale (B, K), logit bias (B, K)) or None each], each with the image → text logits of
    ``text_rows`` (first term; own rows after) and the image → image logits of ``image_rows``, one softmax;
    image values in the first term only."""
    scale, own = q.shape[-1] ** -0.5, torch.arange(q.shape[0])
    text_rows = own if text_rows is None else text_rows
    image_rows = own if image_rows is None else image_rows
    q_img, k_txt, k_img, v_txt, v_img = q[:, :, n:], k[:, :, :n], k[:, :, n:], v[:, :, :n], v[:, :, n:]
    out_img = 0
    for index, (mapping, value_scale, bias) in enumerate(terms):
        rows = text_rows if index == 0 else own
        lt = q_img[rows] @ k_txt[rows].transpose(-1, -2) * scale
        li = q_img[image_rows] @ k_img[image_rows].transpose(-1, -2) * scale
        if bias is not None:
            lt = lt + bias[:, None, None, :]
        p = softmax_rows(torch.cat([lt, li], -1))
        values = v_txt if value_scale is None else v_txt * value_scale[:, None, :, None]
        if mapping is not None:
            values = torch.einsum("bij,bhjd->bhid", mapping, values)
        out_img = out_img + p[..., :n] @ values + (p[..., n:] @ v_img if index == 0 else 0)
    out_txt = softmax_rows(q[:, :, :n] @ k.transpose(-1, -2) * scale) @ v
    return torch.cat([out_txt, out_img], 2)


@contextlib.contextmanager
def captured(model):
    """Every call of every attention module: [hidden, context, rotary, output] by module path."""
    calls, handles = {}, []
    for name, module in model.named_modules():
        if not name.endswith(".attn"):
            continue

        def pre(mod, args, kwargs, name=name):
            calls.setdefault(name, []).append(
                [kwargs["hidden_states"], kwargs.get("encoder_hidden_states"), kwargs.get("image_rotary_emb")]
            )

        def post(mod, args, kwargs, out, name=name):
            calls[name][-1].append(out)

        handles += [module.register_forward_pre_hook(pre, with_kwargs=True),
                    module.register_forward_hook(post, with_kwargs=True)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def check_calls(model, calls, text_length, reference, atol=2e-5):
    """Each captured call's output equals ``flux_out(reference(step, q, k, v, n_txt))``; the count checked."""
    modules, checked = dict(model.named_modules()), 0
    for name, per_call in calls.items():
        attn = modules[name]
        for step, (hidden, context, rotary, out) in enumerate(per_call):
            with torch.no_grad():
                q, k, v = flux_qkv(attn, hidden, context, rotary)
                expected = flux_out(attn, reference(step, q, k, v, text_length), context)
            if context is None:
                torch.testing.assert_close(out, expected, atol=atol, rtol=1e-4)
            else:
                torch.testing.assert_close(out[0], expected[0], atol=atol, rtol=1e-4)
                torch.testing.assert_close(out[1], expected[1], atol=atol, rtol=1e-4)
            checked += 1
    return checked


class _PlainPlan(pc.Controller):
    """A plan that is not the identity object but computes plain attention: the fused path, all of it."""

    def applies_to(self, site):
        return site.kind == "joint"

    def plan(self, site, ctx, plan):
        return AttentionPlan((AttentionTerm(value_scale=torch.ones(ctx.batch_size, 3)),))


class _TextPlan(pc.Controller):
    """A fixed image → text plan at every joint site."""

    def __init__(self, plan):
        self.fixed = plan

    def applies_to(self, site):
        return site.kind == "joint"

    def plan(self, site, ctx, plan):
        return self.fixed


class _Inject(pc.Controller):
    """Self injection: the image → image logits of ``rows`` (it acts on joint sites seen as self-attention)."""

    def __init__(self, rows):
        self.rows = rows

    def applies_to(self, site):
        return site.kind in ("joint", "self")

    def plan(self, site, ctx, plan):
        return AttentionPlan((AttentionTerm(qk_rows=self.rows),))


class _Grab(pc.Controller):
    def __init__(self, joint_norm="joint"):
        self.joint_norm, self.maps, self.plans = joint_norm, {}, []

    def applies_to(self, site):
        return site.kind == "joint"

    def wants_probs(self, site, ctx):
        return True

    def record(self, site, ctx, probs, plan):
        self.maps.setdefault(site.module_path, []).append(probs.clone())
        self.plans.append(plan)


# ---- 1. pass-through equals the stock processor -------------------------------------------------------------
@pytest.mark.parametrize("call", ["distilled", "true_cfg"])
def test_pass_through_record_and_a_neutral_plan_equal_stock_on_the_tiny_flux_pipeline(flux, call):
    extra = TRUE_CFG if call == "true_cfg" else {}

    def run():
        g = torch.Generator().manual_seed(1)
        return flux(["a red circle", "a blue square"], generator=g, **RUN, **extra).images  # (2, 96, 16)

    stock = run()
    before = _processors(flux.transformer)
    for controller in (pc.PassThrough(), pc.AttentionStore(), _PlainPlan()):
        with pc.control(flux, controller) as session:
            assert set(_processors(flux.transformer).values()) == {ControlledFluxAttnProcessor}
            controlled = run()
            assert session.context.index == RUN["num_inference_steps"] - 1  # the uncond call counts no step
            assert session.context.layout.size == 2 and session.context.layout.uncond_rows == ()
            assert session.run.prompts == ["a red circle", "a blue square"]
            assert session.run.negative_prompts == (["blur"] if extra else None)
        torch.testing.assert_close(controlled, stock, atol=1e-5, rtol=0)
    assert _processors(flux.transformer) == before == {k: FluxAttnProcessor for k in before}
    assert "cache_context" not in vars(flux.transformer) and "set_timesteps" not in vars(flux.scheduler)
    assert not flux.transformer._forward_pre_hooks and not flux.transformer._forward_hooks


def test_pass_through_equals_stock_with_fused_projections_and_no_guidance_embedding():
    model = tiny_flux_transformer(guidance=False)
    model.fuse_qkv_projections()
    assert model.transformer_blocks[0].attn.fused_projections
    inputs = _inputs(model, 2, grid=(4, 6), text=5)
    with torch.no_grad():
        stock = model(**inputs).sample
        with pc.control(model, _PlainPlan()):
            planned = model(**inputs).sample
        with pc.control(model, pc.PassThrough()):
            passed = model(**inputs).sample
    torch.testing.assert_close(passed, stock, atol=1e-5, rtol=0)
    torch.testing.assert_close(planned, stock, atol=1e-5, rtol=0)


# ---- 2. maps ------------------------------------------------------------------------------------------------
def test_recorded_maps_are_image_queries_by_text_keys_of_the_explicit_softmax_in_both_block_kinds():
    model = tiny_flux_transformer()
    text = 7
    inputs = _inputs(model, 2, grid=(3, 5), text=text)
    joint, renormalised = _Grab("joint"), _Grab("text")
    with torch.no_grad(), captured(model) as calls, pc.control(model, joint, renormalised):
        model(**inputs)
    modules = dict(model.named_modules())
    assert sorted(joint.maps) == sorted(calls) and any("single" in name for name in calls)
    for name, maps in joint.maps.items():
        hidden, context, rotary, _ = calls[name][0]
        with torch.no_grad():
            q, k, _ = flux_qkv(modules[name], hidden, context, rotary)
        logits = q[:, :, text:] @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # image queries × [text | image]
        assert maps[0].shape == (2, model.config.num_attention_heads, 3 * 5, text)
        torch.testing.assert_close(maps[0], softmax_rows(logits)[..., :text], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(renormalised.maps[name][0], softmax_rows(logits[..., :text]), atol=1e-6, rtol=1e-5)


def test_trace_on_flux_gives_t5_word_maps_on_the_token_grid(flux):
    with pc.trace(flux) as tr:
        flux(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0), **RUN, **TRUE_CFG)
    maps = tr.heatmaps(1)
    assert maps.words == ["a", "blue", "square"]  # T5 words; the end token and padding are no words
    square = maps["square"].to_tensor()
    assert tuple(square.shape) == (RUN["height"], RUN["width"]) and torch.isfinite(square).all()
    run = tr.store.runs[0]
    key = "single_transformer_blocks.1.attn.processor"
    assert run.grids[key] == (8, 12)  # 32×48 pixels: a 16×24 latent packed 2×2
    assert run.counts[key] == RUN["num_inference_steps"] * 2  # heads × steps: the uncond calls record nothing
    assert run.num_tokens == MAX_SEQUENCE_LENGTH


# ---- 3. weights ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["equalizer", "renormalised"])
def test_weights_on_both_block_kinds_equal_the_explicit_reference(kind):
    """Equalizer: image queries give the weighted keys w × their probability (not renormalised), in every block;
    renormalised: logit bias log w on those keys. Text queries untouched."""
    model = tiny_flux_transformer()
    text, batch = 6, 2
    weights = torch.ones(batch, text)
    weights[1, 2], weights[0, 4] = 1.7, 0.4
    term = AttentionTerm(value_scale=weights) if kind == "equalizer" else AttentionTerm(logit_bias=weights.log())
    with torch.no_grad(), captured(model) as calls, pc.control(model, _TextPlan(AttentionPlan((term,)))):
        model(**_inputs(model, batch, grid=(4, 3), text=text))

    def reference(step, q, k, v, n):
        terms = [(None, weights, None)] if kind == "equalizer" else [(None, None, weights.log())]
        return explicit_attention(q, k, v, n, terms)

    assert check_calls(model, calls, text, reference) == 4  # 2 double + 2 single blocks


def test_word_weights_land_on_the_t5_tokens_of_the_word(flux):
    grab = _Grab()
    with pc.control(flux, pc.Reweight({"circle": 2.0}), grab) as session:
        flux("a red circle", generator=torch.Generator().manual_seed(0), **RUN)
    assert session.tokenizer is flux.tokenizer_2
    positions = tokenize(flux.tokenizer_2, "a red circle").positions("circle")
    scale = grab.plans[0].terms[0].value_scale[0]  # (K,) over the T5 sequence
    expected = torch.ones(MAX_SEQUENCE_LENGTH)
    expected[positions] = 2.0
    assert positions and torch.equal(scale.float(), expected)


def test_generate_with_weight_syntax_equals_the_word_weights_on_flux(flux):
    run = {**RUN, "output_type": "np"}
    weighted = pc.generate(flux, "a (circle:1.6) here", seed=0, **run)
    with pc.control(flux, pc.Reweight({"circle": 1.6})):
        expected = flux("a circle here", generator=torch.Generator().manual_seed(0), **run).images
    torch.testing.assert_close(torch.as_tensor(weighted), torch.as_tensor(expected))


def test_prompt_editing_syntax_on_flux_is_refused_clearly(flux):
    with pytest.raises(NotImplementedError, match=r"prompt editing.*FluxPipeline.*weights work"):
        pc.generate(flux, "a [red:blue:0.5] circle", seed=0, **RUN)


# ---- 4. edits -----------------------------------------------------------------------------------------------
def test_replace_refine_and_self_injection_on_both_block_kinds_equal_the_explicit_reference():
    model = tiny_flux_transformer()
    text, batch = 5, 3
    g = torch.Generator().manual_seed(3)
    source = torch.tensor([0, 0, 2])  # row 1 edits row 0; row 2 keeps its own
    mapping = torch.softmax(torch.randn(batch, text, text, generator=g), -1)
    alpha = torch.rand(batch, text, generator=g)
    inputs = _inputs(model, batch, grid=(3, 4), text=text)
    cases = {
        "replace, cross from the source, self from the edit": (
            AttentionPlan((AttentionTerm(qk_rows=source, value_map=mapping),)), None, [(mapping, None, None)]),
        "replace with self injection": (
            AttentionPlan((AttentionTerm(qk_rows=source, value_map=mapping),)), source, [(mapping, None, None)]),
        "refine, two terms": (
            AttentionPlan((AttentionTerm(qk_rows=source, value_map=mapping, value_scale=alpha),
                           AttentionTerm(value_scale=1 - alpha))), None,
            [(mapping, alpha, None), (None, 1 - alpha, None)]),
        "self injection alone": (AttentionPlan(), source, [(None, None, None)]),
    }
    for name, (plan, image_rows, terms) in cases.items():
        text_rows = source if plan.terms[0].qk_rows is not None else None
        controllers = [_TextPlan(plan)] + ([] if image_rows is None else [_Inject(image_rows)])
        with torch.no_grad(), captured(model) as calls, pc.control(model, *controllers):
            model(**inputs)

        def reference(step, q, k, v, n):
            return explicit_attention(q, k, v, n, terms, text_rows=text_rows, image_rows=image_rows)

        assert check_calls(model, calls, text, reference) == 4, name


def test_edit_on_flux_equals_cross_from_the_source_and_self_injection_reference(flux):
    steps = 5
    tokens = [tokenize(flux.tokenizer_2, p).input_ids for p in ("a red car", "a blue car")]
    assert len(tokens[0]) == len(tokens[1])  # one token each: the word swap's token map is the identity
    noise = torch.randn(1, 96, 16, generator=torch.Generator().manual_seed(0)).repeat(2, 1, 1)
    with captured(flux.transformer) as calls:
        out = pc.edit(flux, "a red car", "a blue car", cross_steps=0.8, self_steps=0.4, latents=noise,
                      **{**RUN, "num_inference_steps": steps})
    cross, inject = window(0.8, "cross_steps"), window(0.4, "self_steps")
    own, to_source = torch.arange(2), torch.tensor([0, 0])

    def reference(step, q, k, v, n):
        image_rows = to_source if inject.contains(step, steps) else own
        text_rows = to_source if cross.contains(step, steps) else own
        return explicit_attention(q, k, v, n, text_rows=text_rows, image_rows=image_rows)

    assert check_calls(flux.transformer, calls, MAX_SEQUENCE_LENGTH, reference) == steps * 4
    assert not torch.allclose(out.images[0], out.images[1])


def test_edit_on_flux_draws_the_pipelines_own_packed_noise_from_the_seed(flux):
    """pc.edit(seed=) on Flux starts every prompt from the noise FluxPipeline itself draws from that seed (packed
    2×2 patches), so the source image is the plain pipeline's image."""
    height, width = RUN["height"], RUN["width"]
    channels = flux.transformer.config.in_channels // 4
    noise, _ = flux.prepare_latents(1, channels, height, width, torch.float32, torch.device("cpu"),
                                    torch.Generator().manual_seed(7))
    out = pc.edit(flux, "a red car", "a blue car", seed=7, **RUN)
    plain = flux("a red car", latents=noise, **RUN).images
    torch.testing.assert_close(torch.as_tensor(out.images[0]), plain[0], atol=1e-5, rtol=0)


# ---- 5. what is refused -------------------------------------------------------------------------------------
def test_flux2_attention_is_refused_by_name_naming_what_is_supported_and_installs_nothing():
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel(
        in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2),
    )
    before = _processors(model)
    with pytest.raises(NotImplementedError, match=r"Flux 2 \(Flux2Transformer2DModel\).*Flux2.*Processor.*"
                                                  r"supported are.*Flux\.1.*sites="):
        with pc.control(model, pc.AttentionStore()):
            pass
    assert _processors(model) == before
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_flux3_attention_is_refused_by_name_naming_what_is_supported():
    from diffusers import Flux3Transformer2DModel

    model = Flux3Transformer2DModel(
        in_channels=8, cond_in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, timestep_channels=16, axes_dims_rope=(2, 2, 2, 2),
    )
    before = _processors(model)
    with pytest.raises(NotImplementedError, match=r"Flux 3 \(transformer_flux3.py\).*Flux3AttnProcessor.*"
                                                  r"supported are.*Flux\.1"):
        with pc.control(model, pc.AttentionStore()):
            pass
    assert _processors(model) == before and not model._forward_pre_hooks


def test_an_attention_mask_with_a_plan_is_refused_clearly():
    model = tiny_flux_transformer(double=1, single=0)
    inputs = _inputs(model, 1, text=4)
    attn = model.transformer_blocks[0].attn
    hidden, context = torch.randn(1, 15, 16), torch.randn(1, 4, 16)
    rotary = model.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]]))
    with pc.control(model, _PlainPlan()) as session, torch.no_grad():
        session.context = _context()  # as the transformer's pre-hook sets it
        with pytest.raises(NotImplementedError, match="attention mask.*call without one, or exclude the site"):
            attn(hidden, context, attention_mask=torch.ones(1, 1, 19, 19, dtype=torch.bool), image_rotary_emb=rotary)


def _one_row():
    from promptcontrol.context import BatchLayout

    return BatchLayout(cond_rows=(0,), uncond_rows=(), prompt_of_row=(0,), image_of_row=(0,))


def _context():
    from promptcontrol.context import StepContext

    return StepContext(0, 1.0, 1, (6, 10), _one_row(), text_length=4)
