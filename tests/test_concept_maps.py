"""Concept maps (ConceptAttention) on SD3: the image is unchanged, and the maps equal a hand-written concept pass
computed here from each block's own weights (concept tokens carried through the text stream of every block,
attending to the image and to themselves, softmax over the concepts of image outputs · concept outputs)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import promptcontrol as pc
from promptcontrol.controllers.concept import ConceptAttention, default_sites, refusal
from promptcontrol.sites import AttentionSite
from promptcontrol.testing_sd3 import tiny_sd3

RUN = dict(height=32, width=48, num_inference_steps=2, max_sequence_length=8, output_type="latent")
PROMPT = "a red circle and a blue square"
CONCEPTS = ["circle", "blue square", "background"]  # "blue square": two tokens, averaged into one concept token


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3(dual=(0,))


def _processors(model):
    return {k: type(v) for k, v in model.attn_processors.items()}


def _call(pipe, guidance, images=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe(PROMPT, guidance_scale=guidance, num_images_per_prompt=images, generator=g, **RUN).images


# ---- the hand-written reference -------------------------------------------------------------------------------
def _heads(x, heads):
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2).double()  # (B, heads, n, d)


def _attend(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v


def reference_concept_features(pipe, concepts):
    """Each concept's own CLIP-segment word-token features, averaged (C, D_text)."""
    rows = []
    for concept in concepts:
        ids = pipe.tokenizer(concept).input_ids  # [start, words..., end]
        embeds = pipe.encode_prompt(concept, None, None, do_classifier_free_guidance=False)[0][0]
        rows.append(embeds[1 : len(ids) - 1].mean(dim=0))
    return torch.stack(rows)


@contextlib.contextmanager
def block_inputs(model):
    """(hidden_states, encoder_hidden_states, temb) of every block call, per block, in call order."""
    calls = {i: [] for i in range(len(model.transformer_blocks))}
    handles = []
    for i, block in enumerate(model.transformer_blocks):
        def pre(mod, args, kwargs, i=i):
            calls[i].append((kwargs["hidden_states"], kwargs["encoder_hidden_states"], kwargs["temb"]))
        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def concept_block(block, hidden, text, concepts, temb):
    """One block for the concept stream: (image outputs (B, heads, Q, d), concept outputs, next concept stream)."""
    attn, h = block.attn, block.attn.heads
    n_img = block.norm1(hidden, emb=temb)[0]
    if block.context_pre_only:
        n_txt, n_c = block.norm1_context(text, temb), block.norm1_context(concepts, temb)
    else:
        n_txt = block.norm1_context(text, emb=temb)[0]
        n_c, gate, shift, scale, gate_mlp = block.norm1_context(concepts, emb=temb)
    q, k = attn.norm_q(_heads(attn.to_q(n_img), h)), attn.norm_k(_heads(attn.to_k(n_img), h))
    v = _heads(attn.to_v(n_img), h)

    def text_side(x):
        return (attn.norm_added_q(_heads(attn.add_q_proj(x), h)), attn.norm_added_k(_heads(attn.add_k_proj(x), h)),
                _heads(attn.add_v_proj(x), h))

    qt, kt, vt = text_side(n_txt)
    qc, kc, vc = text_side(n_c)
    image_out = _attend(q, torch.cat([k, kt], 2), torch.cat([v, vt], 2))  # image queries: image + prompt keys
    concept_out = _attend(qc, torch.cat([k, kc], 2), torch.cat([v, vc], 2))  # concepts: image + concept keys
    if block.context_pre_only:
        return image_out, concept_out, None
    merged = concept_out.transpose(1, 2).reshape(concepts.shape[0], -1, h * concept_out.shape[-1]).float()
    concepts = concepts + gate[:, None] * attn.to_add_out(merged)
    normed = block.norm2_context(concepts) * (1 + scale[:, None]) + shift[:, None]
    return image_out, concept_out, concepts + gate_mlp[:, None] * block.ff_context(normed)


def reference_maps(pipe, calls, features, rows, blocks, steps, softmax):
    """Mean over ``blocks`` × ``steps`` of softmax_c(image outputs · concept outputs), per row in ``rows``:
    (len(rows), C, h, w)."""
    model = pipe.transformer
    total, count = 0, 0
    with torch.no_grad():
        for step in range(len(calls[0])):
            temb = calls[0][step][2]
            stream = model.context_embedder(features)[None].expand(temb.shape[0], -1, -1)  # (B, C, D)
            for index, block in enumerate(model.transformer_blocks):
                hidden, text, temb = calls[index][step]
                image_out, concept_out, stream = concept_block(block, hidden, text, stream, temb)
                if index in blocks and step in steps:
                    scores = torch.einsum("bhqd,bhcd->bqc", image_out[rows], concept_out[rows])
                    total = total + (scores.softmax(dim=-1) if softmax else scores)
                    count += 1
    mean = (total / count).float()  # (N, Q, C)
    h, w = RUN["height"] // 4, RUN["width"] // 4  # vae factor 2, patch 2
    return mean.transpose(1, 2).reshape(len(rows), -1, h, w)


CASES = [  # guidance, images per prompt, ConceptAttention options, reference blocks, steps
    (5.0, 2, {}, (0, 1, 2), (0, 1)),
    (1.0, 1, dict(softmax=False, sites="transformer_blocks.2.attn", steps=[1]), (2,), (1,)),  # last block: pre-only
]


@pytest.mark.parametrize("guidance, images, options, blocks, steps", CASES)
def test_concept_maps_equal_a_hand_written_concept_pass(sd3, guidance, images, options, blocks, steps):
    with block_inputs(sd3.transformer) as calls:
        stock = _call(sd3, guidance, images)
    controller = ConceptAttention(CONCEPTS, **options)
    with pc.trace(sd3, concepts=controller) as tr:
        traced = _call(sd3, guidance, images)
    torch.testing.assert_close(traced, stock, atol=1e-5, rtol=0)
    rows = list(range(images, 2 * images)) if guidance > 1 else list(range(images))  # [uncond | cond]: cond rows
    features = reference_concept_features(sd3, CONCEPTS)
    expected = reference_maps(sd3, calls, features, rows, blocks, steps, options.get("softmax", True))
    for image in range(images):
        torch.testing.assert_close(tr.concepts.grid_maps(image), expected[image], atol=2e-5, rtol=1e-4)
    assert tr.concept_maps().concepts == CONCEPTS


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_image_with_concepts_equals_the_image_without(sd3, guidance):
    before = _processors(sd3.transformer)
    stock = _call(sd3, guidance)
    with pc.trace(sd3, concepts=CONCEPTS) as tr:
        traced = _call(sd3, guidance)
    torch.testing.assert_close(traced, stock, atol=1e-5, rtol=0)
    assert _processors(sd3.transformer) == before
    assert tr.concepts.features.shape[0] == len(CONCEPTS)


def test_concept_maps_face_matches_heatmaps(sd3):
    with pc.trace(sd3, concepts=CONCEPTS) as tr:
        _call(sd3, 5.0)
    cmaps = tr.concept_maps()
    assert set(cmaps) == set(CONCEPTS) and "circle" in cmaps
    circle = cmaps["circle"]
    assert tuple(circle.shape) == (32, 48)  # the image's pixel size, as tr.heatmaps()
    total = cmaps.raw().sum(dim=0)  # softmax over concepts: every pixel's maps sum to 1 (bicubic clamps at 0)
    assert torch.allclose(cmaps.grid_maps.sum(dim=0), torch.ones(8, 12), atol=1e-5) and total.max() < 1.2
    assert cmaps.to_tensor().shape == (3, 32, 48) and cmaps.segmentation().shape == (32, 48)
    picture = cmaps.grid(torch.rand(3, 32, 48))
    assert picture.size[0] > 48
    assert cmaps.concept("circle", normalize="word").tensor.max() == pytest.approx(1.0)
    only = tr.concept_maps(concepts=["background"])
    torch.testing.assert_close(only.grid_maps[0], cmaps.grid_maps[2])
    with pytest.raises(KeyError, match="not traced"):
        tr.concept_maps(concepts=["dog"])
    with pytest.raises(KeyError, match="not a traced concept"):
        cmaps["dog"]


def test_sites_chosen_after_the_run_equal_sites_chosen_when_recording(sd3):
    with pc.trace(sd3, concepts=CONCEPTS) as every:
        _call(sd3, 1.0)
    with pc.trace(sd3, concepts=ConceptAttention(CONCEPTS, sites={"blocks": [1, 2]})) as some:
        _call(sd3, 1.0)
    torch.testing.assert_close(every.concept_maps(sites={"blocks": [1, 2]}).grid_maps, some.concept_maps().grid_maps)
    assert not torch.allclose(every.concept_maps().grid_maps, some.concept_maps().grid_maps)


def test_record_and_concepts_together_give_the_maps_of_record_alone(sd3):
    with pc.trace(sd3) as plain:
        _call(sd3, 5.0)
    with pc.trace(sd3, concepts=CONCEPTS) as both:
        _call(sd3, 5.0)
    for word in ("circle", "square", "red"):
        expected = plain.heatmaps(normalize=None)[word].tensor
        torch.testing.assert_close(both.heatmaps(normalize=None)[word].tensor, expected, atol=1e-6, rtol=1e-5)


def test_weights_and_concepts_together_give_the_image_of_weights_alone(sd3):
    stock = _call(sd3, 5.0)
    with pc.control(sd3, pc.Reweight({"circle": 3.0})):
        weighted = _call(sd3, 5.0)
    with pc.trace(sd3, pc.Reweight({"circle": 3.0}), concepts=CONCEPTS) as tr:
        both = _call(sd3, 5.0)
    assert (weighted - stock).abs().max() > 1e-4  # the weight acts
    torch.testing.assert_close(both, weighted, atol=1e-5, rtol=0)
    assert tr.concept_maps()["circle"].tensor.shape == (32, 48)


def test_unet_and_pixart_are_refused_with_a_pointer_to_heatmaps():
    from promptcontrol.testing import tiny_pipeline
    from promptcontrol.testing_dit import tiny_pixart

    for pipe in (tiny_pipeline(), tiny_pixart()):
        model = getattr(pipe, "unet", None) or pipe.transformer
        before = _processors(model)
        with pytest.raises(NotImplementedError, match=r"joint attention.*tr\.heatmaps\(\)"):
            with pc.trace(pipe, concepts=["circle"]):
                pass
        assert _processors(model) == before


def _site(block, stream, text_keys):
    prefix = "single_transformer_blocks" if stream == "single" else "transformer_blocks"
    return AttentionSite(f"{prefix}.{block}.attn.processor", "joint", "transformer", block, 0, 0, 1, 2, stream,
                         text_keys, 2)


def test_flux1_and_sd3_layouts_are_accepted_flux2_flux3_and_mixed_layouts_refused():
    flux = [_site(0, "double", "before"), _site(0, "single", "before")]
    sd3 = [_site(0, "double", "after")]
    assert refusal(flux, "FluxTransformer2DModel") is None
    assert refusal(sd3, "SD3Transformer2DModel") is None
    for name, model in (("Flux2Transformer2DModel", "Flux 2"), ("Flux3Transformer2DModel", "Flux 3")):
        assert model in refusal(flux, name) and "FluxPipeline" in refusal(flux, name)
    assert "neither SD3's" in refusal(flux + sd3, "Mixed")


def test_flux_default_sites_are_the_last_four_double_stream_blocks():
    sites = [_site(b, "double", "before") for b in range(6)] + [_site(b, "single", "before") for b in range(3)]
    chosen = default_sites(sites, "flux")
    assert [(s.stream, s.block) for s in chosen] == [("double", b) for b in (2, 3, 4, 5)]
    few = [_site(b, "double", "before") for b in range(2)] + [_site(0, "single", "before")]
    assert [(s.stream, s.block) for s in default_sites(few, "flux")] == [("double", 0), ("double", 1)]
    sd3 = [_site(b, "double", "after") for b in range(6)]
    assert default_sites(sd3, "sd3") == sd3


@pytest.mark.parametrize(
    "concepts, error, message",
    [
        ([], ValueError, "empty"),
        ("circle", TypeError, r"write \['circle'\]"),
        (["circle", 3], TypeError, "must be a str"),
        (["circle", " Circle "], ValueError, "given twice"),
        (["circle", "  "], ValueError, "empty strings"),
    ],
)
def test_bad_concepts_are_refused_before_anything_is_installed(sd3, concepts, error, message):
    before = _processors(sd3.transformer)
    with pytest.raises(error, match=message):
        pc.trace(sd3, concepts=concepts)
    assert _processors(sd3.transformer) == before


def test_a_failing_install_leaves_nothing_installed(sd3):
    before = _processors(sd3.transformer)
    with pytest.raises(ValueError, match="selects no joint-attention site"):
        with pc.trace(sd3, concepts=ConceptAttention(["circle"], sites="transformer_blocks.9.attn")):
            pass
    assert _processors(sd3.transformer) == before
    assert not hasattr(sd3.transformer, "_promptcontrol_session_active")


def test_concept_maps_without_concepts_say_how_to_get_them(sd3):
    with pc.trace(sd3) as tr:
        _call(sd3, 1.0)
    with pytest.raises(ValueError, match="concepts="):
        tr.concept_maps()


# ---- Flux.1 ---------------------------------------------------------------------------------------------------
# The same claims on FluxPipeline: [prompt | concepts | image] in double- and single-stream blocks, the concepts'
# rotary positions zeros (as the text's), the reference below written from each block's own weights.
FLUX_RUN = dict(height=32, width=48, num_inference_steps=2, output_type="latent")
TRUE_CFG = dict(negative_prompt="blur", true_cfg_scale=2.0)


@pytest.fixture(scope="module")
def flux():
    from promptcontrol.testing_flux import tiny_flux

    return tiny_flux()


def _flux_call(pipe, true_cfg, images=1, seed=0):
    from promptcontrol.testing_flux import MAX_SEQUENCE_LENGTH

    g = torch.Generator().manual_seed(seed)
    extra = TRUE_CFG if true_cfg else {}
    return pipe(PROMPT, num_images_per_prompt=images, generator=g, max_sequence_length=MAX_SEQUENCE_LENGTH,
                **FLUX_RUN, **extra).images


def reference_flux_features(pipe, concepts):
    """Each concept's own T5 word-token features (the tokens before ``</s>``), averaged (C, D_text)."""
    from promptcontrol.testing_flux import MAX_SEQUENCE_LENGTH

    rows = []
    for concept in concepts:
        ids = pipe.tokenizer_2(concept).input_ids  # [words..., </s>]
        embeds = pipe.encode_prompt(concept, None, max_sequence_length=MAX_SEQUENCE_LENGTH)[0][0]
        rows.append(embeds[: len(ids) - 1].mean(dim=0))
    return torch.stack(rows)


@contextlib.contextmanager
def flux_block_inputs(model):
    """(hidden_states, encoder_hidden_states, temb, rotary) of every block call, per (stream, block), in order."""
    blocks = [(("double", i), b) for i, b in enumerate(model.transformer_blocks)]
    blocks += [(("single", i), b) for i, b in enumerate(model.single_transformer_blocks)]
    calls = {name: [] for name, _ in blocks}
    handles = []
    for name, block in blocks:
        def pre(mod, args, kwargs, name=name):
            calls[name].append(tuple(kwargs[k] for k in ("hidden_states", "encoder_hidden_states", "temb",
                                                         "image_rotary_emb")))
        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _rope(x, rotary):  # x (B, n, heads, d), rotary (cos, sin) each (n, d)
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, rotary, sequence_dim=1)


def _flux_heads(attn, x):
    return x.unflatten(-1, (-1, attn.head_dim))  # (B, n, heads, d)


def _bhnd(x):
    return x.transpose(1, 2).double()  # (B, heads, n, d)


def flux_double_concept_block(block, hidden, text, concepts, temb, rotary, concept_rotary):
    """A double-stream block for the concept stream: (image outputs, concept outputs (B, heads, n, d), next
    concept stream)."""
    attn, k_txt_len = block.attn, text.shape[1]
    cos, sin = rotary
    r_txt, r_img = (cos[:k_txt_len], sin[:k_txt_len]), (cos[k_txt_len:], sin[k_txt_len:])
    n_img = block.norm1(hidden, emb=temb)[0]
    n_txt = block.norm1_context(text, emb=temb)[0]
    n_c, gate, shift, scale, gate_mlp = block.norm1_context(concepts, emb=temb)
    q = _bhnd(_rope(attn.norm_q(_flux_heads(attn, attn.to_q(n_img))), r_img))
    k = _bhnd(_rope(attn.norm_k(_flux_heads(attn, attn.to_k(n_img))), r_img))
    v = _bhnd(_flux_heads(attn, attn.to_v(n_img)))

    def text_side(x, r):
        return (_bhnd(_rope(attn.norm_added_q(_flux_heads(attn, attn.add_q_proj(x))), r)),
                _bhnd(_rope(attn.norm_added_k(_flux_heads(attn, attn.add_k_proj(x))), r)),
                _bhnd(_flux_heads(attn, attn.add_v_proj(x))))

    qt, kt, vt = text_side(n_txt, r_txt)
    qc, kc, vc = text_side(n_c, concept_rotary)
    image_out = _attend(q, torch.cat([kt, k], 2), torch.cat([vt, v], 2))  # image queries: prompt + image keys
    concept_out = _attend(qc, torch.cat([kc, k], 2), torch.cat([vc, v], 2))  # concepts: concepts + image keys
    merged = concept_out.transpose(1, 2).flatten(2).float()
    concepts = concepts + gate[:, None] * attn.to_add_out(merged)
    normed = block.norm2_context(concepts) * (1 + scale[:, None]) + shift[:, None]
    return image_out, concept_out, concepts + gate_mlp[:, None] * block.ff_context(normed)


def flux_single_concept_block(block, hidden, text, concepts, temb, rotary, concept_rotary):
    """A single-stream block for the concept stream (its one ``[text | image]`` sequence, concepts beside it)."""
    attn, k_txt_len = block.attn, text.shape[1]
    n_x = block.norm(torch.cat([text, hidden], 1), emb=temb)[0]
    n_c, gate = block.norm(concepts, emb=temb)

    def qkv(x, r):
        return (_bhnd(_rope(attn.norm_q(_flux_heads(attn, attn.to_q(x))), r)),
                _bhnd(_rope(attn.norm_k(_flux_heads(attn, attn.to_k(x))), r)), _bhnd(_flux_heads(attn, attn.to_v(x))))

    q, k, v = qkv(n_x, rotary)
    qc, kc, vc = qkv(n_c, concept_rotary)
    image_out = _attend(q[:, :, k_txt_len:], k, v)  # image queries over [prompt | image]
    concept_out = _attend(qc, torch.cat([kc, k[:, :, k_txt_len:]], 2), torch.cat([vc, v[:, :, k_txt_len:]], 2))
    merged = concept_out.transpose(1, 2).flatten(2).float()
    projected = block.proj_out(torch.cat([merged, block.act_mlp(block.proj_mlp(n_c))], dim=2))
    return image_out, concept_out, concepts + gate[:, None] * projected


def reference_flux_maps(pipe, calls, features, sites, steps, softmax, calls_per_step):
    """Mean over ``sites`` ((stream, block) pairs) × ``steps`` of softmax_c(image outputs · concept outputs), every
    row of the conditional call: (B, C, h, w)."""
    model = pipe.transformer
    concept_rotary = model.pos_embed(torch.zeros(features.shape[0], 3))  # the concepts' txt_ids: zeros
    order = [("double", i) for i in range(len(model.transformer_blocks))]
    order += [("single", i) for i in range(len(model.single_transformer_blocks))]
    total, count = 0, 0
    with torch.no_grad():
        for step in range(len(calls[order[0]]) // calls_per_step):
            call = step * calls_per_step  # the conditional call (true CFG: the negative prompt's comes second)
            batch = calls[order[0]][call][0].shape[0]
            stream = model.context_embedder(features)[None].expand(batch, -1, -1)  # (B, C, D)
            for name in order:
                hidden, text, temb, rotary = calls[name][call]
                run_block = flux_double_concept_block if name[0] == "double" else flux_single_concept_block
                block = (model.transformer_blocks if name[0] == "double" else model.single_transformer_blocks)[name[1]]
                image_out, concept_out, stream = run_block(block, hidden, text, stream, temb, rotary, concept_rotary)
                if name in sites and step in steps:
                    scores = torch.einsum("bhqd,bhcd->bqc", image_out, concept_out)
                    total = total + (scores.softmax(dim=-1) if softmax else scores)
                    count += 1
    mean = (total / count).float()  # (B, Q, C)
    h, w = FLUX_RUN["height"] // 4, FLUX_RUN["width"] // 4  # vae factor 2, packed 2x2
    return mean.transpose(1, 2).reshape(mean.shape[0], -1, h, w)


FLUX_CASES = [  # true CFG, images per prompt, ConceptAttention options, reference sites, steps
    (False, 2, {}, (("double", 0), ("double", 1)), (0, 1)),  # default: the last (up to) four double-stream blocks
    (True, 1, dict(sites={"streams": ["single"]}, softmax=False, steps=[1]), (("single", 0), ("single", 1)), (1,)),
    (False, 1, dict(sites=lambda s: True), (("double", 0), ("double", 1), ("single", 0), ("single", 1)), (0, 1)),
]


@pytest.mark.parametrize("true_cfg, images, options, sites, steps", FLUX_CASES)
def test_flux_concept_maps_equal_a_hand_written_concept_pass(flux, true_cfg, images, options, sites, steps):
    with flux_block_inputs(flux.transformer) as calls:
        stock = _flux_call(flux, true_cfg, images)
    controller = ConceptAttention(CONCEPTS, **options)
    with pc.trace(flux, concepts=controller) as tr:
        traced = _flux_call(flux, true_cfg, images)
    torch.testing.assert_close(traced, stock, atol=1e-5, rtol=0)
    features = reference_flux_features(flux, CONCEPTS)
    expected = reference_flux_maps(flux, calls, features, sites, steps, options.get("softmax", True),
                                   2 if true_cfg else 1)
    assert len(tr.concepts.sites) == len(sites)
    for image in range(images):
        torch.testing.assert_close(tr.concepts.grid_maps(image), expected[image], atol=2e-5, rtol=1e-4)
    assert tr.concept_maps().concepts == CONCEPTS and tuple(tr.concept_maps()["circle"].shape) == (32, 48)


@pytest.mark.parametrize("true_cfg", [False, True])
def test_flux_image_with_concepts_equals_the_image_without(flux, true_cfg):
    before = _processors(flux.transformer)
    stock = _flux_call(flux, true_cfg, images=2)
    with pc.trace(flux, pc.Reweight({"circle": 1.0}), concepts=CONCEPTS) as tr:  # a neutral plan: the plan path
        traced = _flux_call(flux, true_cfg, images=2)
    torch.testing.assert_close(traced, stock, atol=1e-5, rtol=0)
    assert _processors(flux.transformer) == before
    assert tr.concepts.features.shape == (len(CONCEPTS), flux.text_encoder_2.config.d_model)


def test_flux_record_and_weights_with_concepts_equal_them_without(flux):
    with pc.trace(flux, pc.Reweight({"circle": 3.0})) as plain:
        weighted = _flux_call(flux, False)
    with pc.trace(flux, pc.Reweight({"circle": 3.0}), concepts=CONCEPTS) as both:
        traced = _flux_call(flux, False)
    assert (weighted - _flux_call(flux, False)).abs().max() > 1e-4  # the weight acts
    torch.testing.assert_close(traced, weighted, atol=1e-5, rtol=0)
    for word in ("circle", "square"):
        expected = plain.heatmaps(normalize=None)[word].tensor
        torch.testing.assert_close(both.heatmaps(normalize=None)[word].tensor, expected, atol=1e-6, rtol=1e-5)


def test_flux_concepts_extend_txt_ids_with_zero_positions(flux):
    from promptcontrol.testing_flux import MAX_SEQUENCE_LENGTH

    model, seen = flux.transformer, {}

    def ids_in(mod, args):
        seen.setdefault("ids", args[0])  # (K + C + Q, 3): the transformer's cat(txt_ids, img_ids)

    def text_in(mod, args, kwargs):
        seen.setdefault("text", kwargs["encoder_hidden_states"].shape[1])

    hooks = [model.pos_embed.register_forward_pre_hook(ids_in),
             model.transformer_blocks[0].register_forward_pre_hook(text_in, with_kwargs=True)]
    try:
        with pc.trace(flux, concepts=CONCEPTS):
            _flux_call(flux, False)
    finally:
        for h in hooks:
            h.remove()
    length = MAX_SEQUENCE_LENGTH + len(CONCEPTS)
    assert seen["text"] == length and seen["ids"].shape == (length + 8 * 12, 3)  # [prompt | concepts | image]
    assert torch.equal(seen["ids"][:length], torch.zeros(length, 3))  # the concepts' positions are the text's


def test_flux_bare_transformer_is_refused_and_installs_nothing(flux):
    before = _processors(flux.transformer)
    with pytest.raises(ValueError, match="FluxPipeline"):
        with pc.trace(flux.transformer, concepts=["circle"]):
            pass
    assert _processors(flux.transformer) == before


def test_flux2_is_refused_for_concepts_at_install_and_installs_nothing():
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel(
        in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2),
    )
    before = _processors(model)
    with pytest.raises(NotImplementedError, match=r"Flux2Transformer2DModel \(Flux 2 / Flux 3\).*Flux\.1"):
        with pc.trace(model, concepts=["circle"]):
            pass
    assert _processors(model) == before
    assert not model._forward_pre_hooks and not model._forward_hooks
