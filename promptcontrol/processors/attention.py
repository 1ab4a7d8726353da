"""One attention processor that reproduces diffusers' ``AttnProcessor2_0`` and asks its controllers what to do.

With no controller wanting anything, it runs exactly the ops of ``AttnProcessor2_0`` (same SDPA call), so
outputs match stock diffusers. Otherwise it runs the controllers' fused plan on SDPA, and materialises the
softmax only when a recorder asked for it at this site and step. Fused QKV projections
(``fuse_qkv_projections``) are supported.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn.functional as F

from ..context import SessionView, StepContext
from ..controllers.base import Controller
from ..plan import IDENTITY, AttentionPlan, PreparedTerm, attention_probs, prepare, run_plan, run_plan_on_probs, run_prepared
from ..sites import AttentionSite


class StepPlans:
    """The plans of one session's current step, shared by its processors.

    A controller whose ``plan_per_step`` is true returns the same plan at every site it acts at (given the same
    plan so far): the processors of sites with the same such controllers then compose the plan once per step, at
    the first of those sites, instead of once per site. Each plan is also kept prepared per dtype (casts and
    broadcasting shapes done once). Everything is dropped when the step context changes.
    """

    def __init__(self):
        self.ctx: StepContext | None = None
        self.plans: dict[tuple, AttentionPlan] = {}
        self.prepared: dict[tuple, tuple[PreparedTerm, ...]] = {}

    def _current(self, ctx: StepContext) -> None:
        if ctx is not self.ctx:
            self.ctx, self.plans, self.prepared = ctx, {}, {}

    def plan(self, ctx: StepContext, key: tuple, compose: Callable[[StepContext], AttentionPlan]) -> AttentionPlan:
        self._current(ctx)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = compose(ctx)
        return plan

    def terms(self, ctx: StepContext, plan: AttentionPlan, dtype: torch.dtype) -> tuple[PreparedTerm, ...]:
        self._current(ctx)
        key = (id(plan), dtype)
        terms = self.prepared.get(key)
        if terms is None:
            terms = self.prepared[key] = prepare(plan, dtype)
            self.plans[("keep", id(plan))] = plan  # keeps the id valid for the step
        return terms


_STEP_PLANS: "weakref.WeakKeyDictionary[object, StepPlans]" = weakref.WeakKeyDictionary()


def step_plans(session: SessionView) -> StepPlans:
    """The :class:`StepPlans` of ``session`` (one per session; gone with it)."""
    try:
        plans = _STEP_PLANS.get(session)
        if plans is None:
            plans = _STEP_PLANS[session] = StepPlans()
    except TypeError:  # a stand-in session that takes no weak reference: this processor's own
        plans = StepPlans()
    return plans


def _overrides(controller: Controller, name: str) -> bool:
    return getattr(type(controller), name, None) is not getattr(Controller, name)


class ControlledAttnProcessor:
    """The processor installed at each controlled site for the length of a session.

    Decided once, here: which controllers plan (``plan`` overridden) and which may ask for probabilities
    (``wants_probs`` overridden); the others cost nothing per call. Per call: the step's plan (composed once per
    step and shared across sites where every planner is ``plan_per_step``), and the recorders that ask.
    """

    def __init__(
        self,
        session: SessionView,
        site: AttentionSite,
        controllers: list[Controller],
        record_calls: dict[int, Callable[..., None]] | None = None,
    ):
        self.session = session
        self.site = site
        self.controllers = controllers
        # id(controller) -> record(site, ctx, probs, plan), from the session (which adapts older recorders once)
        self._record = record_calls if record_calls is not None else {id(c): c.record for c in controllers}
        self._planners = tuple(c for c in controllers if _overrides(c, "plan"))
        self._askers = tuple((c.wants_probs, self._record[id(c)]) for c in controllers if _overrides(c, "wants_probs"))
        self._idle = not self._planners and not self._askers  # e.g. PassThrough: stock SDPA
        self._shared = bool(self._planners) and all(getattr(c, "plan_per_step", False) for c in self._planners)
        self._plan_key = tuple(id(c) for c in self._planners)
        self._steps = step_plans(session)

    def _compose(self, ctx: StepContext) -> AttentionPlan:
        """Every planner's say at this site and step, in order."""
        plan = IDENTITY
        for controller in self._planners:
            plan = controller.plan(self.site, ctx, plan)
        return IDENTITY if plan.is_identity else plan

    def _projections(self, attn, hidden_states, encoder_hidden_states):
        """q, k, v as (B, tokens, inner), with or without fused projections."""
        if getattr(attn, "fused_projections", False):
            if encoder_hidden_states is None:
                return attn.to_qkv(hidden_states).chunk(3, dim=-1)
            query = attn.to_q(hidden_states)
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
            return query, key, value
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        return query, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)

    def _attend(self, query, key, value, attention_mask):
        """Attention (B, heads, Q, d) under the controllers' plan for this site and step."""
        ctx = self.session.context
        if ctx is None or self._idle:
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
        # under torch.compile the plan is composed in the graph (traced once; the caches would guard on the step)
        compiling = torch.compiler.is_compiling()
        if not self._planners:
            plan = IDENTITY
        elif self._shared and not compiling:
            plan = self._steps.plan(ctx, self._plan_key, self._compose)
        else:
            plan = self._compose(ctx)
        recorders = [record for wants, record in self._askers if wants(self.site, ctx)] if self._askers else None
        if not recorders:
            if plan is IDENTITY:
                return F.scaled_dot_product_attention(
                    query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
                )
            if compiling:
                return run_plan(plan, query, key, value, attention_mask)
            return run_prepared(self._steps.terms(ctx, plan, query.dtype), query, key, value, attention_mask)
        probs = attention_probs(query, key, attention_mask)  # (B, heads, Q, K) float32
        for record in recorders:
            record(self.site, ctx, probs, plan)
        return run_plan_on_probs(plan, probs, value)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        # The prologue and epilogue are AttnProcessor2_0's, op for op.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query, key, value = self._projections(attn, hidden_states, encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, Q, d)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, K, d)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, K, d)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self._attend(query, key, value, attention_mask)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states
