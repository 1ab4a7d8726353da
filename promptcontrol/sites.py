"""Finding the attention sites of a denoiser: where they sit, what their keys are, how many heads they have.

A *site* is one attention module of the denoiser, named by the key that ``model.attn_processors`` uses for it.
Sites are found by walking the module tree and reading attributes, never by class name:

- UNets (SD 1.x, 2.x, SDXL): ``attn1`` self-attention, ``attn2`` cross-attention (``is_cross_attention``), placed
  by ``down_blocks`` / ``mid_block`` / ``up_blocks`` and their downsampling level (``downsamplers``, ``upsamplers``);
- transformers: ``transformer_blocks.N`` and ``single_transformer_blocks.N``. An attention with added text
  projections (``added_kv_proj_dim``: SD3's and Flux's double-stream blocks) is *joint* attention, one softmax over
  image and text keys; Flux's single-stream blocks see one concatenated ``[text | image]`` sequence (joint too,
  stream ``"single"``); ``is_cross_attention`` (PixArt, Sana) is cross-attention to the text; the rest is self.

A site's spatial grid depends on the image size and is resolved at run time by :func:`grid_for`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

Place = Literal["down", "mid", "up", "transformer"]
Kind = Literal["cross", "self", "joint"]
Stream = Literal["double", "single"]
TextKeys = Literal["all", "after", "before"]

_KEY_PATTERN = re.compile(
    r"^(?P<place>down_blocks|mid_block|up_blocks)(?:\.(?P<block>\d+))?\."
    r"attentions\.(?P<attention>\d+)\.transformer_blocks\.(?P<layer>\d+)\.attn(?P<which>\d+)\.processor$"
)


@dataclass(frozen=True)
class AttentionSite:
    """One attention layer of a denoiser.

    key:        the processor key, e.g. ``"down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"``
    kind:       ``"cross"`` (queries: latents, keys/values: text tokens), ``"self"`` (latents to latents) or
                ``"joint"`` (one softmax over image and text keys: SD3, Flux)
    place:      UNet: ``"down"``, ``"mid"`` or ``"up"``; transformers: ``"transformer"``
    block:      index of the down/up block (0 for mid), or of the transformer block in its list
    attention:  index of the transformer (``attentions.N``) inside a UNet block (0 on transformers)
    layer:      index of the transformer block inside that transformer (SDXL stacks up to 10; 0 on transformers)
    level:      how many times the latent has been halved at this site (0 = full latent resolution)
    heads:      number of attention heads
    stream:     transformers' double-stream (``"double"``: separate text projections) or single-stream
                (``"single"``: one ``[text | image]`` sequence) blocks; ``None`` elsewhere
    text_keys:  where the text keys are: ``"all"`` (cross), ``"after"`` / ``"before"`` the image keys (joint:
                SD3 ``[image | text]``, Flux ``[text | image]``), ``None`` (self)
    patch:      latent pixels per query token along each side (transformers' ``patch_size``; 1 on UNets)
    """

    key: str
    kind: Kind
    place: Place
    block: int
    attention: int
    layer: int
    level: int
    heads: int
    stream: Stream | None = None
    text_keys: TextKeys | None = None
    patch: int = 1

    def __post_init__(self):
        if self.text_keys is None and self.kind == "cross":
            object.__setattr__(self, "text_keys", "all")

    @property
    def module_path(self) -> str:
        """Dotted path of the attention module inside the denoiser."""
        return self.key[: -len(".processor")]

    @property
    def is_cross(self) -> bool:
        return self.kind == "cross"

    @property
    def attends_text(self) -> bool:
        """Whether text tokens are among this site's keys (cross- or joint attention): where words have maps."""
        return self.text_keys is not None

    @property
    def on_transformer(self) -> bool:
        return self.place == "transformer"

    def __str__(self) -> str:
        return self.module_path


def _levels(unet: torch.nn.Module) -> tuple[list[int], int, list[int]]:
    """Downsampling level of each down block, of the mid block and of each up block, from the UNet's structure."""
    down_levels, level = [], 0
    for block in unet.down_blocks:
        down_levels.append(level)
        if getattr(block, "downsamplers", None) is not None:
            level += 1
    mid_level = level
    up_levels = []
    for block in unet.up_blocks:
        up_levels.append(level)
        if getattr(block, "upsamplers", None) is not None:
            level -= 1
    return down_levels, mid_level, up_levels


def is_denoiser(model: torch.nn.Module) -> bool:
    """Whether ``model`` has the block structure of a diffusers UNet or diffusion transformer (Flux 3 has only
    ``single_transformer_blocks`` beside its own text blocks: found, so that its processor is refused by name)."""
    return any(hasattr(model, name) for name in ("down_blocks", "transformer_blocks", "single_transformer_blocks"))


def find_sites(model: torch.nn.Module) -> list[AttentionSite]:
    """Every attention site of a diffusers UNet (``UNet2DConditionModel``-like) or diffusion transformer (SD3,
    Flux, PixArt, Sana), in processor-key order.

    Raises ``TypeError`` when ``model`` has no ``attn_processors`` or no such block structure.
    """
    if not hasattr(model, "attn_processors") or not is_denoiser(model):
        raise TypeError(
            "expected a diffusers UNet2DConditionModel or diffusion transformer (or a pipeline holding one as "
            f"`.unet` / `.transformer`), got {type(model).__name__}"
        )
    if hasattr(model, "down_blocks"):
        return _unet_sites(model)
    return _transformer_sites(model)


def _unet_sites(unet: torch.nn.Module) -> list[AttentionSite]:
    down_levels, mid_level, up_levels = _levels(unet)
    modules = dict(unet.named_modules())
    sites = []
    for key in unet.attn_processors:
        match = _KEY_PATTERN.match(key)
        if match is None:  # attention outside the transformer blocks (none in SD/SDXL UNets): not controllable
            continue
        module = modules[key[: -len(".processor")]]
        place_name = match["place"]
        block = int(match["block"] or 0)
        if place_name == "down_blocks":
            place, level = "down", down_levels[block]
        elif place_name == "up_blocks":
            place, level = "up", up_levels[block]
        else:
            place, level = "mid", mid_level
        sites.append(
            AttentionSite(
                key=key,
                kind="cross" if getattr(module, "is_cross_attention", False) else "self",
                place=place,
                block=block,
                attention=int(match["attention"]),
                layer=int(match["layer"]),
                level=level,
                heads=int(module.heads),
            )
        )
    return sites


_TRANSFORMER_KEY = re.compile(r"^(?P<blocks>single_transformer_blocks|transformer_blocks)\.(?P<block>\d+)\.(?P<name>attn\d*)\.processor$")


def _transformer_sites(model: torch.nn.Module) -> list[AttentionSite]:
    """Sites of a diffusion transformer, read from each attention module's attributes."""
    modules = dict(model.named_modules())
    patch = int(getattr(getattr(model, "config", None), "patch_size", None) or 1)
    sites = []
    for key in model.attn_processors:
        match = _TRANSFORMER_KEY.match(key)
        if match is None:
            continue
        module = modules[key[: -len(".processor")]]
        single = match["blocks"] == "single_transformer_blocks"
        joint = getattr(module, "added_kv_proj_dim", None) is not None
        if single or joint:
            # Flux puts text first ([text | image], also in its single-stream blocks); SD3 puts it last.
            kind, text_keys = "joint", ("before" if _is_flux_like(model) else "after")
        elif getattr(module, "is_cross_attention", False):
            kind, text_keys = "cross", "all"
        else:
            kind, text_keys = "self", None
        sites.append(
            AttentionSite(
                key=key, kind=kind, place="transformer", block=int(match["block"]), attention=0, layer=0, level=0,
                heads=int(module.heads), stream=("single" if single else "double") if kind == "joint" else None,
                text_keys=text_keys, patch=patch,
            )
        )
    return sites


def _is_flux_like(model: torch.nn.Module) -> bool:
    """Flux-style models (single-stream blocks beside the double-stream ones) order the joint sequence text first."""
    return hasattr(model, "single_transformer_blocks")


def attention_modules(unet: torch.nn.Module, sites: list[AttentionSite]) -> dict[str, torch.nn.Module]:
    """The `Attention` module of each site, by processor key."""
    modules = dict(unet.named_modules())
    return {site.key: modules[site.module_path] for site in sites}


def grid_for(latent_hw: tuple[int, int], level: int) -> tuple[int, int]:
    """Spatial (h, w) of the token grid at a downsampling level, for a latent of size ``latent_hw``.

    Stride-2 convolutions with padding 1 give ``ceil(n / 2)`` per halving, so odd sizes stay exact.
    """
    h, w = latent_hw
    for _ in range(level):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def grid_from_length(latent_hw: tuple[int, int], length: int) -> tuple[int, int]:
    """Spatial (h, w) whose product is ``length``, found by halving the latent size (any aspect ratio)."""
    for level in range(12):
        h, w = grid_for(latent_hw, level)
        if h * w == length:
            return h, w
    raise ValueError(f"no spatial grid of {length} positions for a latent of {latent_hw[0]}x{latent_hw[1]}")
