"""``pc.Refine``: add or remove words and keep the layout (prompt-to-prompt's ``AttentionRefine``), on fused SDPA.

The prompts' tokens are aligned (:func:`promptcontrol.alignment.refine_map`); inside the step window an edited
prompt's conditional row attends with the source map at its matched tokens and with its own map at new tokens::

    P'_edit = P_source[:, mapper] * (alpha * window) + P_edit * (1 - alpha * window)
            = sdpa(q_src, k_src, S · diag(alpha * window) · V_edit) + sdpa(q_edit, k_edit, diag(1 - alpha * window) · V_edit)

with ``S`` the 0/1 selection matrix of the alignment and ``alpha`` 0 at new tokens. Source and unconditional
rows are untouched, as in :mod:`promptcontrol.controllers.replace`.
"""

from __future__ import annotations

from ..alignment import TokenMap, refine_map
from ..tokens import PromptTokens
from .replace import PromptEdit


class Refine(PromptEdit):
    """Words added or removed (prompt-to-prompt ``AttentionRefine``): new tokens keep their own map.

    ``pc.Refine(cross_steps=0.8)`` in ``pc.control(pipe, ...)`` with ``pipe([source, edit, ...])``.
    """

    name = "Refine"

    def token_map(self, source: PromptTokens, edit: PromptTokens) -> TokenMap:
        return refine_map(source, edit)
