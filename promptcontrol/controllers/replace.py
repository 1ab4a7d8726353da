"""``pc.Replace`` and ``pc.Refine``: swap, add or remove words and keep the layout (prompt-to-prompt's
``AttentionReplace`` / ``AttentionRefine``), on fused SDPA.

The batch holds one source prompt (prompt index 0) and any number of edited prompts (indices 1..N), e.g.
``pipe([source, edit_1, edit_2], latents=same_noise)``. At each cross-attention site, inside the step window,
every edited prompt's conditional row attends with the *source* map carried onto its own tokens::

    P'_edit = w * (P_source @ M) + (1 - w) * P_edit        w = alpha * window(step, token)      (K,)
    out_edit = P'_edit @ V_edit
             = sdpa(q_src, k_src, M · diag(w) · V_edit) + sdpa(q_edit, k_edit, diag(1 - w) · V_edit)

so no attention map is materialised (the second term is dropped when ``w`` is 1 for every token). The two edits
differ only in the alignment ``M``, ``alpha`` (see :mod:`promptcontrol.alignment`):

* Replace (same number of words): ``M`` carries each source word's map onto the edited word in its place
  (spread evenly over its tokens when it becomes more of them), ``alpha`` is 1 everywhere;
* Refine (words added or removed): ``M`` is the 0/1 selection matrix of the common tokens, ``alpha`` is 0 at new
  tokens, which keep their own map.

The source row and every unconditional row are left as they are: prompt-to-prompt edits the conditional half of
the batch only (``attn[h // 2:] = forward(attn[h // 2:])``), so the unconditional rows of the edited images run
their own attention. :class:`PromptEdit` holds what both share.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..alignment import TokenMap, edit_rows, refine_map, replace_map
from ..context import SessionView, StepContext
from ..plan import IDENTITY, AttentionPlan, AttentionTerm, on_device, row_index
from ..schedule import Schedule, ScheduleLike, schedule
from ..sites import AttentionSite
from ..tokens import PromptTokens, tokenize
from .base import Controller


def edit_plan(
    batch: int,
    edits: Sequence[tuple[int, int, torch.Tensor, torch.Tensor]],  # (row, source row, M (K,K), w (K,))
    size: int,
    device: torch.device | str = "cpu",
    owner: object = None,
) -> AttentionPlan:
    """The fused plan that gives each ``row`` the map ``w * (P[source row] @ M) + (1 - w) * P[row]``.

    Rows not named keep their own attention. Two SDPA terms: source queries/keys with values ``M · diag(w) · v``,
    and own queries/keys with values ``diag(1 - w) · v`` (only when some ``w`` is below 1).
    """
    active = [(r, s, m, w) for r, s, m, w in edits if bool((w != 0).any())]
    if not active:
        return IDENTITY
    qk_rows = torch.arange(batch)
    value_map = torch.eye(size).repeat(batch, 1, 1)  # (B, K, K)
    first_scale = torch.ones(batch, size)  # (B, K)
    second_scale = torch.zeros(batch, size)  # (B, K)
    for row, source_row, matrix, weight in active:
        qk_rows[row] = source_row
        value_map[row] = matrix
        first_scale[row] = weight
        second_scale[row] = 1.0 - weight
    for row, _, _, weight in edits:  # rows outside their window keep their own map
        if not bool((weight != 0).any()):
            second_scale[row] = 1.0
            first_scale[row] = 0.0
    # host tensors: checked without a device read. An identity token map (a swap of words of equal token counts)
    # and all-one scales are left out, so the site runs no kernel for them.
    identity_map = bool((value_map == torch.eye(size)).all())
    all_ones = bool((first_scale == 1).all())
    first = AttentionTerm(  # built on the host, moved without a blocking copy
        qk_rows=row_index(qk_rows, device, owner),  # shared with InjectSelf's (same owner)
        qk_rows_host=tuple(qk_rows.tolist()),  # host ints: the site can take a view instead of a copy
        value_scale=None if all_ones else on_device(first_scale, device),
        value_map=None if identity_map else on_device(value_map, device),
    )
    if not bool((second_scale != 0).any()):  # host tensors: no device read
        return AttentionPlan((first,))
    active = tuple(r for r in range(batch) if bool((second_scale[r] != 0).any()))  # host: no device read
    return AttentionPlan((first, AttentionTerm(value_scale=on_device(second_scale, device), active_rows=active)))


class PromptEdit(Controller):
    """What replace and refine share: prompts of the run, per-token step windows, the per-step fused plan.

    cross_steps: a fraction, a ``(start, end)`` pair, or a per-word dict (words of the edited prompts;
                 ``"default"`` for the others) — see :mod:`promptcontrol.schedule`
    prompts:     the source and edited prompts, when the pipeline is called with embeddings (otherwise they
                 are read from each pipeline call: prompt 0 is the source, the others are edits)
    """

    plan_per_step = True  # the same plan at every site it acts at: composed once per step (see processors/attention.py)

    name = "PromptEdit"

    def __init__(self, cross_steps: ScheduleLike = 0.8, *, prompts: Sequence[str] | None = None):
        self.schedule: Schedule = schedule(cross_steps, default=0.8, what="cross_steps")
        self.prompts = None if prompts is None else list(prompts)
        if self.prompts is not None and len(self.prompts) < 2:
            raise ValueError(f"{self.name} needs a source prompt and at least one edited prompt, got {self.prompts!r}")
        self._tokenizer = None
        self._device: torch.device | str = "cpu"
        self._session: SessionView | None = None
        self._prepared_for: tuple[str, ...] | None = None
        self._maps: list[TokenMap] = []  # one per edited prompt (prompt index 1..N)
        self._windows: list[list[tuple[object, list[int]]]] = []  # per edit: (window, token positions)
        self._plan: AttentionPlan = IDENTITY
        self._plan_key: object = None

    # ---- alignment (what subclasses choose) --------------------------------------------------------------
    def token_map(self, source: PromptTokens, edit: PromptTokens) -> TokenMap:
        raise NotImplementedError

    # ---- session -----------------------------------------------------------------------------------------
    def bind(self, session: SessionView) -> None:
        self._tokenizer = session.tokenizer
        if self._tokenizer is None:
            raise ValueError(
                f"{self.name} needs the pipeline's tokenizer to align words; pass a pipeline, or "
                "pc.control(unet, ..., tokenizer=pipe.tokenizer)"
            )
        param = next(session.unet.parameters(), None)
        self._device = param.device if param is not None else "cpu"
        self._session = session  # the owner of the shared row tensors (plan.row_index)
        self._prepared_for = None
        if self.prompts is not None:
            self.prepare(self.prompts)

    def unbind(self) -> None:
        self._tokenizer = None
        self._session = None
        self._plan, self._plan_key = IDENTITY, None

    def prepare(self, prompts: Sequence[str]) -> None:
        """Align every edited prompt with the source and resolve the per-word windows (once per prompt set)."""
        key = tuple(prompts)
        if key == self._prepared_for:
            return
        if len(prompts) < 2:
            raise ValueError(
                f"{self.name} needs a batch of prompts [source, edit, ...]; got {len(prompts)} prompt(s): {list(prompts)!r}"
            )
        tokens = [tokenize(self._tokenizer, p) for p in prompts]
        source, edits = tokens[0], tokens[1:]
        maps = [self.token_map(source, edit) for edit in edits]
        for word, _ in self.schedule.words:  # every per-word key must name a word of some edited prompt
            if not any(edit.matches(word) for edit in edits):
                listing = "; ".join(f"{e.prompt!r}: {', '.join(e.texts)}" for e in edits)
                raise KeyError(f"cross_steps names {word!r}, which is in no edited prompt; their words are — {listing}")
        windows = []
        for edit in edits:
            per_token: list[tuple[object, list[int]]] = []
            for word, win in self.schedule.words:
                if edit.matches(word):
                    per_token.append((win, edit.positions(word)))
            windows.append(per_token)
        self._maps, self._windows, self._prepared_for = maps, windows, key

    def _prompts_of(self, ctx: StepContext) -> list[str]:
        if self.prompts is not None:
            return self.prompts
        if ctx.run is None or ctx.run.prompts is None:
            raise ValueError(
                f"{self.name} could not see the prompts of this call (embeddings only?); "
                f"pass them: pc.{self.name}(..., prompts=[source, edit, ...])"
            )
        return ctx.run.prompts

    def weights(self, edit: int, ctx: StepContext) -> torch.Tensor:
        """``w`` (K,) of edited prompt ``edit`` (0-based among the edits) at this step: alpha × window."""
        if ctx.total is None:
            raise ValueError(f"{self.name} needs the number of denoising steps; run it through a pipeline")
        token_map = self._maps[edit]
        on = torch.full((token_map.size,), float(self.schedule.default.contains(ctx.index, ctx.total)))
        for win, positions in self._windows[edit]:
            on[positions] = float(win.contains(ctx.index, ctx.total))
        return token_map.alpha * on

    def begin_step(self, ctx: StepContext) -> None:
        self.prepare(self._prompts_of(ctx))
        edits = []
        for row, source_row in edit_rows(ctx.layout):
            e = ctx.layout.prompt_of_row[row] - 1
            if e >= len(self._maps):
                continue
            edits.append((row, source_row, self._maps[e].matrix, self.weights(e, ctx)))
        if not edits:
            self._plan, self._plan_key = IDENTITY, None
            return
        key = (self._prepared_for, ctx.layout, tuple(tuple(w.tolist()) for *_, w in edits))
        if key != self._plan_key:  # the plan changes only when a window opens or closes: build it then
            self._plan = edit_plan(ctx.batch_size, edits, self._maps[0].size, self._device, self._session)
            self._plan_key = key

    def plan(self, site: AttentionSite, ctx: StepContext, plan: AttentionPlan) -> AttentionPlan:
        if self._plan.is_identity:
            return plan
        if not plan.is_identity:
            raise ValueError(
                f"pc.{self.name} must come first among the controllers (it replaces the attention map); "
                "give reweighting controllers after it, e.g. pc.control(pipe, pc.Replace(...), pc.Reweight(...))"
            )
        return self._plan


class Replace(PromptEdit):
    """Word swap (prompt-to-prompt ``AttentionReplace``): the edited prompts have as many words as the source.

    ``pc.Replace(cross_steps=0.8)`` in ``pc.control(pipe, ...)`` with ``pipe([source, edit, ...])``. A word that
    becomes a different number of tokens gets the source word's summed map, spread evenly over its tokens.
    """

    name = "Replace"

    def token_map(self, source: PromptTokens, edit: PromptTokens) -> TokenMap:
        return replace_map(source, edit)


class Refine(PromptEdit):
    """Words added or removed (prompt-to-prompt ``AttentionRefine``): new tokens keep their own map.

    ``pc.Refine(cross_steps=0.8)`` in ``pc.control(pipe, ...)`` with ``pipe([source, edit, ...])``.
    """

    name = "Refine"

    def token_map(self, source: PromptTokens, edit: PromptTokens) -> TokenMap:
        return refine_map(source, edit)
