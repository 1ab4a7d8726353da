"""Builders of the embedded SD3-architecture model ("toy-sd3"): a ``StableDiffusion3Pipeline``, only tiny.

- ``SD3Transformer2DModel``: patch 1 on the toy VAE's 8×8×4 latent (64 image tokens, maps at 8×8), 5 joint
  blocks 128 wide (4 heads of 32), qk RMS-norm as SD3.5, the last block ``context_pre_only`` as in SD3;
- ``text_encoder``: ``CLIPTextModelWithProjection`` 64 wide, 2 layers (the pipeline reads the states after layer 1
  of 2, ``hidden_states[-2]``; the shape of the UNet toy model's encoder so that ``--init-text`` can start it);
- ``text_encoder_2``: the same kind, 16 wide; both share the package's real CLIP tokenizer;
- ``text_encoder_3 = None``: the stock pipeline then appends ``max_sequence_length`` (256) zero vectors;
- the VAE comes from an existing ``AutoencoderKL`` folder (``load_vae``), not trained here: by default the one
  shipped inside toy-sd3 (``assets/toy-sd3/vae``, the ×4 autoencoder of the v2 UNet toy model);
- ``FlowMatchEulerDiscreteScheduler`` (rectified flow, velocity ε − x0), ``shift`` 1.0 by default.

Pooled text: with ``pooled=False`` (the default) both encoders' ``text_projection`` is zero and stays frozen, so
``pooled_prompt_embeds`` are zeros for every prompt and the caption reaches the image only through attention
(where maps, weights and edits act). All sizes live in ``ToySD3Config``; docs/embedded-model.md, "toy-sd3", says why.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from .model import EMBEDDED, TOKENIZER, build_tokenizer

DEFAULT_VAE = EMBEDDED.parent / "toy-sd3" / "vae"
"""toy-sd3's autoencoder, 32×32×3 ↔ 8×8×4 (×4): the v2 UNet toy model's (trained by ``toy.train``'s first stage;
the UNet model now ships a ×2 one), kept inside the SD3 model's folder."""

T5_TOKENS = 256
"""The stock pipeline's default ``max_sequence_length``: how many zero T5 vectors it appends without T5."""


@dataclass
class ToySD3Config:
    """Every size of the toy SD3 model. Defaults are the model to ship; the VAE fields are read from the VAE."""

    image_size: int = 32
    latent_channels: int = 4  # from the VAE
    vae_levels: int = 3  # from the VAE: latent side = image / 2 ** (levels - 1)
    vae_scaling_factor: float = 1.0  # from the VAE folder's config
    patch_size: int = 1
    width: int = 128  # transformer inner dim (image and text streams)
    layers: int = 5
    head_dim: int = 32
    qk_norm: str | None = "rms_norm"
    text_width: int = 64
    text_layers: int = 2  # the pipeline reads hidden_states[-2]: the output of layer text_layers - 1
    text_heads: int = 2
    text2_width: int = 16
    text2_heads: int = 1
    pooled: bool = False  # False: text_projection zero and frozen, pooled embeddings are zeros
    shift: float = 1.0  # FlowMatchEulerDiscreteScheduler's shift

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (self.vae_levels - 1)

    @property
    def heads(self) -> int:
        return self.width // self.head_dim

    @property
    def joint_dim(self) -> int:
        """Width of the text features the transformer reads: both CLIP encoders' states side by side."""
        return self.text_width + self.text2_width

    @property
    def grid(self) -> int:
        """Image tokens per side (the heat maps' resolution)."""
        return self.latent_size // self.patch_size

    def check(self) -> None:
        """Refuse sizes the builders cannot make, naming the field and the fix."""
        if self.width % self.head_dim:
            raise ValueError(f"width {self.width} is not a multiple of head_dim {self.head_dim}: pick a multiple")
        if self.latent_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} does not divide the {self.latent_size}-px latent")
        if self.text_layers < 2:
            raise ValueError("text_layers must be >= 2: the SD3 pipeline reads hidden_states[-2], which for one "
                             "layer is the bare token embedding")
        for w, h, name in ((self.text_width, self.text_heads, "text"), (self.text2_width, self.text2_heads, "text2")):
            if w % h:
                raise ValueError(f"{name}_width {w} is not a multiple of {name}_heads {h}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ToySD3Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ToySD3Config fields {unknown}: the state was written by another version")
        return cls(**d)


# --------------------------------------------------------------------------- VAE


def load_vae(folder: str | Path = DEFAULT_VAE) -> AutoencoderKL:
    """An existing ``AutoencoderKL`` folder (config.json + weights), float32, eval mode, ``shift_factor`` 0.0
    (SD3's decode is ``latents / scaling_factor + shift_factor``: None there would fail)."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"--vae-from {folder}: no config.json there; pass an AutoencoderKL folder "
                                f"such as {DEFAULT_VAE}")
    kind = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    if kind != "AutoencoderKL":
        raise ValueError(f"--vae-from {folder}: config.json describes {kind!r}, not an AutoencoderKL")
    vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    vae.register_to_config(shift_factor=0.0)
    return vae


def config_for_vae(cfg: ToySD3Config, vae: AutoencoderKL) -> ToySD3Config:
    """``cfg`` with the VAE's latent channels, levels and scaling factor."""
    c = vae.config
    if c.sample_size != cfg.image_size:
        raise ValueError(f"the VAE works on {c.sample_size}-px images, the toy world on {cfg.image_size}")
    return ToySD3Config(**{**cfg.to_dict(), "latent_channels": c.latent_channels,
                           "vae_levels": len(c.block_out_channels), "vae_scaling_factor": float(c.scaling_factor)})


# --------------------------------------------------------------------------- transformer, text, scheduler


def build_transformer(cfg: ToySD3Config) -> SD3Transformer2DModel:
    """Random transformer; positions up to twice the trained grid (other image sizes up to 2× crop them)."""
    cfg.check()
    return SD3Transformer2DModel(
        sample_size=cfg.latent_size, patch_size=cfg.patch_size, in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels, num_layers=cfg.layers, attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads, joint_attention_dim=cfg.joint_dim, caption_projection_dim=cfg.width,
        pooled_projection_dim=cfg.joint_dim, pos_embed_max_size=2 * cfg.grid, qk_norm=cfg.qk_norm,
    )


def adaln_zero_(transformer: SD3Transformer2DModel) -> SD3Transformer2DModel:
    """DiT's adaLN-Zero start (Peebles & Xie 2023), in place: every modulation (shift, scale, gate) and the output
    projection zero, so each block starts as the identity and the model predicts 0. For new training runs."""
    with torch.no_grad():
        for name, module in transformer.named_modules():
            if name.rsplit(".", 1)[-1] in ("norm1", "norm1_context", "norm_out") and hasattr(module, "linear"):
                module.linear.weight.zero_()
                module.linear.bias.zero_()
        transformer.proj_out.weight.zero_()
        transformer.proj_out.bias.zero_()
    return transformer


def _clip(tokenizer: CLIPTokenizer, width: int, layers: int, heads: int, pooled: bool) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, projection_dim=width,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = CLIPTextModelWithProjection(config)
    if not pooled:
        with torch.no_grad():
            model.text_projection.weight.zero_()
        model.text_projection.requires_grad_(False)
    return model


def build_text_encoders(cfg: ToySD3Config, tokenizer: CLIPTokenizer) -> tuple[CLIPTextModelWithProjection, ...]:
    """(text_encoder, text_encoder_2), random; ``text_projection`` zero and frozen unless ``cfg.pooled``."""
    cfg.check()
    return (_clip(tokenizer, cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.pooled),
            _clip(tokenizer, cfg.text2_width, cfg.text_layers, cfg.text2_heads, cfg.pooled))


def build_scheduler(cfg: ToySD3Config | None = None) -> FlowMatchEulerDiscreteScheduler:
    """Rectified-flow Euler sampler over sigmas 1 → 0 (timestep = 1000 σ), static ``shift``."""
    cfg = cfg or ToySD3Config()
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)


def assemble(transformer, vae, text_encoder, text_encoder_2, tokenizer, scheduler) -> StableDiffusion3Pipeline:
    """An ordinary ``StableDiffusion3Pipeline`` without T5 (both CLIP encoders share one tokenizer)."""
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_pipeline(cfg: ToySD3Config | None = None, vae_from: str | Path = DEFAULT_VAE,
                   seed: int = 0) -> StableDiffusion3Pipeline:
    """A random-weight toy-sd3 pipeline (seeded) over a trained VAE: the baseline a trained model must beat."""
    vae = load_vae(vae_from)
    cfg = config_for_vae(cfg or ToySD3Config(), vae)
    tok = build_tokenizer(TOKENIZER)
    torch.manual_seed(seed)
    te1, te2 = build_text_encoders(cfg, tok)
    return assemble(build_transformer(cfg), vae, te1, te2, tok, build_scheduler(cfg))


def parameter_counts(cfg: ToySD3Config, tokenizer: CLIPTokenizer | None = None) -> dict[str, int]:
    """Parameters of each trained part (built on the meta device: no memory, no time)."""
    tok = tokenizer or build_tokenizer(TOKENIZER)
    with torch.device("meta"):
        te1, te2 = build_text_encoders(cfg, tok)
        transformer = build_transformer(cfg)
    return {name: sum(p.numel() for p in m.parameters())
            for name, m in (("transformer", transformer), ("text_encoder", te1), ("text_encoder_2", te2))}
