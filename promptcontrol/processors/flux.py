"""The processor of Flux.1 attention: diffusers' ``FluxAttnProcessor`` op for op, plus plans, at both block kinds.

Flux orders the joint sequence ``[text | image]``, in both of its block kinds:

* double-stream blocks (``transformer_blocks.N.attn``): image tokens through ``to_q/k/v``, text tokens through
  ``add_q/k/v_proj`` (each with its RMS qk-norm), concatenated text first;
* single-stream blocks (``single_transformer_blocks.N.attn``): the block concatenates ``[text | image]`` before
  its norm and calls the attention with that one sequence and no ``encoder_hidden_states``: the processor is never
  told where the text ends. promptcontrol reads it from the transformer's own call: the session's step context
  carries ``text_length`` = ``encoder_hidden_states.shape[1]`` of the ``FluxTransformer2DModel`` call (the
  ``context_embedder`` keeps the length), the same number ``FluxSingleTransformerBlock`` splits at.

Rotary embeddings cover the whole sequence (``txt_ids`` then ``img_ids``) and are applied before the split, so
the parts below are the rotated queries and keys, exactly those the stock softmax sees.

The controllers' plans (per-token fields in the text-key space, see :mod:`promptcontrol.processors.joint`) run
on the image queries through joint.py's executors in Flux order (``text_first=True``): the equalizer is
``sdpa(q_img, [k_txt ; k_img], [w·v_txt ; v_img])``, renormalised weights a ``log w`` bias on the text keys,
Replace / Refine and self injection the concatenated-features call documented in joint.py. The text queries run
the plain call. Recorders get image-query × text-key probabilities with joint.py's exact chunked normaliser
(``joint_norm`` ``"joint"`` or ``"text"``), never the image × all-keys matrix.

With no plan and no recorder at a step the processor makes the stock call, ``dispatch_attention_fn`` with the
backend the user set (``model.set_attention_backend``), so pass-through output is the stock output.

Concept tokens (:class:`~promptcontrol.controllers.concept.ConceptAttention`): when it appended ``C`` tokens to
the text at this step, both block kinds see ``[prompt | concepts | image]`` (the concepts' rotary positions are
zeros, as the text's). Double-stream blocks know the whole text length from ``encoder_hidden_states``;
single-stream blocks add ``C`` to ``StepContext.text_length`` (read from the pipeline's call, before the concepts
were appended). The processor cuts the concepts out: the prompt's image and text queries run the path above over
``[prompt | image]`` (stock, plans, recorders: exactly as without concepts), the concept queries attend to
``[image | concepts]`` (joint.py's ``concept_attention``), the concept controllers get the image and concept
outputs, and the concept outputs go back to their place in the sequence (to ``to_add_out`` in double-stream
blocks, to the block's ``proj_out`` in single-stream ones).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from ..context import SessionView
from ..controllers.base import Controller
from ..plan import IDENTITY
from ..sites import AttentionSite
from .joint import ControlledJointAttnProcessor, concept_attention, image_rows_of, run_joint_plan

FLUX_NAMES = frozenset({"FluxAttnProcessor", "FluxAttnProcessor2_0", "FusedFluxAttnProcessor2_0"})
"""Stock processors this one mirrors (the ``*2_0`` names are 0.42's deprecated aliases, which build a
``FluxAttnProcessor``; ``fuse_qkv_projections`` keeps that processor and sets ``attn.fused_projections``)."""


def flux_projections(attn, hidden_states, encoder_hidden_states):
    """q, k, v of ``hidden_states`` and of the text (``None`` in single-stream blocks), each (B, tokens, inner):
    diffusers' ``_get_qkv_projections``, plain or fused."""
    text = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
            return (query, key, value, *attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1))
        return query, key, value, None, None, None
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    if not text:
        return query, key, value, None, None, None
    return (
        query, key, value,
        attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
        attn.add_v_proj(encoder_hidden_states),
    )


def split_text_first(x: torch.Tensor, n_txt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(text part, image part) of a ``[text | image]`` tensor (B, heads, N, d) along the tokens."""
    return x[:, :, :n_txt], x[:, :, n_txt:]


class ControlledFluxAttnProcessor(ControlledJointAttnProcessor):
    """The processor installed at each controlled Flux.1 attention site, double- or single-stream.

    It shares joint.py's split of the controllers (image → image planners: self injection; the others: image →
    text) and its recording; its own are the Flux ops and the text length of single-stream blocks.
    """

    _attention_backend = None  # set by model.set_attention_backend, as on the stock processor
    _parallel_config = None

    def __init__(
        self,
        session: SessionView,
        site: AttentionSite,
        controllers: list[Controller],
        record_calls: dict[int, Callable[..., None]] | None = None,
    ):
        super().__init__(session, site, controllers, record_calls)
        self.single = site.stream == "single"
        stock = getattr(_module_of(session, site), "processor", None)  # keep the user's attention backend
        self._attention_backend = getattr(stock, "_attention_backend", None)
        self._parallel_config = getattr(stock, "_parallel_config", None)

    # ---- attention ---------------------------------------------------------------------------------------------
    def _stock(self, query, key, value, attention_mask):
        """The stock call on (B, N, heads, d) tensors."""
        return dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )

    def _text_length(self, encoder_hidden_states, ctx, concepts: int = 0) -> int:
        """Where the text (prompt and ``concepts`` concept tokens) ends in the ``[text | image]`` sequence: the
        text input's length in double-stream blocks; the transformer call's ``encoder_hidden_states`` length (the
        step context, read before the concepts were appended) plus ``concepts`` in single-stream ones."""
        if encoder_hidden_states is not None:
            return int(encoder_hidden_states.shape[1])
        length = getattr(ctx, "text_length", None)
        if length is None:
            raise RuntimeError(
                f"{self.site.module_path}: a Flux single-stream block does not tell its attention where the text "
                "ends, and this transformer call gave no encoder_hidden_states to read it from; call the "
                "transformer as FluxPipeline does (encoder_hidden_states=...) or exclude single-stream sites with "
                "sites=lambda s: s.stream != 'single'"
            )
        return int(length) + concepts

    def _concept_count(self, ctx) -> int:
        """How many concept tokens sit at the end of the text at this step (0: none, or no concept controller)."""
        if not self.concept_carriers:
            return 0
        return max(c.concept_tokens(ctx) for c in self.concept_carriers)

    def _plans(self, ctx):
        """(image → text plan, image → image plan, recorders) of this site at this step."""
        plan = IDENTITY
        for controller in self.text_controllers:
            plan = controller.plan(self.site, ctx, plan)
        image_plan = IDENTITY
        for controller in self.image_controllers:
            image_plan = controller.plan(self.image_site, ctx, image_plan)
        recorders = [c for c in self.controllers if c.wants_probs(self.site, ctx)]
        return plan, image_plan, recorders

    def _attend(self, query, key, value, attention_mask, n_txt_of):
        """Attention output (B, N, heads, d) of the ``[text | image]`` sequence under the controllers' plans;
        ``n_txt_of(ctx, concepts)`` gives the text length (prompt and concept tokens)."""
        ctx = self.session.context
        if ctx is None or not self.controllers:
            return self._stock(query, key, value, attention_mask)
        concepts = self._concept_count(ctx)
        if concepts:
            n_text = n_txt_of(ctx, concepts)
            return self._attend_with_concepts(query, key, value, attention_mask, n_text, concepts, ctx)
        return self._attend_prompt(query, key, value, attention_mask, lambda: n_txt_of(ctx, 0), ctx)

    def _attend_with_concepts(self, query, key, value, attention_mask, n_text: int, count: int, ctx):
        """``[prompt | concepts | image]`` (B, N, heads, d): the prompt's attention over ``[prompt | image]`` and
        the concept queries' over ``[image | concepts]``, the outputs put back in sequence order."""
        if attention_mask is not None:
            raise NotImplementedError(
                f"{self.site.module_path}: this Flux call passes an attention mask, which concept maps do not take "
                "yet (the mask would have to cover the concept tokens); call without one"
            )
        n = n_text - count  # prompt tokens
        if n <= 0:
            raise ValueError(f"{self.site.module_path}: {count} concept tokens but only {n_text} text tokens")

        def prompt_and_image(t):  # (B, N, heads, d) -> (B, N - C, heads, d)
            return torch.cat([t[:, :n], t[:, n_text:]], dim=1)

        out = self._attend_prompt(
            prompt_and_image(query), prompt_and_image(key), prompt_and_image(value), None, lambda: n, ctx
        )  # (B, n + Q, heads, d)
        q_c, k_c, v_c = (t[:, n:n_text].transpose(1, 2) for t in (query, key, value))  # (B, heads, C, d)
        k_img, v_img = (t[:, n_text:].transpose(1, 2) for t in (key, value))  # (B, heads, Q, d)
        out_c = concept_attention(q_c, k_img, v_img, k_c, v_c).transpose(1, 2).to(out.dtype)  # (B, C, heads, d)
        out_img = out[:, n:]  # (B, Q, heads, d)
        for carrier in self.concept_carriers:
            if carrier.wants_concepts(self.site, ctx):
                carrier.record_concepts(self.site, ctx, out_img.transpose(1, 2), out_c.transpose(1, 2))
        return torch.cat([out[:, :n], out_c, out_img], dim=1)

    def _attend_prompt(self, query, key, value, attention_mask, n_txt_of, ctx):
        """Attention output (B, N, heads, d) of a ``[prompt | image]`` sequence under the controllers' plans;
        ``n_txt_of()`` gives the prompt's length (asked only where a plan or recorder needs it)."""
        plan, image_plan, recorders = self._plans(ctx)
        if plan.is_identity and image_plan.is_identity and not recorders:
            return self._stock(query, key, value, attention_mask)
        if attention_mask is not None:
            raise NotImplementedError(
                f"{self.site.module_path}: this Flux call passes an attention mask, which promptcontrol's plans and "
                "recordings on Flux attention do not take yet; call without one, or exclude the site"
            )
        n_txt = n_txt_of()
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, heads, N, d), text first
        (q_txt, q_img), (k_txt, k_img), (v_txt, v_img) = (split_text_first(t, n_txt) for t in (q, k, v))
        if recorders:
            self._record_probs(recorders, ctx, plan, q_img, k_img, k_txt)
        if plan.is_identity and image_plan.is_identity:
            return self._stock(query, key, value, attention_mask)
        out_txt = F.scaled_dot_product_attention(q_txt, k, v, dropout_p=0.0, is_causal=False)
        out_img = run_joint_plan(
            plan, image_rows_of(image_plan), q_img, k_img, v_img, k_txt, v_txt, text_first=True
        )
        return torch.cat([out_txt, out_img], dim=2).transpose(1, 2)  # (B, N, heads, d)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ):
        # The ops are FluxAttnProcessor's, in the same order.
        query, key, value, e_query, e_key, e_value = flux_projections(attn, hidden_states, encoder_hidden_states)
        query = query.unflatten(-1, (-1, attn.head_dim))  # (B, N, heads, d)
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            e_query = attn.norm_added_q(e_query.unflatten(-1, (-1, attn.head_dim)))
            e_key = attn.norm_added_k(e_key.unflatten(-1, (-1, attn.head_dim)))
            e_value = e_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([e_query, query], dim=1)  # [text | image]
            key = torch.cat([e_key, key], dim=1)
            value = torch.cat([e_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        def n_txt_of(ctx, concepts):
            return self._text_length(encoder_hidden_states, ctx, concepts)

        hidden_states = self._attend(query, key, value, attention_mask, n_txt_of)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states  # single-stream: the block projects attention and MLP together
        n_txt = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [n_txt, hidden_states.shape[1] - n_txt], dim=1
        )
        hidden_states = attn.to_out[0](hidden_states.contiguous())
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


def _module_of(session: SessionView, site: AttentionSite):
    """The attention module of ``site`` (a path walk), or ``None`` for a stand-in session."""
    denoiser = getattr(session, "denoiser", None)
    try:
        return denoiser.get_submodule(site.module_path) if denoiser is not None else None
    except AttributeError:
        return None
