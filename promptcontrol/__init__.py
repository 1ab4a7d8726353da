"""promptcontrol: record, reweight and swap the cross-attention of Stable Diffusion pipelines in diffusers.

Two groups of public names (``__all__``); everything is imported on first use, so ``import promptcontrol`` (and
the command line) start without loading torch or diffusers until a name is asked for.

- **The user's face** — the jobs and the controllers a user composes: ``load_pipeline``, ``trace``, ``control``,
  ``generate``, ``edit``, ``invert``, ``parse_prompt``, ``load_maps``; ``AttentionStore``, ``Reweight``, ``Replace``,
  ``Refine``, ``LocalBlend``, ``InjectSelf``, ``ConceptAttention``; the results ``HeatMap``, ``HeatMaps``,
  ``ConceptMaps``, ``Trace``, ``EditResult``,
  ``Inversion``, ``ParsedPrompt``, ``WeightedWord``; ``PromptControlError`` (the base of promptcontrol's own errors);
  ``testing`` (tiny offline pipelines).
- **The extension API** — for writing controllers and supporting backbones: ``Controller``, ``PassThrough``,
  ``AttentionPlan``, ``AttentionTerm``, ``StepContext``, ``AttentionSite``, ``find_sites``, ``Session``,
  ``SessionError``, ``step_filter``, ``site_filter``.
"""

from __future__ import annotations

import importlib
import warnings

__version__ = "0.1.0"

USER_FACE = {  # name -> the module that defines it
    "load_pipeline": "loading",
    "trace": "tracing",
    "Trace": "tracing",
    "control": "session",
    "generate": "generation",
    "edit": "editing",
    "EditResult": "editing",
    "invert": "inversion",
    "Inversion": "inversion",
    "parse_prompt": "prompt_syntax",
    "ParsedPrompt": "prompt_syntax",
    "WeightedWord": "prompt_syntax",
    "load_maps": "mapsets",
    "AttentionStore": "controllers",
    "Reweight": "controllers",
    "Replace": "controllers",
    "Refine": "controllers",
    "LocalBlend": "controllers",
    "InjectSelf": "controllers",
    "ConceptAttention": "controllers",
    "ConceptMaps": "controllers",
    "HeatMap": "heatmap",
    "HeatMaps": "heatmap",
    "PromptControlError": "errors",
}
EXTENSION_API = {
    "Controller": "controllers.base",
    "PassThrough": "controllers.base",
    "AttentionPlan": "plan",
    "AttentionTerm": "plan",
    "StepContext": "context",
    "AttentionSite": "sites",
    "find_sites": "sites",
    "Session": "session",
    "SessionError": "session",
    "step_filter": "schedule",
    "site_filter": "schedule",
}
_DEPRECATED = {  # not the user's face: still reachable here for one release, with a warning naming the module
    "BatchLayout": "context",
    "RunInfo": "context",
    "WeightedSpan": "prompt_syntax",
    "JobMaps": "mapsets",
    "MapSet": "mapsets",
}
_SUBMODULES = ("testing",)

__all__ = [*USER_FACE, *_SUBMODULES, *EXTENSION_API]


def __getattr__(name: str):
    if name in USER_FACE or name in EXTENSION_API:
        module = USER_FACE.get(name) or EXTENSION_API[name]
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    elif name in _DEPRECATED:
        module = _DEPRECATED[name]
        warnings.warn(
            f"promptcontrol.{name} is not part of the public face and goes in the next release; import it from "
            f"promptcontrol.{module}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(f".{module}", __name__), name)
    else:
        raise AttributeError(f"module 'promptcontrol' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__():
    return sorted({*globals(), *__all__})
