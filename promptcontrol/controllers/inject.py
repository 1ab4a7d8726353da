"""Self-attention injection (``self_steps``): edited rows attend with the source row's self-attention map.

Prompt-to-prompt replaces the self-attention map of each edited image by the source image's on the first steps
(``self_replace_steps``), which keeps the source's structure: ``out_edit = P_src @ V_edit = sdpa(q_src, k_src,
v_edit)`` — one SDPA call with the source row's queries and keys, no map materialised.

Where: prompt-to-prompt injects only at self-attention layers with at most 16² queries at 512² images, i.e. the
two coarsest levels of SD 1.x (16² and the 8² middle). That rule is hard-wired to one image size; here it is
``levels`` (downsampling levels, see :class:`~promptcontrol.sites.AttentionSite`), by default the two coarsest
levels that have self-attention, which is the same layers at 512² and scales with the image size and model.
Unconditional rows are left alone, as prompt-to-prompt does.

Transformers (PixArt, Sana): every block sees the same token grid, so every site is level 0 and the default
injects at the self-attention of every block. Self-attention that promptcontrol cannot mirror (Sana's linear
attention, ``SanaLinearAttnProcessor2_0``, or a custom processor) is left alone, with a warning naming it.
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch

from ..alignment import edit_rows
from ..context import SessionView, StepContext
from ..plan import IDENTITY, AttentionPlan, AttentionTerm, row_index
from ..schedule import WindowLike, site_filter, window
from ..sites import AttentionSite
from .base import Controller


def default_self_levels(sites: Sequence[AttentionSite], count: int = 2) -> tuple[int, ...]:
    """The ``count`` coarsest levels that have self-attention (prompt-to-prompt's ≤16² layers at 512²); joint
    attention (SD3) counts, since its image → image part is self-attention."""
    levels = sorted({s.level for s in sites if s.kind in ("self", "joint")})
    return tuple(levels[-count:])


def _self_sites(levels: Sequence[int]) -> Callable[[AttentionSite], bool]:
    """``site -> bool``: the self-attention sites of ``levels`` (none when ``levels`` is empty)."""
    if not levels:
        return lambda site: False
    # joint attention (SD3): its processor gives the injection to the image → image part only
    return site_filter({"kinds": ("self", "joint"), "levels": tuple(levels)}, "self_levels")


def _processor_name(session: SessionView, site: AttentionSite) -> str:
    module = session.denoiser.get_submodule(site.module_path)  # a path walk, not a scan of every module
    return type(getattr(module, "processor", None)).__name__


def _mirrorable(session: SessionView, site: AttentionSite) -> bool:
    """Whether the site's current processor is one promptcontrol's processor stands in for (not linear attention)."""
    from ..processors import kind_for

    kind = kind_for(site)
    name = _processor_name(session, site)
    return kind is not None and (name in kind.equivalent or name in kind.replaceable)


class InjectSelf(Controller):
    """Edited rows take the source row's self-attention map on the steps of ``steps``.

    steps:  a fraction or a ``(start, end)`` pair of the denoising steps (prompt-to-prompt's ``self_replace_steps``)
    levels: the levels to inject at; ``None`` = the two coarsest levels with self-attention
    """

    plan_per_step = True  # the same plan at every site it acts at: composed once per step (see processors/attention.py)

    def __init__(self, steps: WindowLike = 0.4, *, levels: Sequence[int] | None = None):
        if isinstance(steps, dict):
            raise TypeError("self_steps takes a fraction or a (start, end) pair; per-word schedules apply to cross_steps only")
        self.window = window(steps, "self_steps")
        self.levels = None if levels is None else tuple(int(v) for v in levels)
        self._at_site = _self_sites(self.levels or ())  # the default levels are set by bind()
        self._device: torch.device | str = "cpu"
        self._session: SessionView | None = None
        self._plan: AttentionPlan = IDENTITY
        self._rows_plan: tuple[tuple[int, ...], AttentionPlan] | None = None  # the last rows and their plan

    def applies_to(self, site: AttentionSite) -> bool:
        """Self-attention sites of the chosen levels only (the session binds first, so defaults are known)."""
        return not self.window.is_empty and self._at_site(site)

    def bind(self, session: SessionView) -> None:
        levels = self.levels if self.levels is not None else default_self_levels(session.sites)
        chosen = _self_sites(levels)
        served = {s.key for s in session.sites if chosen(s) and _mirrorable(session, s)}
        skipped = sorted({_processor_name(session, s) for s in session.sites if chosen(s) and s.key not in served})
        if skipped:
            where = "any" if not served else "some"
            warnings.warn(
                f"self_steps skips {where} self-attention sites of {type(session.unet).__name__}: their processor "
                f"({', '.join(skipped)}) is not softmax attention promptcontrol can inject into (Sana's linear "
                "attention, or a custom processor); pass self_steps=0 to silence this",
                stacklevel=4,
            )
        self._at_site = lambda site: site.key in served
        param = next(session.unet.parameters(), None)
        self._device = param.device if param is not None else "cpu"
        self._session = session  # the owner of the shared row tensors (plan.row_index)

    def unbind(self) -> None:
        self._plan = IDENTITY
        self._rows_plan = None
        self._session = None

    def begin_step(self, ctx: StepContext) -> None:
        self._plan = IDENTITY
        if ctx.total is None:
            raise ValueError("self-attention injection needs the number of denoising steps; run it through a pipeline")
        if not self.window.contains(ctx.index, ctx.total):
            return
        pairs = edit_rows(ctx.layout)
        if not pairs:
            return
        rows = list(range(ctx.batch_size))
        for row, source_row in pairs:
            rows[row] = source_row
        self._plan = self._plan_for(tuple(rows))

    def _plan_for(self, rows: tuple[int, ...]) -> AttentionPlan:
        """The plan of ``rows`` (B,): the same object for the same rows, so that the sites' prepared form of it
        is reused from step to step (see processors/attention.py)."""
        if self._rows_plan is None or self._rows_plan[0] != rows:
            index = row_index(torch.tensor(rows), self._device, self._session)
            self._rows_plan = (rows, AttentionPlan((AttentionTerm(qk_rows=index, qk_rows_host=rows),)))
        return self._rows_plan[1]

    def plan(self, site: AttentionSite, ctx: StepContext, plan: AttentionPlan) -> AttentionPlan:
        if self._plan.is_identity or not self._at_site(site):
            return plan
        if not plan.is_identity:
            raise ValueError("self-attention injection must come first among the controllers acting on self-attention")
        return self._plan
