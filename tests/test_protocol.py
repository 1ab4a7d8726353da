"""The controller protocol beyond plans: recorders get the composed plan, ``transform_inputs`` changes the
denoiser's keyword inputs, ``session.patch`` changes attributes for the session's length — and the sites of
transformer backbones are found (kinds read from each model's config) and refused clearly until supported."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

import promptcontrol as pc
from promptcontrol.session import SessionError


def _processors(model):
    return {key: type(p) for key, p in model.attn_processors.items()}


def _call_unet(pipe, ehs, added=None):
    """One stock UNet call on fixed latents (an independent reference: no session)."""
    torch.manual_seed(0)
    unet = pipe.unet
    sample = torch.randn(ehs.shape[0], unet.config.in_channels, 8, 8)
    kwargs = {} if added is None else {"added_cond_kwargs": added}
    return unet(sample, torch.tensor(500), encoder_hidden_states=ehs, **kwargs).sample


class PlanSpy(pc.Controller):
    """Records the plan each cross site handed to recorders."""

    def __init__(self):
        self.plans = []

    def wants_probs(self, site, ctx):
        return True

    def record(self, site, ctx, probs, plan):
        self.plans.append(plan)


def test_recorders_receive_the_plan_composed_before_them(sd15):
    prompt = "a red car"
    ids = sd15.tokenizer(prompt).input_ids  # [bos, a, red, car, eos]
    red = ids.index(sd15.tokenizer.convert_tokens_to_ids("red</w>"))
    spy = PlanSpy()
    with pc.control(sd15, pc.Reweight({"red": 2.0}), spy):
        sd15(prompt, num_inference_steps=2, guidance_scale=1.0, height=32, width=32, output_type="latent")
    cross = [s for s in pc.find_sites(sd15.unet) if s.is_cross]
    assert len(spy.plans) == 2 * len(cross)
    for plan in spy.plans:
        scale = plan.terms[0].value_scale  # (B, K)
        assert scale is not None, "the recorder saw the identity plan, not Reweight's"
        expected = torch.ones_like(scale)
        expected[:, red] = 2.0
        assert torch.equal(scale, expected)


class LegacyRecorder(pc.Controller):
    def __init__(self):
        self.calls = 0

    def wants_probs(self, site, ctx):
        return True

    def record(self, site, ctx, probs):  # the protocol's older, three-argument form
        self.calls += 1


def test_a_three_argument_recorder_still_works_with_a_deprecation_warning(sd15):
    legacy = LegacyRecorder()
    with pytest.warns(DeprecationWarning, match=r"record\(site, ctx, probs, plan\)"):
        with pc.control(sd15, legacy):
            sd15("a car", num_inference_steps=1, guidance_scale=1.0, height=32, width=32, output_type="latent")
    assert legacy.calls == sum(s.is_cross for s in pc.find_sites(sd15.unet))


class ZeroText(pc.Controller):
    """Replaces the text features through transform_inputs (not transform_context)."""

    def applies_to(self, site):
        return False

    def transform_inputs(self, ctx, inputs):
        return {**inputs, "encoder_hidden_states": torch.zeros_like(inputs["encoder_hidden_states"])}


def test_transform_inputs_changes_what_the_unet_receives(sd15):
    ehs = torch.randn(1, 77, sd15.unet.config.cross_attention_dim)
    expected = _call_unet(sd15, torch.zeros_like(ehs))
    plain = _call_unet(sd15, ehs)
    with pc.control(sd15.unet, ZeroText()):
        got = _call_unet(sd15, ehs)
    assert (plain - expected).abs().max() > 1e-3  # the change is visible at all
    assert (got - expected).abs().max() <= 1e-6


class PooledSwap(pc.Controller):
    def __init__(self, pooled):
        self.pooled = pooled

    def applies_to(self, site):
        return False

    def transform_inputs(self, ctx, inputs):
        added = inputs["added_cond_kwargs"]
        return {**inputs, "added_cond_kwargs": {**added, "text_embeds": self.pooled}}


def test_transform_inputs_reaches_sdxl_added_cond_kwargs(tiny_pipes):
    pipe = tiny_pipes("sdxl")
    unet = pipe.unet
    ehs = torch.randn(1, 77, unet.config.cross_attention_dim)
    pooled_dim = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
    time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])
    before, after = torch.randn(1, pooled_dim), torch.randn(1, pooled_dim)
    expected = _call_unet(pipe, ehs, {"text_embeds": after, "time_ids": time_ids})
    with pc.control(unet, PooledSwap(after)):
        got = _call_unet(pipe, ehs, {"text_embeds": before, "time_ids": time_ids})
    assert (got - expected).abs().max() <= 1e-6
    assert (_call_unet(pipe, ehs, {"text_embeds": before, "time_ids": time_ids}) - expected).abs().max() > 1e-4


class Patcher(pc.Controller):
    def __init__(self, fail_in_bind=False):
        self.fail_in_bind = fail_in_bind

    def applies_to(self, site):
        return False

    def bind(self, session):
        self.new_scheduler = type(session.pipe.scheduler).from_config(session.pipe.scheduler.config)
        session.patch(session.pipe, "scheduler", self.new_scheduler)
        session.patch(session.pipe, "_promptcontrol_test_flag", 1)
        if self.fail_in_bind:
            raise RuntimeError("bind failed after patching")


@pytest.mark.parametrize("how", ["normal", "body raises", "bind raises"])
def test_patch_is_undone_by_the_session(sd15, how):
    scheduler = sd15.scheduler
    assert "_promptcontrol_test_flag" not in vars(sd15)
    patcher = Patcher(fail_in_bind=how == "bind raises")
    with pytest.raises(RuntimeError) if how != "normal" else _nothing():
        with pc.control(sd15, patcher):
            assert sd15.scheduler is patcher.new_scheduler and sd15._promptcontrol_test_flag == 1
            if how == "body raises":
                raise RuntimeError("body")
    assert sd15.scheduler is scheduler
    assert "_promptcontrol_test_flag" not in vars(sd15)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_patch_outside_an_active_session_is_refused(sd15):
    session = pc.control(sd15, pc.PassThrough())
    with pytest.raises(SessionError, match="only while the session"):
        session.patch(sd15, "x", 1)


# ---- transformer backbones: sites found, control refused until supported -----------------------------------------
def _sd3(dual=(0,)):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        dual_attention_layers=dual, qk_norm="rms_norm",
    )


def test_sd3_sites_joint_text_after_image_with_dual_attention_self_sites():
    model = _sd3(dual=(0, 1))
    sites = pc.find_sites(model)
    layers = model.config.num_layers
    joint = [s for s in sites if s.kind == "joint"]
    assert [s.block for s in joint] == list(range(layers))
    assert all(s.text_keys == "after" and s.stream == "double" and s.patch == model.config.patch_size for s in joint)
    selfs = [s for s in sites if s.kind == "self"]  # SD3.5's second attention: image tokens only
    assert [s.block for s in selfs] == list(model.config.dual_attention_layers)
    assert all(s.text_keys is None and s.module_path.endswith("attn2") for s in selfs)


def test_flux_sites_double_and_single_stream_text_first():
    model = _flux()
    sites = pc.find_sites(model)
    streams = [(s.stream, s.block) for s in sites]
    assert streams == [("double", 0), ("double", 1), ("single", 0), ("single", 1), ("single", 2)]
    assert all(s.kind == "joint" and s.text_keys == "before" for s in sites)


def test_pixart_sites_self_and_cross():
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
        cross_attention_dim=16, caption_channels=16,
    )
    kinds = [(s.block, s.module_path.rsplit(".", 1)[1], s.kind, s.text_keys) for s in pc.find_sites(model)]
    assert kinds == [(0, "attn1", "self", None), (0, "attn2", "cross", "all"),
                     (1, "attn1", "self", None), (1, "attn2", "cross", "all")]


def _flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
    )


def test_unet_sites_keep_their_old_fields(sd15):
    site = next(s for s in pc.find_sites(sd15.unet) if s.is_cross)
    assert site.text_keys == "all" and site.stream is None and site.patch == 1 and not site.on_transformer
    assert isinstance(sd15.unet.attn_processors[site.key], AttnProcessor2_0)


def test_a_latent_batch_that_does_not_match_the_prompts_is_named_by_the_session(sd15):
    """Any session (not only a recording one) says what is wrong before a controller reads the rows."""
    latents = torch.randn(3, sd15.unet.config.in_channels, 4, 4)
    before = _processors(sd15.unet)
    with pytest.raises(ValueError, match=r"2 prompt\(s\) × 1 image\(s\) per prompt = 2 image\(s\), but the latents hold 3"):
        with pc.control(sd15, pc.Reweight({"red": 2.0})):
            sd15(["a red car", "a red bus"], latents=latents, num_inference_steps=1, output_type="latent")
    assert _processors(sd15.unet) == before
