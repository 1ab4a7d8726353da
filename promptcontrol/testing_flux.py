"""A tiny offline Flux pipeline for tests: the Flux.1 architecture (double- and single-stream blocks), seeded.

``tiny_flux()`` is a stock ``FluxPipeline`` of tiny random parts: a CLIP text encoder on the package's copy of the
real CLIP tokenizer (Flux uses only its pooled vector), a 1-layer ``T5EncoderModel`` on the package's tiny
T5-format tokenizer (its tokens are the joint attention's text keys: right-padded to ``max_sequence_length``),
a two-level ``AutoencoderKL`` (scale 2, 4 latent channels, packed 2×2 into 16 transformer channels) and a
``FluxTransformer2DModel`` with 2 double-stream and 2 single-stream blocks, rotary embeddings and, by default,
Flux-dev's guidance embedding (``guidance_embeds=False`` gives a schnell-style model). A 32×48 image is a
16×24 latent and an 8×12 grid of image tokens. Pictures are noise; word ↔ token alignment is real.
"""

from __future__ import annotations

import torch

from .testing import clip_tokenizer
from .testing_dit import t5_tokenizer

LATENT_CHANNELS = 4
MAX_SEQUENCE_LENGTH = 16
"""The T5 sequence the tiny pipeline pads to (call it with ``max_sequence_length=MAX_SEQUENCE_LENGTH``; its T5
tokenizer's ``model_max_length`` is set to the same, as on the real Flux.1-dev: 512 and 512)."""


def _clip(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="gelu",
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def _t5(vocab_size: int, width: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=2 * width, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), sample_size=32, scaling_factor=1.5, shift_factor=0.1,
    ).eval()


def tiny_flux_transformer(
    *, double: int = 2, single: int = 2, heads: int = 2, head_dim: int = 8, joint_dim: int = 16,
    pooled_dim: int = 8, guidance: bool = True, seed: int = 0,
):
    """A random ``FluxTransformer2DModel`` (rotary axes (2, 2, 4) over ``head_dim=8``; 16 input channels)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=double, num_single_layers=single,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint_dim,
        pooled_projection_dim=pooled_dim, guidance_embeds=guidance, axes_dims_rope=(2, 2, 4),
    ).eval()


def tiny_flux(*, guidance: bool = True, seed: int = 0, device: str | torch.device = "cpu"):
    """A tiny ``FluxPipeline`` built offline (CPU, float32; images: multiples of 4 pixels)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    t5 = t5_tokenizer()
    t5.model_max_length = MAX_SEQUENCE_LENGTH
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed + 1),
        text_encoder=_clip(seed + 2),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_t5(len(t5), 16, seed + 3),
        tokenizer_2=t5,
        transformer=tiny_flux_transformer(guidance=guidance, seed=seed),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
