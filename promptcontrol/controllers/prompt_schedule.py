"""``PromptSchedule``: prompt editing (``[from:to:when]``, ``[a|b]``) — other text features from a given step on.

:func:`promptcontrol.generate` encodes every prompt the schedule reaches once, before the run; this controller
then swaps the conditional rows' text features (the denoiser's ``encoder_hidden_states``) at the steps that use
them, and the other inputs that come from the same texts at the same steps: the pooled text embedding (SDXL:
``added_cond_kwargs["text_embeds"]``, SD3: ``pooled_projections``; an input of the time embedding, as A1111 swaps
it) and the text attention mask (PixArt / Sana: ``encoder_attention_mask``). It acts at no attention site.
"""

from __future__ import annotations

from typing import Any

import torch

from ..context import StepContext
from ..sites import AttentionSite
from .base import Controller


class PromptSchedule(Controller):
    """Swap the conditional rows' text features per step (prompt editing).

    ``table[step][prompt index]`` is the row of ``embeddings`` ``(N, K, D)`` that the prompt's conditional rows
    use at that step, or ``None`` to keep the pipeline's own encoding (the first step's prompt). ``pooled``
    ``(N, P)``: the pooled text embeddings of the same texts (SDXL, SD3); ``mask`` ``(N, K)``: their text attention
    mask (PixArt, Sana).
    """

    def __init__(self, embeddings: torch.Tensor, table: list[list[int | None]], pooled: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None):
        self.embeddings = embeddings  # (N, K, D)
        self.pooled = pooled  # (N, P) or None
        self.mask = mask  # (N, K) or None
        self.table = table
        self.total = len(table)

    def applies_to(self, site: AttentionSite) -> bool:
        return False  # acts on the denoiser's inputs only

    def _rows(self, ctx: StepContext) -> tuple[list[int], list[int]]:
        """(batch rows, embedding rows) to swap at this step."""
        if ctx.index >= self.total:
            return [], []
        choice = self.table[ctx.index]
        rows, sources = [], []
        for row in ctx.layout.cond_rows:
            prompt = ctx.layout.prompt_of_row[row]
            if prompt < len(choice) and choice[prompt] is not None:
                rows.append(row)
                sources.append(choice[prompt])
        return rows, sources

    def begin_step(self, ctx: StepContext) -> None:
        if ctx.total is not None and ctx.total != self.total:
            raise ValueError(
                f"the prompt schedule was built for {self.total} steps but the pipeline runs {ctx.total}; pass "
                "num_inference_steps to generate (img2img strength and custom timesteps change the count)"
            )

    def transform_context(self, ctx: StepContext, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        rows, sources = self._rows(ctx)
        if not rows:
            return encoder_hidden_states
        out = encoder_hidden_states.clone()  # (B, K, D)
        out[rows] = self.embeddings[sources].to(device=out.device, dtype=out.dtype)
        return out

    def transform_inputs(self, ctx: StepContext, inputs: dict[str, Any]) -> dict[str, Any]:
        """The inputs that come from the same texts, for the same rows: SDXL's ``added_cond_kwargs["text_embeds"]``
        and SD3's ``pooled_projections`` ``(B, P)``, PixArt's / Sana's ``encoder_attention_mask`` ``(B, K)``."""
        rows, sources = self._rows(ctx)
        if not rows:
            return inputs
        changed = dict(inputs)
        added = inputs.get("added_cond_kwargs")
        if self.pooled is not None and isinstance(added, dict) and added.get("text_embeds") is not None:
            text_embeds = self._swapped(added["text_embeds"], self.pooled, rows, sources)
            changed["added_cond_kwargs"] = {**added, "text_embeds": text_embeds}
        if self.pooled is not None and isinstance(inputs.get("pooled_projections"), torch.Tensor):
            changed["pooled_projections"] = self._swapped(inputs["pooled_projections"], self.pooled, rows, sources)
        if self.mask is not None and isinstance(inputs.get("encoder_attention_mask"), torch.Tensor):
            mask = self._swapped(inputs["encoder_attention_mask"], self.mask, rows, sources)
            changed["encoder_attention_mask"] = mask
        return changed if any(changed[k] is not inputs[k] for k in inputs) else inputs

    @staticmethod
    def _swapped(current: torch.Tensor, table: torch.Tensor, rows: list[int], sources: list[int]) -> torch.Tensor:
        """``current`` (B, ...) with ``rows`` taken from ``table[sources]`` (a copy; the pipeline's tensor is kept)."""
        out = current.clone()
        out[rows] = table[sources].to(device=out.device, dtype=out.dtype)
        return out
