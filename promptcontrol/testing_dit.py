"""Tiny offline diffusion-transformer pipelines for tests: PixArt-Σ and Sana, seeded, no network.

Each pipeline is the stock diffusers pipeline class with small random-weight parts and a real tokenizer format
(the package's own tiny Unigram / BPE vocabularies, see ``scripts/make_t5_tokenizer.py``), so the text arrives
exactly as in the real models: right-padded to ``max_sequence_length`` with an encoder attention mask.

* :func:`tiny_pixart`: ``PixArtSigmaPipeline`` — a 1-layer ``T5EncoderModel`` with a ``T5TokenizerFast``, a
  two-level ``AutoencoderKL`` (scale 2), a 2-block ``PixArtTransformer2DModel`` (``patch_size=2``, learned sigma:
  8 output channels), DDIM. Its ``attn1`` and ``attn2`` both run ``AttnProcessor2_0``.
* :func:`tiny_sana`: ``SanaPipeline`` — a 1-layer ``Gemma2Model`` with a ``GemmaTokenizerFast`` (``<bos>``
  first), a two-level ``AutoencoderDC`` (scale 2), a 2-block ``SanaTransformer2DModel`` (``patch_size=1``;
  ``attn1`` linear attention, ``attn2`` ``SanaAttnProcessor2_0``), flow-matching Euler.

Call the pipelines with ``use_resolution_binning=False`` (their aspect-ratio tables are for the real sample
sizes) and, for Sana, ``complex_human_instruction=None`` unless a test wants the instruction prefix. Images are
noise: these are for checking mechanics, not pictures.
"""

from __future__ import annotations

from pathlib import Path

import torch

ASSETS = Path(__file__).parent / "assets"
T5_TOKENIZER_DIR = ASSETS / "t5-tiny-tokenizer"
GEMMA_TOKENIZER_DIR = ASSETS / "gemma-tiny-tokenizer"
MAX_SEQUENCE_LENGTH = 300  # both pipelines' default


def t5_tokenizer():
    """The tiny T5-format tokenizer (``T5TokenizerFast``, ``</s>`` at the end, ``<pad>`` = 0, 300 tokens)."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(str(T5_TOKENIZER_DIR))


def gemma_tokenizer():
    """The tiny Gemma-format tokenizer (``GemmaTokenizerFast``, ``<bos>`` first, right padding, 300 tokens)."""
    from transformers import GemmaTokenizerFast

    return GemmaTokenizerFast.from_pretrained(str(GEMMA_TOKENIZER_DIR))


def _t5_encoder(vocab_size: int, width: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=2 * width, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def _gemma_encoder(vocab_size: int, width: int, seed: int):
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    torch.manual_seed(seed)
    return Gemma2Model(config).eval()


def _vae_kl(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), sample_size=32,
    ).eval()


def _vae_dc(seed: int):
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    return AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        downsample_block_type="conv", upsample_block_type="interpolate",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
    ).eval()


def tiny_pixart_transformer(seed: int = 0, caption_channels: int = 16):
    """A 2-block ``PixArtTransformer2DModel`` (patch 2, 2 heads of 8, learned sigma), random weights, seeded."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        caption_channels=caption_channels, in_channels=4, out_channels=8, cross_attention_dim=16,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
    ).eval()


def tiny_sana_transformer(seed: int = 0, caption_channels: int = 16, qk_norm: str | None = None):
    """A 2-block ``SanaTransformer2DModel`` (patch 1; self 2 heads of 8, cross 2 heads of 8), random, seeded."""
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(seed)
    return SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=caption_channels, sample_size=16, patch_size=1, qk_norm=qk_norm,
    ).eval()


def tiny_pixart(seed: int = 0, device: str | torch.device = "cpu"):
    """A tiny ``PixArtSigmaPipeline`` built offline (images: any multiple of 4 pixels, latent ÷2, patch 2)."""
    from diffusers import DDIMScheduler, PixArtSigmaPipeline

    tokenizer = t5_tokenizer()
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5_encoder(len(tokenizer), 16, seed + 1),
        vae=_vae_kl(seed + 2),
        transformer=tiny_pixart_transformer(seed),
        scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def tiny_sana(seed: int = 0, device: str | torch.device = "cpu", qk_norm: str | None = None):
    """A tiny ``SanaPipeline`` built offline (images: any multiple of 2 pixels, latent ÷2, patch 1).

    ``qk_norm="rms_norm_across_heads"`` gives Sana 1.5's cross-attention normalisation."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    tokenizer = gemma_tokenizer()
    pipe = SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=_gemma_encoder(len(tokenizer), 16, seed + 1),
        vae=_vae_dc(seed + 2),
        transformer=tiny_sana_transformer(seed, qk_norm=qk_norm),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
