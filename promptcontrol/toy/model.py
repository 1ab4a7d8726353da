"""Builders of the embedded model's components: a Stable Diffusion 1.x architecture, only tiny.

- ``AutoencoderKL``: 32×32 RGB ↔ 16×16×4 latent (2 levels, ×2), ~0.5 M parameters (the v2 model: 3 levels, ×4,
  8×8 latent);
- ``UNet2DConditionModel``: on the 16×16 latent, cross-attention at 16² and 8² (down, mid, up), ~4 M parameters;
- ``CLIPTextModel``: 64 wide, ``TEXT_LAYERS`` causal layers, the real CLIP tokenizer (the package's copy);
- ``DDIMScheduler`` with Stable Diffusion 1.x's betas, rescaled to zero terminal SNR, v-prediction, trailing
  timesteps (as Stable Diffusion 2.x's v-models and Lin et al. 2023 advise; see ``build_scheduler``).

All sizes live in ``ToyConfig``; ``build_pipeline(ToyConfig())`` gives a random-weight pipeline of the
shipped shape (what the tests compare the trained model against).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED = ASSETS / "toy-sd"
"""The shipped pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
TOKENIZER = EMBEDDED / "tokenizer"


@dataclass
class ToyConfig:
    """Every size of the toy model. Defaults are the shipped model."""

    image_size: int = 32
    vae_channels: tuple[int, ...] = (32, 64)  # 2 levels → latent = image / 2 (16×16); v2's (32, 64, 64): image / 4
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (64, 128)  # cross-attention at 16² and 8² (and the 8² mid block)
    unet_layers_per_block: int = 1
    unet_heads: tuple[int, ...] = (2, 4)  # heads per level; head dim = channels / heads = 32
    text_width: int = 64
    text_layers: int = 1
    text_heads: int = 2
    norm_groups: int = 16
    vae_scaling_factor: float = 1.0  # set after VAE training so that latents have unit std
    prediction_type: str = "v_prediction"  # or "epsilon" (the first runs)
    zero_terminal_snr: bool = True  # rescaled betas: the last training step is pure noise, as at inference

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ToyConfig":
        d = dict(d)
        for k in ("vae_channels", "unet_channels", "unet_heads"):
            if k in d:
                d[k] = tuple(d[k])
        if "prediction_type" not in d:  # runs from before these fields: SD 1.x's ε-prediction schedule
            d.update(prediction_type="epsilon", zero_terminal_snr=False)
        return cls(**d)


def build_tokenizer(path: str | Path = TOKENIZER) -> CLIPTokenizer:
    """The real CLIP BPE tokenizer (vocabulary 49,408, 77 positions) from the package's copy."""
    path = Path(path)
    if not (path / "vocab.json").is_file():
        raise FileNotFoundError(f"no CLIP tokenizer at {path}: expected vocab.json and merges.txt there")
    return CLIPTokenizer.from_pretrained(str(path))


def build_vae(cfg: ToyConfig) -> AutoencoderKL:
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels, layers_per_block=1, latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_groups, sample_size=cfg.image_size, scaling_factor=cfg.vae_scaling_factor,
    )


def build_unet(cfg: ToyConfig) -> UNet2DConditionModel:
    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=cfg.latent_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=cfg.unet_channels, layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cfg.text_width, attention_head_dim=cfg.unet_heads,
        norm_num_groups=cfg.norm_groups,
    )


def build_text_encoder(cfg: ToyConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
        projection_dim=cfg.text_width, num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_scheduler(cfg: ToyConfig | None = None) -> DDIMScheduler:
    """DDIM over SD 1.x's betas (scaled-linear 0.00085 → 0.012, 1000 steps).

    With ``cfg.zero_terminal_snr`` (the shipped model) the betas are rescaled so that the last training step is
    pure noise, sampling starts at that step ("trailing" spacing), and the model predicts v. SD 1.x's own schedule
    keeps ~7 % of the image in x_T; a model trained on it learns to read the layout from that residue, which pure
    noise at inference does not have — the first embedded model ignored its position words entirely for this reason
    (the same seed drew the same place for "on the left" and "on the right").
    """
    cfg = cfg or ToyConfig()
    zero = cfg.zero_terminal_snr
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=cfg.prediction_type,
        rescale_betas_zero_snr=zero, timestep_spacing="trailing" if zero else "leading",
    )


def assemble(vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
             tokenizer: CLIPTokenizer, scheduler: DDIMScheduler) -> StableDiffusionPipeline:
    """An ordinary ``StableDiffusionPipeline`` over the parts (no safety checker, no feature extractor)."""
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_pipeline(cfg: ToyConfig | None = None, seed: int = 0) -> StableDiffusionPipeline:
    """A random-weight pipeline of the toy shape (seeded), e.g. the baseline the truth tests must fail."""
    cfg = cfg or ToyConfig()
    torch.manual_seed(seed)
    tok = build_tokenizer()
    return assemble(build_vae(cfg), build_unet(cfg), build_text_encoder(cfg, tok), tok, build_scheduler(cfg))
