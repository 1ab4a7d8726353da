"""One processor per site kind, each mirroring its stock diffusers processor op for op.

:func:`kind_for` says which of promptcontrol's processors serves a site, and which stock processors it stands in
for: ``equivalent`` ones compute the same function (replaced silently), ``replaceable`` ones are memory-saving or
classic variants of it (replaced with a warning, restored afterwards). Anything else at a site a controller acts on
is refused by the session (its behaviour would be lost). A site kind with no processor yet is refused with a
message naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..sites import AttentionSite
from .attention import ControlledAttnProcessor


@dataclass(frozen=True)
class ProcessorKind:
    """A promptcontrol processor and the stock processors it stands in for."""

    name: str
    make: Callable[..., Any]  # (session, site, controllers, record_calls) -> processor
    equivalent: frozenset[str]
    replaceable: frozenset[str] = frozenset()

    def is_ours(self, processor: Any) -> bool:
        return isinstance(processor, self.make) if isinstance(self.make, type) else False


ATTENTION = ProcessorKind(
    name="attention (AttnProcessor2_0)",
    make=ControlledAttnProcessor,
    equivalent=frozenset({"AttnProcessor2_0", "FusedAttnProcessor2_0"}),
    replaceable=frozenset({"AttnProcessor", "SlicedAttnProcessor", "XFormersAttnProcessor", "AttnProcessorNPU"}),
)

KINDS: dict[str, ProcessorKind] = {"cross": ATTENTION, "self": ATTENTION}
"""Site kind -> processor kind. Joint attention (SD3, Flux) is not served yet."""

OURS: tuple[type, ...] = (ControlledAttnProcessor,)
"""Every processor class of promptcontrol (to recognise one left behind by a failed restore)."""


def kind_for(site: AttentionSite) -> ProcessorKind | None:
    """The processor kind that serves ``site``, or ``None`` when promptcontrol has none for it yet."""
    return KINDS.get(site.kind)


def unserved(site: AttentionSite) -> str:
    """Why ``site`` cannot be controlled yet, naming what is supported."""
    return (
        f"promptcontrol has no processor for {site.kind} attention yet (site {site.module_path}: "
        f"{'SD3/Flux joint attention' if site.kind == 'joint' else site.kind}); supported today: cross- and "
        "self-attention with diffusers' AttnProcessor2_0 (Stable Diffusion 1.x / 2.x / SDXL UNets, and the "
        "cross-attention of PixArt / Sana transformers). Exclude these sites with sites=... or use a supported pipeline"
    )


def unserved_model(sites: list[AttentionSite]) -> str | None:
    """Why a denoiser cannot be controlled at all yet — its text reaches the image only through joint attention,
    which has no processor here yet (SD3, Flux) — or ``None``."""
    joint = [site for site in sites if site.kind == "joint" and kind_for(site) is None]
    if not joint:
        return None
    counts = ", ".join(f"{sum(s.kind == k for s in sites)} {k}" for k in sorted({s.kind for s in sites}))
    return (
        f"promptcontrol finds this transformer's attention sites ({counts}) but has no processor for its joint "
        "attention yet (SD3, Flux: the next features). For now use a UNet pipeline (Stable Diffusion 1.x / 2.x / "
        "SDXL) or a PixArt / Sana transformer; pc.find_sites(pipe.transformer) lists the sites"
    )
