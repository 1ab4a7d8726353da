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
from .flux import FLUX_NAMES, ControlledFluxAttnProcessor
from .joint import ControlledJointAttnProcessor


@dataclass(frozen=True)
class ProcessorKind:
    """A promptcontrol processor and the stock processors it stands in for."""

    name: str
    make: Callable[..., Any]  # (session, site, controllers, record_calls) -> processor
    equivalent: frozenset[str]
    replaceable: frozenset[str] = frozenset()
    refuses: Callable[[Any], str | None] = lambda module: None  # why this module's ops cannot be mirrored, or None


def _norm_across_heads(module: Any) -> str | None:
    """Sana 1.5 normalises q/k over the whole width before the head split; the AttnProcessor2_0 mirror normalises
    each head (it would fail on the shapes, or compute something else): refuse it by name."""
    norm = getattr(module, "norm_q", None)
    weight = getattr(norm, "weight", None)
    head_dim = getattr(module, "inner_dim", 0) // max(int(getattr(module, "heads", 1)), 1)
    if weight is not None and weight.numel() not in (head_dim,):
        return (
            f"this attention normalises q/k across all heads ({type(norm).__name__} over {weight.numel()} features, "
            f"e.g. Sana 1.5's qk_norm='rms_norm_across_heads'), which promptcontrol's processor does not mirror yet; "
            "use a model with per-head (or no) qk-norm"
        )
    return None


ATTENTION = ProcessorKind(
    name="attention (AttnProcessor2_0)",
    make=ControlledAttnProcessor,
    refuses=_norm_across_heads,
    # SanaAttnProcessor2_0 (Sana's cross-attention) is AttnProcessor2_0's ops without the unused prologue/epilogue
    equivalent=frozenset({"AttnProcessor2_0", "FusedAttnProcessor2_0", "SanaAttnProcessor2_0"}),
    replaceable=frozenset({"AttnProcessor", "SlicedAttnProcessor", "XFormersAttnProcessor", "AttnProcessorNPU"}),
)

JOINT_NAMES = frozenset({"JointAttnProcessor2_0", "FusedJointAttnProcessor2_0"})

JOINT = ProcessorKind(
    name="joint attention (JointAttnProcessor2_0)",
    make=ControlledJointAttnProcessor,
    equivalent=JOINT_NAMES,
)


def _self_processor(session, site, controllers, record_calls):
    """Self-attention sites: SD3.5's dual-attention ``attn2`` runs the joint processor without text, so it gets
    promptcontrol's joint processor (same ops); every other self site gets the ``AttnProcessor2_0`` mirror."""
    module = session.denoiser.get_submodule(site.module_path)  # a path walk, not a scan of every module
    current = type(getattr(module, "processor", None)).__name__
    make = ControlledJointAttnProcessor if current in JOINT_NAMES else ControlledAttnProcessor
    return make(session, site, controllers, record_calls)


SELF = ProcessorKind(
    name="self-attention (AttnProcessor2_0, or JointAttnProcessor2_0 without text)",
    make=_self_processor,
    equivalent=ATTENTION.equivalent | JOINT_NAMES,
    replaceable=ATTENTION.replaceable,
)

SUPPORTED = (
    "cross- and self-attention with diffusers' AttnProcessor2_0 (Stable Diffusion 1.x / 2.x / SDXL UNets, and the "
    "cross-attention of PixArt / Sana transformers), SD3 / SD3.5 joint attention (JointAttnProcessor2_0) and "
    "Flux.1 joint attention, double- and single-stream blocks (FluxTransformer2DModel, FluxAttnProcessor)"
)


def _not_flux1(module: Any) -> str | None:
    """Flux 2's and Flux 3's attention are other computations than FluxAttnProcessor's (Flux 2's single-stream
    blocks fuse q/k/v with the MLP input and one output projection over both; Flux 3 has its own processor):
    refuse them by name rather than run Flux.1's ops on them."""
    name = type(getattr(module, "processor", None)).__name__
    if name in FLUX_NAMES or not (name.startswith("Flux2") or name.startswith("Flux3")):
        return None  # Flux.1's own, or a custom processor the session names itself
    model = "Flux 2 (Flux2Transformer2DModel)" if name.startswith("Flux2") else "Flux 3 (transformer_flux3.py)"
    return (
        f"this is {model} attention ({type(module).__name__} with {name}), which promptcontrol does not mirror: "
        f"supported are {SUPPORTED}. Use a Flux.1 pipeline (FluxPipeline), or exclude these sites from your "
        "controllers (sites=...)"
    )


FLUX = ProcessorKind(
    name="Flux joint attention (FluxAttnProcessor)",
    make=ControlledFluxAttnProcessor,
    equivalent=FLUX_NAMES,
    refuses=_not_flux1,
)

KINDS: dict[str, ProcessorKind] = {"cross": ATTENTION, "self": SELF, "joint": JOINT}
"""Site kind -> processor kind; joint sites with the text first (Flux) get :data:`FLUX` (:func:`kind_for`)."""

OURS: tuple[type, ...] = (ControlledAttnProcessor, ControlledJointAttnProcessor, ControlledFluxAttnProcessor)
"""Every processor class of promptcontrol (to recognise one left behind by a failed restore)."""


def kind_for(site: AttentionSite) -> ProcessorKind | None:
    """The processor kind that serves ``site``, or ``None`` when promptcontrol has none for it: SD3 joint
    attention (text after the image, double-stream), Flux joint attention (text first, double- or single-stream),
    cross- and self-attention."""
    if site.kind == "joint":
        if site.text_keys == "before" and site.stream in ("double", "single"):
            return FLUX
        if site.text_keys == "after" and site.stream == "double":
            return JOINT
        return None
    return KINDS.get(site.kind)


def unserved(site: AttentionSite) -> str:
    """Why ``site`` cannot be controlled yet, naming what is supported."""
    where = f"text {site.text_keys} the image, {site.stream}-stream" if site.kind == "joint" else site.kind
    return (
        f"promptcontrol has no processor for {site.kind} attention of this layout (site {site.module_path}: "
        f"{where}); supported: {SUPPORTED}. Exclude these sites with sites=... or use a supported pipeline"
    )


def unserved_model(sites: list[AttentionSite]) -> str | None:
    """Why a denoiser cannot be controlled at all — its text reaches the image only through joint attention of a
    layout no processor here serves — or ``None``."""
    joint = [site for site in sites if site.kind == "joint" and kind_for(site) is None]
    if not joint:
        return None
    counts = ", ".join(f"{sum(s.kind == k for s in sites)} {k}" for k in sorted({s.kind for s in sites}))
    return (
        f"promptcontrol finds this transformer's attention sites ({counts}) but has no processor for the layout "
        "of its joint attention. Supported: UNet pipelines (Stable Diffusion 1.x / 2.x / SDXL), SD3 / SD3.5, "
        "Flux.1 and PixArt / Sana transformers; pc.find_sites(pipe.transformer) lists the sites"
    )
