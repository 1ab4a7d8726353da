"""Tiny offline pipelines for tests and examples: SD 1.x, SD 2.x and SDXL architectures, seeded, no network.

They use the real CLIP tokenizer (the package's own copy) with small random text encoders, VAEs and UNets,
so word↔token alignment is real while a 32×32 image takes milliseconds. Their pictures are noise: use
:func:`promptcontrol.load_pipeline` for a model that draws what it is told.

``tiny_pipeline("sd15" | "sd15-deep" | "sd21" | "sdxl")``:

* ``sd15``: conv-projection transformers, one head count everywhere (``attention_head_dim`` = heads, as SD 1.x),
  cross-attention at two levels;
* ``sd15-deep``: SD 1.5's own layout scaled down: four levels (three cross-attention down blocks and a plain one,
  a plain up block and three cross-attention ones, cross-attention in the middle block), so "the two coarsest
  levels" (the middle block's and the one above it) are not every level, as at 512² on SD 1.5;
* ``sd21``: linear projections, per-block head counts, ``upcast_attention=True``;
* ``sdxl``: two text encoders (the second with projection), ``text_time`` added embedding, stacked
  transformer blocks (``transformer_layers_per_block=(1, 2)``).
"""

from __future__ import annotations

from pathlib import Path

import torch

TOKENIZER_DIR = Path(__file__).parent / "assets" / "toy-sd" / "tokenizer"
KINDS = ("sd15", "sd15-deep", "sd21", "sdxl")


def clip_tokenizer():
    """The real CLIP ViT-L/14 tokenizer (SD 1.x), from the package's own copy; works offline."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


def _text_encoder(hidden: int, *, projection: int | None = None, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_act="gelu",
        projection_dim=projection or hidden,
    )
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ).eval()


def _sd15_layout(common: dict) -> dict:
    """SD 1.5's block layout (4 levels, the coarsest without attention in its down/up blocks), tiny channels."""
    return {
        **common,
        "block_out_channels": (16, 16, 32, 32),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    }


def tiny_unet(kind: str = "sd15", seed: int = 0):
    """A tiny ``UNet2DConditionModel`` of the given architecture kind (random weights, seeded)."""
    from diffusers import UNet2DConditionModel

    if kind not in KINDS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; choose one of {', '.join(KINDS)}")
    common = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
        cross_attention_dim=32,
    )
    torch.manual_seed(seed)
    if kind == "sd15":
        unet = UNet2DConditionModel(**common, attention_head_dim=2)
    elif kind == "sd15-deep":
        unet = UNet2DConditionModel(**_sd15_layout(common), attention_head_dim=2)
    elif kind == "sd21":
        unet = UNet2DConditionModel(**common, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)
    else:
        unet = UNet2DConditionModel(
            **common,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + 16,
        )
    return unet.eval()


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_pipeline(kind: str = "sd15", seed: int = 0, device: str | torch.device = "cpu"):
    """A tiny pipeline of the given kind (``"sd15"``, ``"sd15-deep"``, ``"sd21"``, ``"sdxl"``), built offline.

    Output images are 32×32 by default (latent 16×16); height and width: any multiple of 8 (the pipelines check it).
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    unet = tiny_unet(kind, seed)
    tokenizer = clip_tokenizer()
    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=_vae(seed + 1),
            text_encoder=_text_encoder(16, seed=seed + 2),
            text_encoder_2=_text_encoder(16, projection=16, seed=seed + 3),
            tokenizer=tokenizer,
            tokenizer_2=clip_tokenizer(),
            unet=unet,
            scheduler=_scheduler(),
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=_vae(seed + 1),
            text_encoder=_text_encoder(32, seed=seed + 2),
            tokenizer=tokenizer,
            unet=unet,
            scheduler=_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
