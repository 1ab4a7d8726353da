"""The fused attention plan: what a site computes, expressed so that SDPA kernels can run it.

Every edit of prompt-to-prompt is linear in the attention map with per-token coefficients, so it can be run by
transforming values (and choosing which row's queries and keys to use) instead of materialising the map::

    out[b] = sum over terms t of  softmax(q[r_t(b)] k[r_t(b)]^T / sqrt(d) + mask + bias_t[b]) @ V_t[b]
    V_t[b] = value_map_t[b] @ (value_scale_t[b] * v[b])          (scale per token, then token mixing)

Shapes: B batch rows, K text tokens (keys), d head dim. ``qk_rows`` (B,) picks, for each output row, the row
whose queries and keys the term uses (``None``: its own). ``value_scale`` (B, K) scales each token's value;
``value_map`` (B, K_keys, K) mixes the output row's token values into the key row's token space; ``logit_bias``
(B, K_keys) is added to the logits (``log w`` gives a renormalised reweight). See DESIGN.md for the identities.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionTerm:
    """One SDPA call of a plan; every field ``None`` means plain attention of each row to itself."""

    qk_rows: torch.Tensor | None = None  # (B,) long
    value_scale: torch.Tensor | None = None  # (B, K)
    value_map: torch.Tensor | None = None  # (B, K_keys, K)
    logit_bias: torch.Tensor | None = None  # (B, K_keys)
    # ``qk_rows`` as host ints, where the builder knew them: lets :func:`prepare` pick rows by views (every row
    # the same row, or each its own) instead of a copy at every site, without reading the device
    qk_rows_host: tuple[int, ...] | None = field(default=None, compare=False, repr=False)
    # host ints: the only rows this term's values are not zero at (``None``: any row); a later term of a plan then
    # runs on those rows alone (Refine's own-map term: the edited rows, not the source's or the unconditional ones)
    active_rows: tuple[int, ...] | None = field(default=None, compare=False, repr=False)

    @property
    def is_plain(self) -> bool:
        return self.qk_rows is None and self.value_scale is None and self.value_map is None and self.logit_bias is None

    def scaled(self, scale: torch.Tensor) -> "AttentionTerm":
        """This term with every value additionally scaled per token: ``scale`` (B, K)."""
        new = scale if self.value_scale is None else self.value_scale * scale
        return replace(self, value_scale=new)

    def biased(self, bias: torch.Tensor) -> "AttentionTerm":
        """This term with ``bias`` (B, K_keys) added to its logits."""
        new = bias if self.logit_bias is None else self.logit_bias + bias
        return replace(self, logit_bias=new)


@dataclass(frozen=True)
class AttentionPlan:
    """The output of a site is the sum of its terms. The identity plan is one plain term."""

    terms: tuple[AttentionTerm, ...] = field(default=(AttentionTerm(),))

    @property
    def is_identity(self) -> bool:
        return len(self.terms) == 1 and self.terms[0].is_plain

    def scaled(self, scale: torch.Tensor) -> "AttentionPlan":
        """Every term's values scaled per token (the P2P equalizer: attention × w, not renormalised)."""
        return AttentionPlan(tuple(t.scaled(scale) for t in self.terms))

    def biased(self, bias: torch.Tensor) -> "AttentionPlan":
        """Every term's logits shifted per token (a renormalised reweight when ``bias = log w``)."""
        return AttentionPlan(tuple(t.biased(bias) for t in self.terms))


IDENTITY = AttentionPlan()


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """An SDPA mask as an additive float mask (boolean masks mark the positions to keep)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def transformed_values(term: AttentionTerm, value: torch.Tensor) -> torch.Tensor:
    """``value`` (B, heads, K, d) after the term's per-token scale and token mixing."""
    if term.value_scale is not None:
        value = value * term.value_scale.to(value.dtype)[:, None, :, None]
    if term.value_map is not None:
        value = torch.einsum("bij,bhjd->bhid", term.value_map.to(value.dtype), value)
    return value


def run_plan(
    plan: AttentionPlan,
    query: torch.Tensor,  # (B, heads, Q, d)
    key: torch.Tensor,  # (B, heads, K, d)
    value: torch.Tensor,  # (B, heads, K, d)
    attention_mask: torch.Tensor | None,  # (B, heads, Q or 1, K) additive or boolean, or None
) -> torch.Tensor:  # (B, heads, Q, d)
    """Run a plan on fused ``F.scaled_dot_product_attention`` calls, one per term; no map is materialised."""
    out = None
    for term in plan.terms:
        q, k, mask = query, key, attention_mask
        if term.qk_rows is not None:
            q, k = query[term.qk_rows], key[term.qk_rows]
            mask = None if mask is None else mask[term.qk_rows]
        if term.logit_bias is not None:
            bias = term.logit_bias.to(query.dtype)[:, None, None, :]
            mask = _additive(mask, query.dtype)
            mask = bias if mask is None else mask + bias
        o = F.scaled_dot_product_attention(q, k, transformed_values(term, value), attn_mask=mask, dropout_p=0.0)
        out = o if out is None else out + o
    return out


@dataclass(frozen=True)
class PreparedTerm:
    """An :class:`AttentionTerm` with its tensors already cast to one dtype and shaped for broadcasting (built
    once per step and plan, so that a site's call does no casting or reshaping of per-token coefficients)."""

    qk_rows: torch.Tensor | None  # (B,) long
    value_scale: torch.Tensor | None  # (B, 1, K, 1)
    value_map: torch.Tensor | None  # (B, 1, K_keys, K): a batched matmul over heads (cheaper than einsum)
    logit_bias: torch.Tensor | None  # (B, 1, 1, K_keys)
    one_row: int | None = None  # every one of ``batch`` rows takes this row's queries/keys: a broadcast view
    batch: int = 0  # rows of the plan (with ``one_row``)
    out_rows: slice | None = None  # the term runs on these rows only (its coefficients already cut to them)


def prepare(plan: AttentionPlan, dtype: torch.dtype) -> tuple[PreparedTerm, ...]:
    """The plan's terms for inputs of ``dtype`` (the same casts :func:`run_plan` makes at every call).

    A term with both a per-token scale and a token mixing gets one matrix: ``M · diag(s) = M * s`` over its
    columns (one kernel less at every site). Rows known on the host (``qk_rows_host``) become views where they can:
    every row taking one row's queries/keys is a broadcast (no copy), each row its own is no selection."""
    terms = [_prepared_term(t, dtype) for t in plan.terms]
    return tuple(terms[:1] + [_on_active_rows(t, p) for t, p in zip(terms[1:], plan.terms[1:])])


def _on_active_rows(prepared: PreparedTerm, term: AttentionTerm) -> PreparedTerm:
    """``prepared`` cut to its active rows where they are one run of rows of a term on each row's own queries (a
    term after the first: its output is added into those rows of the sum)."""
    rows, size = term.active_rows, _term_batch(term)
    if rows is None or not rows or size is None or term.qk_rows is not None or len(rows) >= size:
        return prepared
    a, b = rows[0], rows[-1] + 1
    if rows != tuple(range(a, b)):
        return prepared
    cut = lambda t: None if t is None else t[a:b]  # noqa: E731
    return replace(prepared, value_scale=cut(prepared.value_scale), value_map=cut(prepared.value_map),
                   logit_bias=cut(prepared.logit_bias), out_rows=slice(a, b))


def _term_batch(term: AttentionTerm) -> int | None:
    """The batch a term's coefficients are given for (``None``: no per-row coefficient)."""
    for t in (term.value_scale, term.value_map, term.logit_bias):
        if t is not None:
            return int(t.shape[0])
    return None


def _prepared_term(t: AttentionTerm, dtype: torch.dtype) -> PreparedTerm:
    scale, value_map = t.value_scale, t.value_map  # (B, K), (B, K_keys, K)
    if scale is not None and value_map is not None:
        scale, value_map = None, value_map * scale[:, None, :]
    qk_rows, one_row, batch = t.qk_rows, None, 0
    rows = t.qk_rows_host if qk_rows is not None else None
    if rows:
        if rows == tuple(range(len(rows))):  # each row its own: no selection
            qk_rows = None
        elif all(r == rows[0] for r in rows):  # every row takes one row's: a broadcast view, no copy
            qk_rows, one_row, batch = None, rows[0], len(rows)
    return PreparedTerm(
        qk_rows=qk_rows,
        value_scale=None if scale is None else scale.to(dtype)[:, None, :, None],
        value_map=None if value_map is None else value_map.to(dtype)[:, None],
        logit_bias=None if t.logit_bias is None else t.logit_bias.to(dtype)[:, None, None, :],
        one_row=one_row,
        batch=batch,
    )


def _select_rows(x: torch.Tensor, term: PreparedTerm, keep_layout: bool = True) -> torch.Tensor:
    """``x`` (B, ...) with each row replaced by the term's row: a broadcast view for one row, else a copy that
    keeps the (B, heads, N, d) view's (B, N, heads, d) memory (so that SDPA's output has the layout the processor
    reshapes without a copy, as stock's has)."""
    if term.one_row is not None:  # narrow + expand: the cheapest views to make per call
        if x.dim() == 4:
            return x.narrow(0, term.one_row, 1).expand(term.batch, -1, -1, -1)
        return x.narrow(0, term.one_row, 1).expand((term.batch,) + x.shape[1:])
    if keep_layout and x.dim() == 4 and x.stride(1) < x.stride(2):
        return x.transpose(1, 2).index_select(0, term.qk_rows).transpose(1, 2)
    return x.index_select(0, term.qk_rows)


def run_prepared(
    terms: tuple[PreparedTerm, ...],
    query: torch.Tensor,  # (B, heads, Q, d)
    key: torch.Tensor,  # (B, heads, K, d)
    value: torch.Tensor,  # (B, heads, K, d)
    attention_mask: torch.Tensor | None,  # (B, heads, Q or 1, K) additive or boolean, or None
) -> torch.Tensor:  # (B, heads, Q, d)
    """:func:`run_plan` on prepared terms: the same SDPA calls on the same numbers (token mixing as a batched
    matmul instead of an einsum, rows by views or ``index_select``: the same values, less per-call overhead)."""
    out = None
    for term in terms:
        q, k, mask, v = query, key, attention_mask, value
        if term.qk_rows is not None or term.one_row is not None:
            q, k = _select_rows(query, term), _select_rows(key, term)
            mask = None if mask is None or mask.shape[0] == 1 else _select_rows(mask, term, keep_layout=False)
        elif term.out_rows is not None:  # own queries/keys of a run of rows: views
            rows = term.out_rows
            q, k, v = q[rows], k[rows], v[rows]
            mask = None if mask is None or mask.shape[0] == 1 else mask[rows]
        if term.logit_bias is not None:
            mask = term.logit_bias if mask is None else _additive(mask, query.dtype) + term.logit_bias
        if term.value_scale is not None:
            v = v * term.value_scale
        if term.value_map is not None:
            v = _mixed(term.value_map, v)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        out = o if out is None else _add(out, o, term.out_rows)
    return out


def _mixed(value_map: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``value_map`` (B, 1, K_keys, K) @ ``v`` (B, heads, K, d). Over the projection's (B, K, heads·d) memory, one
    bmm for all heads (no copy of ``v`` nor of the map per head), its output in the same layout."""
    b, heads, k, d = v.shape
    dense = v.stride(1) == d and v.stride(2) == heads * d and v.stride(3) == 1 and v.stride(0) == k * heads * d
    if dense and value_map.shape[0] == b:
        mixed = torch.bmm(value_map[:, 0], v.transpose(1, 2).reshape(b, k, heads * d))  # (B, K_keys, heads·d)
        return mixed.view(b, -1, heads, d).transpose(1, 2)
    return torch.matmul(value_map, v)


def _add(out: torch.Tensor, o: torch.Tensor, rows: slice | None) -> torch.Tensor:
    """``out + o``, or ``o`` added into ``out``'s ``rows``: in place without autograd (a fresh SDPA sum), else a
    new tensor (SDPA's backward keeps its output)."""
    if rows is None:
        return out + o
    if not torch.is_grad_enabled():
        out[rows].add_(o)  # into the view: one kernel (``out[rows] += o`` would copy it back as well)
        return out
    return torch.slice_scatter(out, out[rows] + o, 0, rows.start, rows.stop)


def on_device(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host-built tensor moved to ``device`` (and ``dtype``) without a blocking copy: pinned and non-blocking
    to CUDA; elsewhere (and while torch.compile traces) a plain ``.to``."""
    if torch.compiler.is_compiling():
        return tensor.to(device) if dtype is None else tensor.to(device=device, dtype=dtype)
    cuda = device.type == "cuda" if isinstance(device, torch.device) else str(device).startswith("cuda")
    if cuda and tensor.device.type == "cpu":
        return tensor.to(dtype=dtype).pin_memory().to(device, non_blocking=True)
    return tensor.to(device) if dtype is None else tensor.to(device=device, dtype=dtype)


_ROW_INDEX: "weakref.WeakKeyDictionary[object, dict[tuple, torch.Tensor]]" = weakref.WeakKeyDictionary()


def row_index(rows: torch.Tensor, device: torch.device | str, owner: object = None) -> torch.Tensor:
    """``rows`` (B,) long, a host tensor, on ``device`` — within one ``owner`` (the session the controllers are
    bound to; its entries go with it) the same tensor object for the same rows and device, so that plans of
    different controllers that pick the same rows (Replace's source rows and InjectSelf's) are recognised by
    identity at every site without reading the device (a joint site then runs one plain SDPA call instead of the
    concatenated-features one) and the rows are copied to the device once. No owner: a plain copy."""
    try:
        cache = _ROW_INDEX.setdefault(owner, {}) if owner is not None else None
    except TypeError:  # an owner that takes no weak reference
        cache = None
    if cache is None:
        return on_device(rows, device)
    key = (tuple(int(r) for r in rows.tolist()), str(device))  # host tensor: no device read
    index = cache.get(key)
    if index is None:
        index = cache[key] = on_device(rows, device)
    return index


def attention_probs(
    query: torch.Tensor,  # (B, heads, Q, d)
    key: torch.Tensor,  # (B, heads, K, d)
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:  # (B, heads, Q, K), float32, rows sum to 1
    """Explicit softmax attention probabilities with SDPA's scale ``1/sqrt(d)``, computed in float32."""
    scale = query.shape[-1] ** -0.5
    if query.dtype != torch.float32:
        query, key = query.float(), key.float()
    logits = torch.matmul(query, key.transpose(-1, -2)).mul_(scale)  # in place: a fresh tensor
    if attention_mask is not None:
        logits = logits + _additive(attention_mask, torch.float32).float()
    return logits.softmax(dim=-1)


def _term_probs(term: AttentionTerm, probs: torch.Tensor) -> torch.Tensor:
    """The probabilities a term's softmax gives: ``probs[qk_rows]``, renormalised under its logit bias."""
    p = probs if term.qk_rows is None else probs[term.qk_rows]
    if term.logit_bias is not None:  # softmax(l + b) = p * e^b / sum(p * e^b)
        p = p * term.logit_bias.float().exp()[:, None, None, :]
        p = p / p.sum(dim=-1, keepdim=True)
    return p


def run_plan_on_probs(
    plan: AttentionPlan,
    probs: torch.Tensor,  # (B, heads, Q, K) float32, each row's own attention
    value: torch.Tensor,  # (B, heads, K, d)
) -> torch.Tensor:  # (B, heads, Q, d)
    """The same result as :func:`run_plan`, from already materialised probabilities (used where a recorder asked)."""
    if plan is IDENTITY:  # the common recording case: the same op as the loop below gives for a plain term
        return torch.matmul(probs if probs.dtype == value.dtype else probs.to(value.dtype), value)
    out = None
    for term in plan.terms:
        o = torch.matmul(_term_probs(term, probs).to(value.dtype), transformed_values(term, value))
        out = o if out is None else out + o
    return out


def maps_used(
    plan: AttentionPlan,
    probs: torch.Tensor,  # (B, heads, Q, K) float32, each row's own attention
) -> torch.Tensor:  # (B, heads, Q, K)
    """The attention map each row actually uses under ``plan``, so that ``maps_used(plan, p) @ v`` is the plan's
    output: term by term the term's probabilities @ value_map, times value_scale per token."""
    if plan.is_identity:
        return probs
    out = None
    for term in plan.terms:
        p = _term_probs(term, probs)
        if term.value_map is not None:
            p = torch.einsum("bhqk,bkn->bhqn", p, term.value_map.float())
        if term.value_scale is not None:
            p = p * term.value_scale.float()[:, None, None, :]
        out = p if out is None else out + p
    return out
