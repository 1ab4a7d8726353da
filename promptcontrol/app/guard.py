"""What a request may change on a pipeline, by identity — so the app can check that it changed nothing.

A ``pc.control`` session installs attention processors, forward hooks and instance attributes that shadow
methods (``encode_prompt``, ``scheduler.set_timesteps`` / ``step``) and restores them when it ends. The app
takes a :func:`pipeline_state` before each request and compares it after, also when the request failed or was
stopped, and refuses to go on quietly if anything stayed.
"""

from __future__ import annotations

from typing import Any


class PipelineLeftChanged(RuntimeError):
    """A request left something installed on the pipeline (a bug in promptcontrol: please report it)."""


def _shadowed_methods(obj: Any) -> set[str]:
    """Instance attributes of ``obj`` that hide a method of its class (how a session wraps a method)."""
    return {name for name, value in vars(obj).items() if callable(value) and callable(getattr(type(obj), name, None))}


def _hooks(module) -> dict[str, tuple]:
    """Forward hooks of every submodule that has any: ``{path: (pre, pre with kwargs, post, post with kwargs)}``."""
    found = {}
    for name, sub in module.named_modules():
        hooks = (
            tuple(sub._forward_pre_hooks.items()),
            tuple(sub._forward_pre_hooks_with_kwargs.items()),
            tuple(sub._forward_hooks.items()),
            tuple(sub._forward_hooks_with_kwargs.items()),
        )
        if any(hooks):
            found[name or "<unet>"] = hooks
    return found


def pipeline_state(pipe) -> dict[str, Any]:
    """Processors (by identity), forward hooks, shadowed methods and promptcontrol marks of a pipeline."""
    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
    owners = {"pipe": pipe, "unet": unet, "scheduler": getattr(pipe, "scheduler", None)}
    return {
        "processors": {key: id(p) for key, p in unet.attn_processors.items()},
        "hooks": _hooks(pipe.unet),
        "shadowed": {name: sorted(_shadowed_methods(obj)) for name, obj in owners.items() if obj is not None},
        "marks": sorted(n for n in vars(unet) if n.startswith("_promptcontrol")),
    }


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What changed between two :func:`pipeline_state` snapshots, in words (empty when nothing did)."""
    changed = []
    moved = [k for k in before["processors"] if after["processors"].get(k) != before["processors"][k]]
    if moved or set(after["processors"]) != set(before["processors"]):
        changed.append(f"{len(moved)} attention processor(s) replaced (first: {moved[0] if moved else '?'})")
    if after["hooks"] != before["hooks"]:
        changed.append(f"forward hooks on {sorted(set(after['hooks']) ^ set(before['hooks'])) or 'the same modules'}")
    if after["shadowed"] != before["shadowed"]:
        changed.append(f"wrapped methods: {after['shadowed']}")
    if after["marks"] != before["marks"]:
        changed.append(f"session marks on the UNet: {after['marks']}")
    return changed
