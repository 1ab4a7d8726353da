"""Full-size UNets built offline from the published configs, with random weights (the timing does not care)."""

from __future__ import annotations

import torch

SD15_CONFIG = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)

SDXL_CONFIG = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    attention_head_dim=(5, 10, 20),
    block_out_channels=(320, 640, 1280),
    cross_attention_dim=2048,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    in_channels=4,
    layers_per_block=2,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
    transformer_layers_per_block=(1, 2, 10),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
    norm_num_groups=32,
)


def _build(config: dict, dtype: torch.dtype, device: str, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    return unet.to(dtype=dtype).eval().requires_grad_(False)


def sd15_unet(dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
    """An SD 1.5-architecture UNet (860 M parameters), random weights."""
    return _build(SD15_CONFIG, dtype, device, seed)


def sdxl_unet(dtype: torch.dtype = torch.float16, device: str = "cuda", seed: int = 0):
    """An SDXL-architecture UNet (2.6 G parameters), random weights."""
    return _build(SDXL_CONFIG, dtype, device, seed)


def unet_inputs(unet, image_size: int | tuple[int, int], batch: int = 2, tokens: int = 77, seed: int = 0) -> dict:
    """Keyword inputs of one denoising step: latents ``(batch, 4, h/8, w/8)``, a timestep, text features, SDXL extras."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    param = next(unet.parameters())
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    inputs = dict(
        sample=torch.randn(batch, cfg.in_channels, height // 8, width // 8, generator=g).to(param),
        timestep=torch.tensor(500, device=param.device),
        encoder_hidden_states=torch.randn(batch, tokens, cfg.cross_attention_dim, generator=g).to(param),
    )
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = dict(
            text_embeds=torch.randn(batch, pooled, generator=g).to(param),
            time_ids=torch.tensor([[height, width, 0, 0, height, width]] * batch, dtype=param.dtype, device=param.device),
        )
    return inputs
