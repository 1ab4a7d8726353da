"""The processor of SD3 / SD3.5 joint attention: diffusers' ``JointAttnProcessor2_0`` op for op, plus plans.

In an MM-DiT block image and text tokens attend in ONE softmax over the keys ``[image | text]`` (SD3 order).
The controllers speak the UNet's language — plans whose per-token fields live in the text-key space (see
:mod:`promptcontrol.plan`) — and this processor carries them onto the joint softmax, for the image queries of
each row only (text queries always run their own, unchanged attention):

* a term's values: ``[v_img ; V_t]`` with ``V_t = value_map @ (value_scale * v_txt)`` — the P2P equalizer is
  ``sdpa(q_img, k, [v_img ; w·v_txt])``; the image values go with the plan's first term only (the second term of
  a refine carries just the text part of the row's own map);
* a term's logit bias (``log w``: renormalised weights) is added to the text keys' logits;
* a term's ``qk_rows`` picks whose queries/keys give the image → text logits ("cross from the source"); the
  image → image logits come from the image-side plan (self injection: ``qk_rows`` of the controllers that act on
  the site seen as self-attention, :func:`image_view`) or from the row itself. When the two rows differ, one SDPA call with
  concatenated features computes exactly that joint softmax::

      q' = [q_txtrow | q_imgrow]   k'_img = [0 | k_img,imgrow]   k'_txt = [k_txt,txtrow | 0]   scale 1/sqrt(d)

  so ``q'·k'_img = q_imgrow·k_img,imgrow`` and ``q'·k'_txt = q_txtrow·k_txt,txtrow`` under one normaliser.

Recorders get the image-query × text-key probabilities ``(B, heads, Q_img, K_txt)``, never the image × all-keys
matrix: image × text logits and an exact joint normaliser (log-sum-exp over the image keys in chunks, memory
O(Q_img × K_txt)). A recorder's ``joint_norm`` attribute chooses ``"joint"`` (the mass each pixel gives a word
inside the joint softmax; the default) or ``"text"`` (renormalised over the text keys).

Concept tokens (:class:`~promptcontrol.controllers.concept.ConceptAttention`, a controller with
``carries_concepts``): when it appended ``C`` tokens to the text stream at this step (``concept_tokens(ctx)``),
the last ``C`` text tokens are split off before anything else sees the text: the prompt's image and text queries
run exactly the path above over ``[image | prompt]`` (so the image is unchanged and plans / recorders see the
prompt only), the concept queries attend to ``[image | concepts]``, and the controller gets the image and concept
outputs (before ``to_out`` / ``to_add_out``). Without such a controller none of this runs.

SD3.5's dual-attention ``attn2`` has no text: there this processor is plain self-attention over the image tokens
(as the stock processor is) and runs plans like :class:`~promptcontrol.processors.attention.ControlledAttnProcessor`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from ..context import SessionView
from ..controllers.base import Controller
from ..plan import IDENTITY, AttentionPlan, AttentionTerm, transformed_values
from ..sites import AttentionSite
from .attention import ControlledAttnProcessor

JOINT_NORMS = ("joint", "text")


def image_view(site: AttentionSite) -> AttentionSite:
    """``site`` seen as self-attention over its image tokens (whom image → image controllers such as self
    injection act on)."""
    return dataclasses.replace(site, kind="self", text_keys=None, stream=None)


def joint_text_probs(
    q_img: torch.Tensor,  # (B, heads, Q, d)
    k_img: torch.Tensor,  # (B, heads, N_img, d)
    k_txt: torch.Tensor,  # (B, heads, K, d)
    chunk: int | None = None,
) -> torch.Tensor:  # (B, heads, Q, K) float32
    """Image-query × text-key probabilities inside the joint softmax over ``[image | text]`` keys.

    The normaliser is exact: log-sum-exp of the text logits combined with the log-sum-exp over the image keys,
    taken ``chunk`` keys at a time (default ``max(K, 64)``), so no (Q × N_img) matrix is ever held whole.
    """
    scale = q_img.shape[-1] ** -0.5
    q = q_img.float()
    logits = torch.matmul(q, k_txt.float().transpose(-1, -2)) * scale  # (B, heads, Q, K)
    lse = torch.logsumexp(logits, dim=-1)  # (B, heads, Q)
    step = chunk or max(int(k_txt.shape[2]), 64)
    for start in range(0, int(k_img.shape[2]), step):
        part = torch.matmul(q, k_img[:, :, start : start + step].float().transpose(-1, -2)) * scale
        lse = torch.logaddexp(lse, torch.logsumexp(part, dim=-1))
    return (logits - lse[..., None]).exp()


def renormalised_over_text(probs: torch.Tensor) -> torch.Tensor:
    """Joint probabilities (B, heads, Q, K) renormalised over the text keys: ``softmax`` of the text logits."""
    return probs / probs.sum(dim=-1, keepdim=True)


def padded_term(term: AttentionTerm, keys: int) -> AttentionTerm:
    """``term`` with its per-token fields extended to ``keys`` text keys.

    Word-based controllers build their tensors over the CLIP tokenizer's tokens (77); SD3's text sequence is longer
    (the T5 segment, zeros when no T5 encoder is loaded). The extra tokens behave like the last given token (a
    padding token): same value scale, identity token map, no logit bias.
    """
    def width(t: torch.Tensor | None) -> int:
        return keys if t is None else int(t.shape[-1])

    size = min(width(term.value_scale), width(term.value_map), width(term.logit_bias))
    if size == keys:
        return term
    if size > keys:
        raise ValueError(f"a plan at a joint site covers {size} text tokens but the site has only {keys}")
    extra = keys - size
    scale, mapping, bias = term.value_scale, term.value_map, term.logit_bias
    if scale is not None and scale.shape[-1] < keys:
        scale = torch.cat([scale, scale[:, -1:].expand(-1, extra)], dim=-1)
    if mapping is not None and mapping.shape[-1] < keys:
        batch = mapping.shape[0]
        full = torch.eye(keys, dtype=mapping.dtype, device=mapping.device).repeat(batch, 1, 1)
        full[:, :size, :size] = mapping
        mapping = full
    if bias is not None and bias.shape[-1] < keys:
        bias = torch.cat([bias, bias.new_zeros(bias.shape[0], extra)], dim=-1)
    return dataclasses.replace(term, value_scale=scale, value_map=mapping, logit_bias=bias)


def _rows(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return t if rows is None else t[rows]


def joint_term(
    q_img: torch.Tensor,  # (B, heads, Q, d)
    k_img: torch.Tensor,  # (B, heads, N_img, d)
    k_txt: torch.Tensor,  # (B, heads, K, d)
    v_img: torch.Tensor,  # (B, heads, N_img, d): the image values this term uses
    v_txt: torch.Tensor,  # (B, heads, K, d): the text values this term uses
    text_rows: torch.Tensor | None,  # (B,) rows giving the image→text logits (None: own)
    image_rows: torch.Tensor | None,  # (B,) rows giving the image→image logits (None: own)
    logit_bias: torch.Tensor | None,  # (B, K) added to the text logits
    text_first: bool = False,
) -> torch.Tensor:  # (B, heads, Q, d)
    """One joint-softmax SDPA call for the image queries: text logits from ``text_rows``, image logits from
    ``image_rows``, one normaliser; concatenated features (head dim 2d, scale 1/sqrt(d)) when the rows differ."""
    d = q_img.shape[-1]
    if text_rows is None and image_rows is None or text_rows is image_rows:
        q = _rows(q_img, text_rows)
        ki, kt = _rows(k_img, text_rows), _rows(k_txt, text_rows)
    else:
        qt, qi = _rows(q_img, text_rows), _rows(q_img, image_rows)
        q = torch.cat([qt, qi], dim=-1)  # (B, heads, Q, 2d)
        ki_rows = _rows(k_img, image_rows)
        kt_rows = _rows(k_txt, text_rows)
        ki = torch.cat([torch.zeros_like(ki_rows), ki_rows], dim=-1)  # (B, heads, N_img, 2d)
        kt = torch.cat([kt_rows, torch.zeros_like(kt_rows)], dim=-1)  # (B, heads, K, 2d)
    mask = None
    if logit_bias is not None:
        bias = logit_bias.to(q.dtype)  # (B, K)
        zeros = bias.new_zeros(bias.shape[0], k_img.shape[2])
        mask = torch.cat([bias, zeros] if text_first else [zeros, bias], dim=-1)[:, None, None, :]
    keys = torch.cat([kt, ki] if text_first else [ki, kt], dim=2)
    values = torch.cat([v_txt, v_img] if text_first else [v_img, v_txt], dim=2)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=0.0, scale=d**-0.5)


def concept_attention(
    q_c: torch.Tensor,  # (B, heads, C, d): concept queries
    k_img: torch.Tensor,  # (B, heads, N_img, d)
    v_img: torch.Tensor,  # (B, heads, N_img, d)
    k_c: torch.Tensor,  # (B, heads, C, d)
    v_c: torch.Tensor,  # (B, heads, C, d)
) -> torch.Tensor:  # (B, heads, C, d)
    """Concept tokens' attention (ConceptAttention): to the image tokens and to themselves, never to the prompt."""
    keys = torch.cat([k_img, k_c], dim=2)
    values = torch.cat([v_img, v_c], dim=2)
    return F.scaled_dot_product_attention(q_c, keys, values, dropout_p=0.0, is_causal=False)


def image_rows_of(plan: AttentionPlan) -> torch.Tensor | None:
    """The rows whose image → image logits each row uses, from the image-side plan (self injection)."""
    if plan.is_identity:
        return None
    if len(plan.terms) != 1 or plan.terms[0].value_scale is not None or plan.terms[0].value_map is not None or (
        plan.terms[0].logit_bias is not None
    ):
        raise NotImplementedError(
            "at SD3 joint-attention sites the image → image part takes only self injection (the queries and keys "
            "of another row, e.g. pc.InjectSelf); value scales, token maps and logit biases on image keys are not "
            "supported there"
        )
    return plan.terms[0].qk_rows


def run_joint_plan(
    plan: AttentionPlan,
    image_rows: torch.Tensor | None,
    q_img: torch.Tensor,  # (B, heads, Q, d)
    k_img: torch.Tensor,  # (B, heads, N_img, d)
    v_img: torch.Tensor,  # (B, heads, N_img, d)
    k_txt: torch.Tensor,  # (B, heads, K, d)
    v_txt: torch.Tensor,  # (B, heads, K, d)
    text_first: bool = False,
) -> torch.Tensor:  # (B, heads, Q, d)
    """The image queries' output under a text-space ``plan`` and the image-side rows, one SDPA call per term."""
    keys = int(k_txt.shape[2])
    out = None
    for index, term in enumerate(plan.terms):
        term = padded_term(term, keys)
        values_img = v_img if index == 0 else torch.zeros_like(v_img)
        o = joint_term(
            q_img, k_img, k_txt, values_img, transformed_values(term, v_txt), term.qk_rows, image_rows,
            term.logit_bias, text_first,
        )
        out = o if out is None else out + o
    return out


class ControlledJointAttnProcessor:
    """The processor installed at each controlled SD3 joint-attention site (and SD3.5's ``attn2``)."""

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
        self._record = record_calls if record_calls is not None else {id(c): c.record for c in controllers}
        self._self_attention = ControlledAttnProcessor(session, site, controllers, self._record)  # for attn2
        self.text_first = site.text_keys == "before"
        self.image_site = image_view(site) if site.kind == "joint" else site
        # Controllers that act on the site seen as self-attention (self injection, PassThrough) plan its image →
        # image part; the others (recorders, weights, edits) its image → text part. Any of them may record.
        joint = site.kind == "joint"
        self.image_controllers = [c for c in controllers if joint and c.applies_to(self.image_site)]
        image_ids = {id(c) for c in self.image_controllers}
        self.text_controllers = [c for c in controllers if id(c) not in image_ids]
        # Concept controllers (ConceptAttention) append tokens to the text stream; only they get the concept path.
        self.concept_carriers = [c for c in controllers if joint and getattr(c, "carries_concepts", False)]

    # ---- projections (the stock ops, plain or fused) ----------------------------------------------------------
    @staticmethod
    def _sample_projections(attn, hidden_states):
        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)

    @staticmethod
    def _context_projections(attn, encoder_hidden_states):
        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
            return attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        return (
            attn.add_q_proj(encoder_hidden_states),
            attn.add_k_proj(encoder_hidden_states),
            attn.add_v_proj(encoder_hidden_states),
        )

    # ---- attention ---------------------------------------------------------------------------------------------
    def _attend_self(self, query, key, value):
        """Plain self-attention over image tokens (SD3.5's ``attn2``) under the controllers' plan: the same call as
        at any self site, so the ``AttnProcessor2_0`` mirror's attention (per-step plans, recorders) runs it."""
        return self._self_attention._attend(query, key, value, None)

    def _stock_joint(self, parts):
        """The stock call: one SDPA over the concatenated sequence, split back into (image, text) outputs."""
        q_img, k_img, v_img, q_txt, k_txt, v_txt = parts
        order = (lambda a, b: [b, a]) if self.text_first else (lambda a, b: [a, b])
        query = torch.cat(order(q_img, q_txt), dim=2)
        key = torch.cat(order(k_img, k_txt), dim=2)
        value = torch.cat(order(v_img, v_txt), dim=2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        n_txt = q_txt.shape[2]
        if self.text_first:
            return out[:, :, n_txt:], out[:, :, :n_txt]
        return out[:, :, : q_img.shape[2]], out[:, :, q_img.shape[2] :]

    def _record_probs(self, recorders, ctx, plan, q_img, k_img, k_txt) -> None:
        """Hand each recorder the image × text probabilities in the normalisation it asked for."""
        joint = joint_text_probs(q_img, k_img, k_txt)  # (B, heads, Q_img, K_txt)
        text = None
        for recorder in recorders:
            norm = getattr(recorder, "joint_norm", "joint")
            if norm == "text":
                text = renormalised_over_text(joint) if text is None else text
                probs = text
            elif norm == "joint":
                probs = joint
            else:
                raise ValueError(f"{type(recorder).__name__}.joint_norm must be one of {JOINT_NORMS}, got {norm!r}")
            self._record[id(recorder)](self.site, ctx, probs, plan)

    def _attend_joint(self, parts):
        """(image output, text output), each (B, heads, tokens, d), under the controllers' plans; with concept
        tokens at the end of the text stream when a concept controller appended them at this step."""
        ctx = self.session.context
        if self.concept_carriers:
            count = max(c.concept_tokens(ctx) for c in self.concept_carriers)
            if count:
                return self._attend_with_concepts(parts, count, ctx)
        return self._attend_prompt(parts, ctx)

    def _attend_with_concepts(self, parts, count: int, ctx):
        """The prompt's attention without the last ``count`` text tokens (the concepts: no image or text query
        sees them), and the concept queries' attention over ``[image | concepts]`` keys, handed to the concept
        controllers; the text output gets the concept outputs back at its end."""
        q_img, k_img, v_img, q_txt, k_txt, v_txt = parts
        n = int(q_txt.shape[2]) - count
        if n <= 0:
            raise ValueError(f"{self.site.module_path}: {count} concept tokens but only {q_txt.shape[2]} text tokens")
        prompt = (q_img, k_img, v_img, q_txt[:, :, :n], k_txt[:, :, :n], v_txt[:, :, :n])
        out_img, out_txt = self._attend_prompt(prompt, ctx)
        out_concepts = concept_attention(q_txt[:, :, n:], k_img, v_img, k_txt[:, :, n:], v_txt[:, :, n:])
        for carrier in self.concept_carriers:
            if carrier.wants_concepts(self.site, ctx):
                carrier.record_concepts(self.site, ctx, out_img, out_concepts)
        return out_img, torch.cat([out_txt, out_concepts], dim=2)

    def _attend_prompt(self, parts, ctx):
        """(image output, text output) of the prompt's tokens under the controllers' plans (the stock call when
        nothing changes)."""
        if ctx is None or not self.controllers:
            return self._stock_joint(parts)
        plan = IDENTITY
        for controller in self.text_controllers:
            plan = controller.plan(self.site, ctx, plan)
        recorders = [c for c in self.controllers if c.wants_probs(self.site, ctx)]
        image_plan = IDENTITY
        for controller in self.image_controllers:
            image_plan = controller.plan(self.image_site, ctx, image_plan)
        q_img, k_img, v_img, q_txt, k_txt, v_txt = parts
        if recorders:
            self._record_probs(recorders, ctx, plan, q_img, k_img, k_txt)
        if plan.is_identity and image_plan.is_identity:
            return self._stock_joint(parts)
        order = (lambda a, b: [b, a]) if self.text_first else (lambda a, b: [a, b])
        key = torch.cat(order(k_img, k_txt), dim=2)
        value = torch.cat(order(v_img, v_txt), dim=2)
        out_txt = F.scaled_dot_product_attention(q_txt, key, value, dropout_p=0.0, is_causal=False)
        out_img = run_joint_plan(plan, image_rows_of(image_plan), q_img, k_img, v_img, k_txt, v_txt, self.text_first)
        return out_img, out_txt

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ):
        # The ops are JointAttnProcessor2_0's (which also ignores attention_mask), in the same order.
        batch_size = hidden_states.shape[0]
        query, key, value = self._sample_projections(attn, hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, N_img, d)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is None:
            out = self._attend_self(query, key, value)
            out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
            out = attn.to_out[0](out)
            return attn.to_out[1](out)

        q_txt, k_txt, v_txt = self._context_projections(attn, encoder_hidden_states)
        q_txt = q_txt.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, K, d)
        k_txt = k_txt.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        v_txt = v_txt.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_added_q is not None:
            q_txt = attn.norm_added_q(q_txt)
        if attn.norm_added_k is not None:
            k_txt = attn.norm_added_k(k_txt)

        out_img, out_txt = self._attend_joint((query, key, value, q_txt, k_txt, v_txt))
        hidden_states = out_img.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        encoder_hidden_states = out_txt.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        encoder_hidden_states = encoder_hidden_states.to(query.dtype)
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states, encoder_hidden_states
