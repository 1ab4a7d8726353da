"""A tiny offline SD3 pipeline for tests and examples: the SD3 / SD3.5 architecture, seeded, no network.

``tiny_sd3()`` is a ``StableDiffusion3Pipeline`` with two tiny CLIP text encoders (``CLIPTextModelWithProjection``)
sharing the package's copy of the real CLIP tokenizer, no T5 by default (``text_encoder_3 = tokenizer_3 = None``, a
configuration SD3 supports: its T5 segment is then zeros of ``max_sequence_length`` tokens; ``t5=True`` loads a
tiny ``T5EncoderModel`` with the package's T5-format tokenizer), a tiny
``AutoencoderKL`` with 16 latent channels and a ``FlowMatchEulerDiscreteScheduler``. Its pictures are noise; word ↔
token alignment is real. ``dual`` lists the blocks with SD3.5's second (image-only) attention; qk-norm is on.
"""

from __future__ import annotations

import torch

from .testing import clip_tokenizer

LATENT_CHANNELS = 16


def _clip(hidden: int, projection: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, hidden_act="gelu", projection_dim=projection,
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config).eval()


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=4,
        sample_size=32, scaling_factor=1.5, shift_factor=0.1,
    ).eval()


def tiny_sd3_transformer(
    *, layers: int = 3, dual: tuple[int, ...] = (0,), heads: int = 2, head_dim: int = 8, joint_dim: int = 32,
    pooled_dim: int = 16, in_channels: int = LATENT_CHANNELS, qk_norm: str | None = "rms_norm", seed: int = 0,
):
    """A random SD3 transformer (patch 2, ``qk_norm`` as SD3.5 by default, ``dual`` SD3.5 dual-attention blocks,
    the last block ``context_pre_only``)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=in_channels, out_channels=in_channels, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint_dim,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=pooled_dim, pos_embed_max_size=32,
        dual_attention_layers=tuple(dual), qk_norm=qk_norm,
    ).eval()


def tiny_t5(width: int = 32, seed: int = 4):
    """(``text_encoder_3``, ``tokenizer_3``): a 1-layer random ``T5EncoderModel`` of ``width`` (SD3's
    ``joint_attention_dim``) and the package's tiny T5-format tokenizer (offline)."""
    from .testing_dit import _t5_encoder, t5_tokenizer

    tokenizer = t5_tokenizer()
    return _t5_encoder(len(tokenizer), width, seed), tokenizer


def tiny_sd3(*, dual: tuple[int, ...] = (0,), layers: int = 3, seed: int = 0, t5: bool = False):
    """A ``StableDiffusion3Pipeline`` of tiny random parts (CPU, float32); 16 latent channels, vae factor 2, so a
    32×32 image is a 16×16 latent and an 8×8 grid of image tokens. ``t5=True`` loads a tiny T5 encoder and the
    T5-format tokenizer as ``text_encoder_3`` / ``tokenizer_3`` (text keys [CLIP 77 | T5 max_sequence_length])."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tokenizer = clip_tokenizer()
    text_encoder_3, tokenizer_3 = tiny_t5(32, seed + 4) if t5 else (None, None)
    # CLIP hidden sizes 8 + 8 = 16 <= joint_attention_dim (SD3 pads the CLIP features up to the T5 width);
    # pooled projections 8 + 8 = pooled_projection_dim.
    pipe = StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(layers=layers, dual=dual, joint_dim=32, pooled_dim=16, seed=seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed + 1),
        text_encoder=_clip(8, 8, seed + 2),
        tokenizer=tokenizer,
        text_encoder_2=_clip(8, 8, seed + 3),
        tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
