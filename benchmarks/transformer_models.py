"""The transformer benchmarks' architectures (for ``benchmarks/transformers.py``): each published config with its
source and a tiny config of the same shapes, how to build it with random weights, the pipeline around it (the
prompts' words, the batch layout and the steps a session reads), one denoising step's inputs, what a pipeline call
tells a session, and the checks of ``--size`` / ``--layers`` against it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

import promptcontrol as pc

from .cases import _text_encoder

SD3_MEDIUM_CONFIG = dict(  # stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,  # 24 heads × 64 = 1536 wide
    joint_attention_dim=4096,  # T5-XXL width; CLIP-L + CLIP-G features (768 + 1280) are zero-padded up to it
    caption_projection_dim=1536,
    pooled_projection_dim=2048,  # CLIP-L pooled 768 + CLIP-G pooled 1280
    pos_embed_max_size=192,
)  # no qk_norm, no dual_attention_layers (those are SD3.5's): diffusers' defaults

TINY_SD3_CONFIG = dict(  # the shapes of promptcontrol.testing_sd3.tiny_sd3_transformer, SD3 (not 3.5) flavour
    sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
    pos_embed_max_size=32,
)

FLUX_DEV_CONFIG = dict(  # black-forest-labs/FLUX.1-dev, transformer/config.json (_diffusers_version 0.30.0.dev0)
    patch_size=1,  # the pipeline packs 2×2 latent patches itself: 16 VAE channels × 4 = 64 in
    in_channels=64,
    num_layers=19,  # double-stream blocks (FluxTransformerBlock)
    num_single_layers=38,  # single-stream blocks (FluxSingleTransformerBlock)
    attention_head_dim=128,
    num_attention_heads=24,  # 24 heads × 128 = 3072 wide
    joint_attention_dim=4096,  # T5-XXL width
    pooled_projection_dim=768,  # CLIP-L pooled
    guidance_embeds=True,  # dev is guidance-distilled (schnell: False)
    axes_dims_rope=(16, 56, 56),  # rotary over (0, row, col) ids: 16 + 56 + 56 = 128
)  # out_channels None (= in_channels): diffusers' default, as in the published config

TINY_FLUX_CONFIG = dict(  # the shapes of promptcontrol.testing_flux.tiny_flux_transformer
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
)


@dataclass(frozen=True)
class BlockKind:
    """One kind of transformer block: what the report calls it, the model's ``ModuleList`` of them, the config key
    that counts them."""

    name: str
    attribute: str
    config_key: str


@dataclass(frozen=True)
class Architecture:
    """One transformer family: its published config, how to build it, its pipeline (for words, layout and steps),
    the inputs of one denoising step, and how a session is told about a call without running the pipeline."""

    name: str
    title: str
    config: dict
    tiny_config: dict
    kinds: tuple[BlockKind, ...]  # the block kinds, in the order ``--layers`` counts them
    cpu_layers: tuple[int, ...]  # the CPU (and --tiny) default of ``--layers``
    build: Callable[[dict, torch.dtype, str], torch.nn.Module]
    pipeline: Callable[[torch.nn.Module, int], Any]  # (model, text tokens) -> the pipeline around it
    inputs: Callable[[torch.nn.Module, int, int, int], dict]  # (model, image size, batch, text tokens) -> kwargs
    announce: Callable[[Any, list[str], int], None]  # (pipe, prompts, steps): what a pipeline call tells a session
    depth_note: Callable[[tuple, tuple], str]  # (layers built, published layers) -> what a shallower model measured
    stock_processor: str
    cfg: bool  # whether the pipeline's calls carry [uncond | cond] rows
    text_tokens: int  # the text sequence the denoiser sees in the pipeline's default call
    tiny_text_tokens: int
    gpu_dtype: str = "float16"
    vae_scale: int = 8
    pack: int = 1  # latent patches the pipeline packs into one token per side (Flux: 2), on top of patch_size
    steps: int = 28  # the pipeline's default step count: the session is told it; step 0 is timed

    def full_layers(self) -> tuple[int, ...]:
        return tuple(self.config[kind.config_key] for kind in self.kinds)

    def layers_text(self, layers: tuple[int, ...]) -> str:
        """``"2 blocks"`` (one kind) or ``"1 double-stream + 1 single-stream blocks"``."""
        if len(self.kinds) == 1:
            return f"{layers[0]} block{'s' if layers[0] != 1 else ''}"
        return " + ".join(f"{n} {kind.name}" for n, kind in zip(layers, self.kinds)) + " blocks"


def build_model(cls, config: dict, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """``cls(**config)`` with seeded random weights, built directly in ``dtype`` on ``device`` (full Flux.1-dev in
    float32 would be 48 GB before a cast), in eval mode without gradients."""
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    if any(p.dtype != dtype for p in model.parameters()):  # none expected; diffusers warns on every cast
        model = model.to(dtype=dtype)
    return model.eval().requires_grad_(False)


def build_sd3(config: dict, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    return build_model(SD3Transformer2DModel, config, dtype, device)


def sd3_pipeline(transformer: torch.nn.Module, text_tokens: int | None = None):
    """A ``StableDiffusion3Pipeline`` around ``transformer``: two 1-layer CLIP encoders (pooled widths summing to
    the transformer's ``pooled_projection_dim``) on the real CLIP tokenizer, no T5 (``text_tokens`` unused: no T5
    words), no VAE (never decoded)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    param = next(transformer.parameters())
    pooled = transformer.config.pooled_projection_dim
    tokenizer = pc.testing.clip_tokenizer()
    torch.manual_seed(1)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
        text_encoder=_text_encoder(8, pooled // 2, param.dtype, param.device), tokenizer=tokenizer,
        text_encoder_2=_text_encoder(8, pooled - pooled // 2, param.dtype, param.device), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


SD3_TEXT_TOKENS = 77 + 256  # CLIP's 77, then T5's StableDiffusion3Pipeline default max_sequence_length 256


def sd3_inputs(model: torch.nn.Module, size: int, batch: int, text_tokens: int) -> dict:
    """One denoising step's forward kwargs: latents ``(B, C, size/8, size/8)``, text ``(B, text_tokens,
    joint_dim)``, pooled ``(B, pooled_dim)``, timestep ``(B,)`` (random: the text encoders are not the point)."""
    cfg = model.config
    param = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    latent = size // 8
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, latent, latent, generator=g).to(param),
        encoder_hidden_states=torch.randn(batch, text_tokens, cfg.joint_attention_dim, generator=g).to(param),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(param),
        timestep=torch.full((batch,), 980.0, device=param.device, dtype=param.dtype),
        return_dict=False,
    )


def sd3_announce(pipe, prompts: list[str], steps: int) -> None:
    """What ``pipe(prompts, num_inference_steps=steps)`` tells an active session before its first step."""
    pipe.scheduler.set_timesteps(steps, device=pipe.transformer.device)
    pipe.encode_prompt(prompts, None, None, device=pipe.transformer.device, do_classifier_free_guidance=True)


def sd3_depth_note(measured: tuple[int, ...], published: tuple[int, ...]) -> str:
    (layers,), (full,) = measured, published
    return (
        f"Measured: {layers} of the SD3-medium architecture's {full} joint blocks (`--layers {layers}`). "
        "The blocks are identical (1536 wide, 24 heads × 64, the same joint attention over image + text tokens), so "
        "per-block ratios carry to the full depth. Two caveats, both small: the layers outside the blocks (patch "
        "embedding, context embedder, final layer) run the same in every mode and dilute a shallow model's ratios "
        f"slightly toward 1; and the last block is `context_pre_only` (no text feed-forward), 1 of {layers} "
        f"here against 1 of {full} in the full model."
    )


def build_flux(config: dict, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    return build_model(FluxTransformer2DModel, config, dtype, device)


FLUX_TEXT_TOKENS = 512  # FluxPipeline's default max_sequence_length (T5), Flux.1-dev's tokenizer_2 model_max_length


def _t5_encoder(vocab_size: int, dtype: torch.dtype, device):
    """A 1-layer random ``T5EncoderModel`` 16 wide: only its call matters (the session reads the prompts there)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return T5EncoderModel(config).to(device=device, dtype=dtype).eval()


def flux_pipeline(transformer: torch.nn.Module, text_tokens: int = FLUX_TEXT_TOKENS):
    """A ``FluxPipeline`` around ``transformer``: a 1-layer CLIP text model (pooled vector only) on the real CLIP
    tokenizer and a 1-layer T5 encoder on the package's T5-format tokenizer (``T5TokenizerFast``, padded to
    ``text_tokens``: its tokens are the joint attention's text keys, the words' positions), no VAE (never
    decoded; the pipeline's VAE scale is then 8, as Flux.1-dev's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from promptcontrol.testing_dit import t5_tokenizer

    param = next(transformer.parameters())
    t5 = t5_tokenizer()
    t5.model_max_length = text_tokens
    torch.manual_seed(1)
    pipe = FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
        text_encoder=_text_encoder(8, None, param.dtype, param.device), tokenizer=pc.testing.clip_tokenizer(),
        text_encoder_2=_t5_encoder(len(t5), param.dtype, param.device), tokenizer_2=t5,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_image_ids(rows: int, cols: int) -> torch.Tensor:
    """``(rows·cols, 3)`` ids ``(0, row, col)`` of the packed image tokens, row-major, as FluxPipeline makes them."""
    grid = torch.cartesian_prod(torch.arange(rows), torch.arange(cols))  # (N, 2)
    return torch.cat([torch.zeros(rows * cols, 1), grid.float()], dim=1)


def flux_inputs(model: torch.nn.Module, size: int, batch: int, text_tokens: int) -> dict:
    """One denoising step's forward kwargs: packed latents ``(B, (size/16)², in_channels)`` with their ``img_ids``,
    T5 features ``(B, text_tokens, joint_dim)`` with zero ``txt_ids``, pooled ``(B, pooled_dim)``, timestep and
    guidance ``(B,)`` as FluxPipeline passes them (``t / 1000``; 3.5, its default)."""
    cfg = model.config
    param = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    grid = size // 16  # VAE ×8, then 2×2 packing
    inputs = dict(
        hidden_states=torch.randn(batch, grid * grid, cfg.in_channels, generator=g).to(param),
        encoder_hidden_states=torch.randn(batch, text_tokens, cfg.joint_attention_dim, generator=g).to(param),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(param),
        timestep=torch.full((batch,), 0.98, device=param.device, dtype=param.dtype),
        img_ids=flux_image_ids(grid, grid).to(param),
        txt_ids=torch.zeros(text_tokens, 3).to(param),
        return_dict=False,
    )
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5, device=param.device, dtype=torch.float32)
    return inputs


def flux_announce(pipe, prompts: list[str], steps: int) -> None:
    """What ``pipe(prompts, num_inference_steps=steps)`` tells an active session before its first step (Flux.1-dev:
    no CFG rows, so no negative prompt)."""
    pipe.encode_prompt(prompts, None, device=pipe.transformer.device,
                       max_sequence_length=pipe.tokenizer_2.model_max_length)
    pipe.scheduler.set_timesteps(steps, device=pipe.transformer.device)


def flux_depth_note(measured: tuple[int, ...], published: tuple[int, ...]) -> str:
    (double, single), (full_double, full_single) = measured, published
    return (
        f"Measured: {double} of the Flux.1-dev architecture's {full_double} double-stream and {single} of its "
        f"{full_single} single-stream blocks (`--layers {double},{single}`). Blocks of a kind are identical (3072 "
        "wide, 24 heads × 128, rotary embeddings; double-stream: separate image and text projections, single-stream: "
        "one projection over [text | image] fused with the MLP), so each kind's per-block ratio carries to the full "
        f"depth. The whole-forward ratio does not carry as it stands: here it weights the kinds {double}:{single} and "
        f"counts the layers outside the blocks (embedders, rotary tables, final layer) once; the full model weights "
        f"the kinds {full_double}:{full_single}. That is what *est. full depth* does (below)."
    )


ARCHITECTURES: dict[str, Architecture] = {
    "sd3": Architecture(
        name="sd3", title="SD3-medium architecture SD3Transformer2DModel (published config, random weights)",
        config=SD3_MEDIUM_CONFIG, tiny_config=TINY_SD3_CONFIG,
        kinds=(BlockKind("joint", "transformer_blocks", "num_layers"),), cpu_layers=(2,),
        build=build_sd3, pipeline=sd3_pipeline, inputs=sd3_inputs, announce=sd3_announce,
        depth_note=sd3_depth_note, stock_processor="JointAttnProcessor2_0", cfg=True,
        text_tokens=SD3_TEXT_TOKENS, tiny_text_tokens=77 + 16,
    ),
    "flux": Architecture(
        name="flux", title="Flux.1-dev architecture FluxTransformer2DModel (published config, random weights)",
        config=FLUX_DEV_CONFIG, tiny_config=TINY_FLUX_CONFIG,
        kinds=(BlockKind("double-stream", "transformer_blocks", "num_layers"),
               BlockKind("single-stream", "single_transformer_blocks", "num_single_layers")),
        cpu_layers=(1, 1), build=build_flux, pipeline=flux_pipeline, inputs=flux_inputs, announce=flux_announce,
        depth_note=flux_depth_note, stock_processor="FluxAttnProcessor", cfg=False,
        text_tokens=FLUX_TEXT_TOKENS, tiny_text_tokens=16, gpu_dtype="bfloat16", pack=2,
    ),
}


# ---- the options against an architecture ----------------------------------------------------------------------
def check_layers(arch: Architecture, layers: tuple[int, ...]) -> None:
    """One block count per kind, none negative, at least one block in all."""
    kinds = ",".join(kind.name for kind in arch.kinds)
    full = ",".join(map(str, arch.full_layers()))
    if len(layers) != len(arch.kinds):
        raise ValueError(f"--layers {','.join(map(str, layers))}: {arch.name} takes {len(arch.kinds)} block "
                         f"count(s), {kinds} (the full model: --layers {full})")
    if min(layers) < 0 or sum(layers) < 1:
        raise ValueError(f"--layers must give at least 1 block and no negative count (got "
                         f"{','.join(map(str, layers))}); the full {arch.name} model has --layers {full} ({kinds})")


def check_size(arch: Architecture, size: int, tiny: bool) -> None:
    """The image side must give whole patches (and fit the position embedding table where there is one)."""
    config = arch.tiny_config if tiny else arch.config
    step = arch.vae_scale * arch.pack * config["patch_size"]
    table = config.get("pos_embed_max_size")
    largest = table * step if table else None
    if size % step or size < step or (largest and size > largest):
        packing = f", packed {arch.pack}×{arch.pack}" if arch.pack > 1 else ""
        bound = (f" between {step} and {largest} (pos_embed_max_size {table})" if largest else
                 f", at least {step} (rotary embeddings: no upper bound)")
        raise ValueError(f"--size {size}: {arch.name} needs a multiple of {step} (VAE ×{arch.vae_scale}{packing}, "
                         f"patch {config['patch_size']}){bound}")


def image_tokens(arch: Architecture, size: int, patch_size: int) -> int:
    return (size // (arch.vae_scale * arch.pack * patch_size)) ** 2
