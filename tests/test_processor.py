"""ControlledAttnProcessor against stock diffusers ``AttnProcessor2_0``, branch by branch (issue 22, item 4).

The tiny UNets never run the prologue/epilogue branches that other diffusers models use (attention masks,
``group_norm``, 4-D inputs, ``spatial_norm``, ``residual_connection``, ``rescale_output_factor``, cross-norm,
q/k norms, fused projections). Each case below configures one diffusers ``Attention`` module to use its branch,
runs it with the stock processor and with ours (≤ 1e-5, float32) on every execution path of ours — no step
running, a pass-through controller, a recorder (explicit softmax), a fused plan that is numerically the
identity — and checks that the branch changes the stock output, so a processor that skipped it would fail.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from promptcontrol.context import StepContext, batch_layout
from promptcontrol.controllers.base import Controller, PassThrough
from promptcontrol.plan import AttentionPlan, AttentionTerm
from promptcontrol.processors.attention import ControlledAttnProcessor
from promptcontrol.sites import AttentionSite

BATCH = 2
TOL = 1e-5


@dataclass
class Case:
    """One ``Attention`` configuration, its inputs, and how to switch its branch off (``None``: no switch)."""

    name: str
    attn: Attention
    inputs: dict
    keys: int  # K, the number of keys per row
    switch_off: Callable[[Attention, dict], None] | None = None


def _randomised(attn: Attention, seed: int) -> Attention:
    """``attn`` with seeded random parameters: norm scales around 1, everything else around 0."""
    gen = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for module in attn.modules():
            for name, p in module.named_parameters(recurse=False):
                centre = 1.0 if isinstance(module, norms) and name == "weight" else 0.0
                p.copy_(centre + 0.3 * torch.randn(p.shape, generator=gen))
    return attn.eval()


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _cross(seed: int, **config) -> Attention:
    return _randomised(Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8, **config), seed)


def _self(seed: int, query_dim: int = 16, **config) -> Attention:
    return _randomised(Attention(query_dim=query_dim, heads=2, dim_head=8, **config), seed)


def _additive_mask() -> torch.Tensor:
    """(B, 1, K=5) the way the UNet builds it from an encoder mask: 0 to keep, -10000 to drop (per row)."""
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], dtype=torch.float32)
    return ((1 - keep) * -10000.0)[:, None, :]


def _cross_inputs(mask: torch.Tensor | None = None) -> dict:
    inputs = {"hidden_states": _randn(BATCH, 6, 16, seed=1), "encoder_hidden_states": _randn(BATCH, 5, 12, seed=2)}
    if mask is not None:
        inputs["attention_mask"] = mask
    return inputs


def _drop(key: str) -> Callable[[Attention, dict], None]:
    return lambda attn, inputs: inputs.pop(key)


def _unset(name: str, value=None) -> Callable[[Attention, dict], None]:
    return lambda attn, inputs: setattr(attn, name, value)


def _no_qk_norm(attn: Attention, inputs: dict) -> None:
    attn.norm_q = attn.norm_k = None


def _fused(attn: Attention) -> Attention:
    attn.fuse_projections()
    return attn


def cases() -> list[Case]:
    self_3d = {"hidden_states": _randn(BATCH, 9, 16, seed=3)}
    return [
        Case("additive mask", _cross(10), _cross_inputs(_additive_mask()), 5, _drop("attention_mask")),
        Case("boolean mask", _cross(11), _cross_inputs(_additive_mask() == 0), 5, _drop("attention_mask")),
        Case("2-D mask", _cross(12), _cross_inputs(_additive_mask()[:, 0]), 5, _drop("attention_mask")),
        Case("group_norm", _self(13, norm_num_groups=4), dict(self_3d), 9, _unset("group_norm")),
        Case("4-D input (non-square)", _self(14), {"hidden_states": _randn(BATCH, 16, 3, 4, seed=4)}, 12),
        Case(
            "spatial_norm (4-D, temb = zq)",
            _self(15, query_dim=32, spatial_norm_dim=3),
            {"hidden_states": _randn(BATCH, 32, 4, 4, seed=5), "temb": _randn(BATCH, 3, 2, 2, seed=6)},
            16,
            _unset("spatial_norm"),
        ),
        Case("residual_connection", _self(16, residual_connection=True), dict(self_3d), 9,
             _unset("residual_connection", False)),
        Case("rescale_output_factor 2.5", _self(17, rescale_output_factor=2.5), dict(self_3d), 9,
             _unset("rescale_output_factor", 1.0)),
        Case(
            "VAE mid-block layout (4-D, group_norm, residual, rescale)",
            _randomised(Attention(query_dim=16, heads=1, dim_head=16, norm_num_groups=4, eps=1e-6, bias=True,
                                  residual_connection=True, rescale_output_factor=2.0, upcast_softmax=True,
                                  _from_deprecated_attn_block=True), 18),
            {"hidden_states": _randn(BATCH, 16, 3, 3, seed=7)},
            9,
            _unset("residual_connection", False),
        ),
        Case("cross-attention layer norm", _cross(19, cross_attention_norm="layer_norm"), _cross_inputs(), 5,
             _unset("norm_cross")),
        Case("q/k layer norm", _self(20, qk_norm="layer_norm"), dict(self_3d), 9, _no_qk_norm),
        Case("fused projections, cross with mask", _fused(_cross(21)), _cross_inputs(_additive_mask()), 5,
             _drop("attention_mask")),
        Case("fused projections, self", _fused(_self(22)), dict(self_3d), 9),
    ]


CASES = {case.name: case for case in cases()}


# ---- the processor's execution paths ------------------------------------------------------------------------
class Recorder(Controller):
    """Asks for the probabilities at every site (the explicit-softmax path) and keeps the last ones."""

    def applies_to(self, site):
        return True

    def wants_probs(self, site, ctx):
        return True

    def record(self, site, ctx, probs, plan):
        self.probs = probs


class IdentityPlan(Controller):
    """A fused plan that is not flagged as the identity but computes it: own rows' q/k, values × 1, logits + 0."""

    def __init__(self, keys: int):
        self.keys = keys

    def applies_to(self, site):
        return True

    def plan(self, site, ctx, plan):
        rows = torch.arange(ctx.batch_size)  # (B,)
        ones = torch.ones(ctx.batch_size, self.keys)  # (B, K)
        term = AttentionTerm(qk_rows=rows, value_scale=ones, logit_bias=torch.zeros_like(ones))
        return AttentionPlan((term,))


SITE = AttentionSite(key="test.attn.processor", kind="cross", place="down", block=0, attention=0, layer=0,
                     level=0, heads=2)
STEP = StepContext(index=0, timestep=999.0, total=1, latent_hw=(4, 4), layout=batch_layout(BATCH, None))
PATHS = {
    "no step running": lambda keys: (None, []),
    "pass-through": lambda keys: (STEP, [PassThrough()]),
    "recorded (explicit softmax)": lambda keys: (STEP, [Recorder()]),
    "fused identity plan": lambda keys: (STEP, [IdentityPlan(keys)]),
}


def _run(attn: Attention, processor, inputs: dict) -> torch.Tensor:
    """``attn`` called as diffusers calls it, with ``processor`` installed (inputs are never modified)."""
    attn.set_processor(processor)
    with torch.no_grad():
        return attn(**{k: v.clone() for k, v in inputs.items()})


def _ours(case: Case, path: str) -> ControlledAttnProcessor:
    context, controllers = PATHS[path](case.keys)
    return ControlledAttnProcessor(SimpleNamespace(context=context), SITE, controllers)


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("name", list(CASES))
def test_processor_equals_stock_attn_processor_2_0(name, path):
    case = CASES[name]
    stock = _run(case.attn, AttnProcessor2_0(), case.inputs)
    ours = _run(case.attn, _ours(case, path), case.inputs)
    assert ours.shape == stock.shape == case.inputs["hidden_states"].shape  # 3-D or 4-D, as it came in
    assert (ours - stock).abs().max().item() <= TOL, (name, path, (ours - stock).abs().max().item())


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.switch_off is not None])
def test_each_branch_changes_the_stock_output(name):
    """Without this, a case whose branch did nothing (a mask keeping every key, an identity norm) would pass with
    a processor that skipped the branch."""
    case = CASES[name]
    attn, inputs = copy.deepcopy(case.attn), dict(case.inputs)
    case.switch_off(attn, inputs)
    on = _run(case.attn, AttnProcessor2_0(), case.inputs)
    off = _run(attn, AttnProcessor2_0(), inputs)
    assert (on - off).abs().max().item() > 1e-2, name


def test_recorded_probabilities_respect_the_mask():
    """The explicit path's probabilities are zero on masked keys and sum to 1 over the kept ones."""
    case = CASES["boolean mask"]
    recorder = Recorder()
    _run(case.attn, ControlledAttnProcessor(SimpleNamespace(context=STEP), SITE, [recorder]), case.inputs)
    keep = case.inputs["attention_mask"][:, 0]  # (B, K) bool
    probs = recorder.probs  # (B, heads, Q, K)
    assert probs.shape == (BATCH, 2, 6, 5)
    assert probs.masked_select(~keep[:, None, None, :]).abs().max().item() == 0.0
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-6)
