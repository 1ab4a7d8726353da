"""One attention processor that reproduces diffusers' ``AttnProcessor2_0`` and asks its controllers what to do.

With no controller wanting anything, it runs exactly the ops of ``AttnProcessor2_0`` (same SDPA call), so
outputs match stock diffusers. Otherwise it runs the controllers' fused plan on SDPA, and materialises the
softmax only when a recorder asked for it at this site and step. Fused QKV projections
(``fuse_qkv_projections``) are supported.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..context import SessionView
from ..controllers.base import Controller
from ..plan import IDENTITY, attention_probs, run_plan, run_plan_on_probs
from ..sites import AttentionSite


class ControlledAttnProcessor:
    """The processor installed at each controlled site for the length of a session."""

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
        if ctx is None or not self.controllers:
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
        plan = IDENTITY
        recorders = []
        for controller in self.controllers:
            plan = controller.plan(self.site, ctx, plan)
            if controller.wants_probs(self.site, ctx):
                recorders.append(controller)
        if not recorders:
            if plan.is_identity:
                return F.scaled_dot_product_attention(
                    query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
                )
            return run_plan(plan, query, key, value, attention_mask)
        probs = attention_probs(query, key, attention_mask)  # (B, heads, Q, K) float32
        for recorder in recorders:
            self._record[id(recorder)](self.site, ctx, probs, plan)
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
