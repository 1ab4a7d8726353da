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
    broadcasting shapes done once); a plan object the controllers hand out again at the next step (an edit whose
    windows did not change) keeps its prepared form. Everything else is dropped when the step context changes.
    """

    def __init__(self):
        self.ctx: StepContext | None = None
        self.plans: dict[tuple, AttentionPlan] = {}
        self.shared: dict[tuple, tuple[AttentionPlan, tuple[PreparedTerm, ...] | None]] = {}
        self.prepared: dict[tuple, tuple[AttentionPlan, tuple[PreparedTerm, ...]]] = {}  # (id, dtype) -> (plan, terms)
        self._last_prepared: dict[tuple, tuple[AttentionPlan, tuple[PreparedTerm, ...]]] = {}

    def _current(self, ctx: StepContext) -> None:
        if ctx is not self.ctx:
            self.ctx, self.plans, self.shared = ctx, {}, {}
            self._last_prepared, self.prepared = self.prepared, {}

    def plan(self, ctx: StepContext, key: tuple, compose: Callable[[StepContext], AttentionPlan]) -> AttentionPlan:
        self._current(ctx)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = compose(ctx)
        return plan

    def plan_and_terms(
        self, ctx: StepContext, key: tuple, compose: Callable[[StepContext], AttentionPlan], dtype: torch.dtype
    ) -> tuple[AttentionPlan, tuple[PreparedTerm, ...] | None]:
        """The step's shared plan of ``key`` and its prepared terms for ``dtype`` (``None`` for the identity): one
        dictionary look-up per site once the first site of the step made them."""
        if ctx is not self.ctx:
            self._current(ctx)
        entry = self.shared.get((key, dtype))
        if entry is None:
            plan = self.plan(ctx, key, compose)
            entry = self.shared[(key, dtype)] = (plan, None if plan is IDENTITY else self.terms(ctx, plan, dtype))
        return entry

    def terms(self, ctx: StepContext, plan: AttentionPlan, dtype: torch.dtype) -> tuple[PreparedTerm, ...]:
        self._current(ctx)
        key = (id(plan), dtype)
        entry = self.prepared.get(key)
        if entry is None:
            entry = self._last_prepared.get(key)
            if entry is None or entry[0] is not plan:  # the plan is kept in the entry: its id stays valid
                entry = (plan, prepare(plan, dtype))
            self.prepared[key] = entry
        return entry[1]


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
        if torch.compiler.is_compiling():
            return self._attend_traced(ctx, query, key, value, attention_mask)
        terms = None
        if not self._planners:
            plan = IDENTITY
        elif self._shared:  # composed and prepared once per step, at the first of the sites that share it
            plan, terms = self._steps.plan_and_terms(ctx, self._plan_key, self._compose, query.dtype)
        else:
            plan = self._compose(ctx)
        if self._askers:
            recorders = [record for wants, record in self._askers if wants(self.site, ctx)]
            if recorders:
                return self._record_and_attend(recorders, ctx, plan, query, key, value, attention_mask)
        if plan is IDENTITY:
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
        if terms is None:
            terms = self._steps.terms(ctx, plan, query.dtype)
        return run_prepared(terms, query, key, value, attention_mask)

    def _record_and_attend(self, recorders, ctx, plan, query, key, value, attention_mask):
        """Materialise the probabilities, hand them to ``recorders``, and attend with them under ``plan``."""
        probs = attention_probs(query, key, attention_mask)  # (B, heads, Q, K) float32
        for record in recorders:
            record(self.site, ctx, probs, plan)
        return run_plan_on_probs(plan, probs, value)

    def _attend_traced(self, ctx, query, key, value, attention_mask):
        """:meth:`_attend` while torch.compile traces: the plan is composed in the graph (traced once; the per-step
        caches would guard on the step) and run unprepared."""
        plan = self._compose(ctx) if self._planners else IDENTITY
        recorders = [record for wants, record in self._askers if wants(self.site, ctx)] if self._askers else None
        if recorders:
            return self._record_and_attend(recorders, ctx, plan, query, key, value, attention_mask)
        if plan is IDENTITY:
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
        return run_plan(plan, query, key, value, attention_mask)

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
