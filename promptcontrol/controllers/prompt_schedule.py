"""``PromptSchedule``: prompt editing (``[from:to:when]``, ``[a|b]``) — other text features from a given step on.

:func:`promptcontrol.generate` encodes every prompt the schedule reaches once, before the run; this controller
then swaps the conditional rows' text features (the denoiser's ``encoder_hidden_states``) at the steps that use
them, and on SDXL the pooled text embedding of the same texts (``added_cond_kwargs["text_embeds"]``, an input of
the time embedding) at the same steps, as A1111 does. It acts at no attention site.
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
    ``(N, P)``: SDXL's pooled text embeddings of the same texts, swapped in ``added_cond_kwargs["text_embeds"]``.
    """

    def __init__(self, embeddings: torch.Tensor, table: list[list[int | None]], pooled: torch.Tensor | None = None):
        self.embeddings = embeddings  # (N, K, D)
        self.pooled = pooled  # (N, P) or None
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
        """SDXL: the pooled embedding ``added_cond_kwargs["text_embeds"]`` ``(B, P)`` of the same rows and texts."""
        added = inputs.get("added_cond_kwargs")
        if self.pooled is None or not isinstance(added, dict) or added.get("text_embeds") is None:
            return inputs
        rows, sources = self._rows(ctx)
        if not rows:
            return inputs
        text_embeds = added["text_embeds"].clone()  # (B, P)
        text_embeds[rows] = self.pooled[sources].to(device=text_embeds.device, dtype=text_embeds.dtype)
        return {**inputs, "added_cond_kwargs": {**added, "text_embeds": text_embeds}}
