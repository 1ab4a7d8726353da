"""Finding the attention sites of a UNet: where they sit, what they attend to, how many heads they have.

A *site* is one `Attention` module of the UNet, named by the key that `unet.attn_processors` uses for it.
Sites are found by walking the module tree and reading attributes (`is_cross_attention`, `heads`,
`downsamplers`, `upsamplers`), never by class name, so SD 1.x, SD 2.x, SDXL and fine-tuned variants all work.
A site's spatial grid depends on the image size and is resolved at run time by :func:`grid_for`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

Place = Literal["down", "mid", "up"]
Kind = Literal["cross", "self"]

_KEY_PATTERN = re.compile(
    r"^(?P<place>down_blocks|mid_block|up_blocks)(?:\.(?P<block>\d+))?\."
    r"attentions\.(?P<attention>\d+)\.transformer_blocks\.(?P<layer>\d+)\.attn(?P<which>\d+)\.processor$"
)


@dataclass(frozen=True)
class AttentionSite:
    """One attention layer of a UNet.

    key:        the processor key, e.g. ``"down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"``
    kind:       ``"cross"`` (queries: latents, keys/values: text tokens) or ``"self"`` (latents to latents)
    place:      ``"down"``, ``"mid"`` or ``"up"``
    block:      index of the down/up block (0 for mid)
    attention:  index of the transformer (``attentions.N``) inside the block
    layer:      index of the transformer block inside that transformer (SDXL stacks up to 10)
    level:      how many times the latent has been halved at this site (0 = full latent resolution)
    heads:      number of attention heads
    """

    key: str
    kind: Kind
    place: Place
    block: int
    attention: int
    layer: int
    level: int
    heads: int

    @property
    def module_path(self) -> str:
        """Dotted path of the `Attention` module inside the UNet."""
        return self.key[: -len(".processor")]

    @property
    def is_cross(self) -> bool:
        return self.kind == "cross"

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


def find_sites(unet: torch.nn.Module) -> list[AttentionSite]:
    """Every attention site of a `UNet2DConditionModel`-like model, in processor-key order.

    Raises ``TypeError`` when ``unet`` has no ``attn_processors`` (it is not a diffusers UNet).
    """
    if not hasattr(unet, "attn_processors") or not hasattr(unet, "down_blocks"):
        raise TypeError(
            f"expected a diffusers UNet2DConditionModel (or a pipeline holding one as `.unet`), got {type(unet).__name__}"
        )
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


def select_sites(
    sites: list[AttentionSite],
    *,
    kind: Kind | None = None,
    places: tuple[Place, ...] | list[Place] | None = None,
    levels: tuple[int, ...] | list[int] | None = None,
) -> list[AttentionSite]:
    """The sites that match every given filter (``None`` keeps all)."""
    return [
        s
        for s in sites
        if (kind is None or s.kind == kind)
        and (places is None or s.place in places)
        and (levels is None or s.level in levels)
    ]
