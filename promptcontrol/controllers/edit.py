"""``AutoEdit``: the cross-attention edit of ``pc.edit`` — Replace or Refine per edited prompt, by word count.

Each edited prompt with as many words as the source gets :class:`~promptcontrol.controllers.replace.Replace`'s
alignment (word swap), every other one :class:`~promptcontrol.controllers.replace.Refine`'s (words added or
removed); ``mode="replace"`` / ``"refine"`` forces one of them for every edited prompt. Everything else (step
windows, the fused plan, which rows are edited) is :class:`~promptcontrol.controllers.replace.PromptEdit`'s.
"""

from __future__ import annotations

from typing import Sequence

from ..alignment import TokenMap, refine_map, replace_map
from ..schedule import ScheduleLike
from ..tokens import PromptTokens
from .replace import PromptEdit

MODES = ("auto", "replace", "refine")


class AutoEdit(PromptEdit):
    """Replace for each edited prompt with as many words as the source, Refine for the others."""

    name = "edit"

    def __init__(self, cross_steps: ScheduleLike = 0.8, *, mode: str = "auto", prompts: Sequence[str] | None = None):
        if mode not in MODES:
            raise ValueError(f"edit mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        super().__init__(cross_steps, prompts=prompts)

    def token_map(self, source: PromptTokens, edit: PromptTokens) -> TokenMap:
        if self.mode == "replace" or (self.mode == "auto" and len(source.words) == len(edit.words)):
            return replace_map(source, edit)
        return refine_map(source, edit)
