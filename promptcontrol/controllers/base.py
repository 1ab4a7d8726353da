"""The controller protocol: what a controller may say at each attention site and step.

A controller is consulted by the processor of every site it ``applies_to``. At each call it can

* change the fused :class:`~promptcontrol.plan.AttentionPlan` (``plan``): per-token value scales, logit biases,
  token-mixing maps, or queries/keys taken from another batch row — all run on SDPA kernels;
* ask for the explicit attention probabilities (``wants_probs`` → ``record``), which makes that one site
  compute softmax explicitly at that step;
* change the text features going into the denoiser (``transform_context``), any of its keyword inputs
  (``transform_inputs``: SDXL's pooled embeddings in ``added_cond_kwargs``, a transformer's ``pooled_projections``)
  or the latents after each scheduler step (``transform_latents``);
* change an attribute of the pipeline or its parts for the session's length through ``session.patch(obj, name,
  value)`` in :meth:`bind` (the session puts it back, whatever happens: a controller never restores by itself).

Order: controllers are consulted in the order given to :func:`promptcontrol.control`; each ``plan`` receives the
plan the previous one returned (so a reweight given after a replace scales the replaced map, as in
prompt-to-prompt). Recorders see each row's own probabilities, before any controller changed them.
Per-call tensors (a weight vector, a token map) should be built once per step in ``begin_step`` and reused at
every site, not rebuilt per layer.

Binding: a controller object serves one active session at a time (``bind`` gives it that session's tokenizer,
pipeline and state). The session marks it while active (:func:`claim` / :func:`release`) and refuses a controller
that another active session holds; after a session ends the same controller may be used again.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable

import torch

from ..context import SessionView, StepContext
from ..plan import AttentionPlan
from ..sites import AttentionSite



class Controller:
    """Base class of every controller; every hook is optional and does nothing by default."""

    plan_per_step: bool = False
    """True when :meth:`plan` returns the same plan at every site the controller acts at within a step (given the
    same incoming plan): the processors then compose it once per step and share it across sites (host cost per
    attention call; see processors/attention.py). Leave False when the plan depends on the site."""

    def applies_to(self, site: AttentionSite) -> bool:
        """Whether this controller acts at ``site`` at all (decided once, when the session installs, after
        :meth:`bind`, so ``session.sites`` may be consulted)."""
        return site.attends_text

    def bind(self, session: SessionView) -> None:
        """Called once when the session installs; validate against ``session.pipe`` / tokenizer here."""

    def unbind(self) -> None:
        """Called once when the session ends (normally or not); drop references to the session here."""

    def begin_step(self, ctx: StepContext) -> None:
        """Called before each UNet call."""

    def end_step(self, ctx: StepContext) -> None:
        """Called after each UNet call."""

    def transform_context(self, ctx: StepContext, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Text features ``(B, K, D)`` going into the UNet at this step; return them changed or as they are."""
        return encoder_hidden_states

    def transform_inputs(self, ctx: StepContext, inputs: dict[str, Any]) -> dict[str, Any]:
        """The denoiser's inputs at this step by parameter name (``sample``/``hidden_states``, ``timestep``,
        ``encoder_hidden_states``, ``added_cond_kwargs``, ...), after every ``transform_context``; return a dict
        (changed copies, never mutate the tensors in place) or ``inputs`` as it is."""
        return inputs

    def transform_latents(self, ctx: StepContext, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(B_images, C, h, w)`` right after the scheduler step; return them changed or as they are."""
        return latents

    def wants_probs(self, site: AttentionSite, ctx: StepContext) -> bool:
        """Whether this site must materialise its probabilities at this step (for :meth:`record`)."""
        return False

    def record(self, site: AttentionSite, ctx: StepContext, probs: torch.Tensor, plan: AttentionPlan) -> None:
        """Receive the probabilities ``(B, heads, Q, K)`` (float32; each row's own attention, rows sum to 1) and the
        plan composed by every controller at this site and step (what the rows then ran: ``plan.probs_used(probs)``
        gives the maps the rows used after the edits)."""

    def plan(self, site: AttentionSite, ctx: StepContext, plan: AttentionPlan) -> AttentionPlan:
        """The fused plan at this site and step, given the plan so far."""
        return plan

    @property
    def uses_latents(self) -> bool:
        """Whether :meth:`transform_latents` is overridden (the session then wraps the scheduler step)."""
        return type(self).transform_latents is not Controller.transform_latents

    @property
    def uses_inputs(self) -> bool:
        """Whether :meth:`transform_inputs` is overridden."""
        return type(self).transform_inputs is not Controller.transform_inputs

    @property
    def uses_context(self) -> bool:
        """Whether :meth:`transform_context` is overridden."""
        return type(self).transform_context is not Controller.transform_context


class PassThrough(Controller):
    """Acts at every site (self- and cross-attention) and changes nothing: the benchmark of pure overhead."""

    def applies_to(self, site: AttentionSite) -> bool:
        return True


_BOUND_TO = "_promptcontrol_bound_to"


def bound_session(controller: Controller) -> SessionView | None:
    """The active session ``controller`` is bound to, or ``None``."""
    return getattr(controller, _BOUND_TO, None)


def claim(controller: Controller, session: SessionView) -> None:
    """Mark ``controller`` as bound to ``session`` (works on frozen dataclasses too)."""
    object.__setattr__(controller, _BOUND_TO, session)


def release(controller: Controller) -> None:
    """Drop the mark set by :func:`claim`, if any."""
    if _BOUND_TO in getattr(controller, "__dict__", {}):
        object.__delattr__(controller, _BOUND_TO)


def check_controller(obj: object) -> Controller:
    """``obj`` if it is a controller, else a ``TypeError`` saying what is accepted."""
    if not isinstance(obj, Controller):
        raise TypeError(
            f"expected a promptcontrol controller (a subclass of promptcontrol.Controller, e.g. "
            f"pc.AttentionStore, pc.Reweight, pc.Replace), got {type(obj).__name__}: {obj!r}"
        )
    return obj


def recorder_call(controller: Controller) -> Callable[..., None]:
    """``controller.record`` as ``f(site, ctx, probs, plan)``; a recorder written for the older three-argument
    ``record(site, ctx, probs)`` still works, with a ``DeprecationWarning`` (the session asks once per controller)."""
    record = controller.record
    try:
        parameters = inspect.signature(record).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: assume the current protocol
        return record
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 4 or any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return record
    warnings.warn(
        f"{type(controller).__name__}.record(site, ctx, probs) takes no plan: the protocol now calls "
        "record(site, ctx, probs, plan) (the plan composed at that site); add the argument. "
        "The three-argument form is accepted until the next release",
        DeprecationWarning,
        stacklevel=4,
    )
    return lambda site, ctx, probs, plan: record(site, ctx, probs)
