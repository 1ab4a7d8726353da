"""Host work per controlled attention call (issue 19): which tensor operations a site runs, counted with a
``TorchDispatchMode``, and which per-step work is done once instead of at every site. The numbers themselves are
checked by the exactness tests (test_plan, test_edit_controllers, test_store); these pin the structure down."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch.utils._python_dispatch import TorchDispatchMode

import promptcontrol as pc
import promptcontrol.processors.attention as attention_module
from promptcontrol.controllers.inject import InjectSelf
from promptcontrol.plan import AttentionPlan, AttentionTerm, prepare, run_plan, run_prepared

SOURCE, EDIT = "a red car parked on a street", "a blue car parked on a street"


class Ops(TorchDispatchMode):
    """The names of the aten operations run inside the mode."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def qkv(batch=3, heads=2, q=10, k=7, d=8, seed=0):
    """q, k, v as a processor sees them: (B, heads, N, d) views of (B, N, heads·d) projections."""
    g = torch.Generator().manual_seed(seed)
    split = lambda n: torch.randn(batch, n, heads * d, generator=g).view(batch, n, heads, d).transpose(1, 2)  # noqa: E731
    return split(q), split(k), split(k)


@pytest.mark.parametrize("rows", [(1, 1, 1), (0, 1, 2), (0, 0, 2)])
def test_rows_known_on_the_host_give_the_same_output_as_index_rows(rows):
    q, k, v = qkv()
    term = AttentionTerm(qk_rows=torch.tensor(rows), value_scale=torch.rand(3, 7), qk_rows_host=rows)
    plan = AttentionPlan((term, AttentionTerm(value_scale=torch.rand(3, 7))))
    expected = run_plan(plan, q, k, v, None)  # advanced indexing, einsum: the reference executor
    out = run_prepared(prepare(plan, torch.float32), q, k, v, None)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_one_source_row_for_every_row_is_a_view_and_own_rows_no_selection():
    q, k, v = qkv()
    same = prepare(AttentionPlan((AttentionTerm(qk_rows=torch.tensor([1, 1, 1]), qk_rows_host=(1, 1, 1)),)), torch.float32)
    own = prepare(AttentionPlan((AttentionTerm(qk_rows=torch.tensor([0, 1, 2]), qk_rows_host=(0, 1, 2)),)), torch.float32)
    assert same[0].qk_rows is None and same[0].one_row == 1 and own[0].qk_rows is None and own[0].one_row is None
    with Ops() as ops:
        out = run_prepared(same, q, k, v, None)
    assert "index_select" not in ops.names and "index" not in ops.names, ops.names
    assert out.transpose(1, 2).is_contiguous()  # the processor's reshape to (B, Q, heads·d) is a view, as stock's
    torch.testing.assert_close(out, run_plan(AttentionPlan((AttentionTerm(qk_rows=torch.tensor([1, 1, 1])),)), q, k, v, None))


def test_rows_without_host_ints_keep_the_projection_layout():
    """index_select on the (B, N, heads, d) memory: SDPA's output keeps stock's layout (no copy in the reshape)."""
    q, k, v = qkv()
    terms = prepare(AttentionPlan((AttentionTerm(qk_rows=torch.tensor([0, 0, 2])),)), torch.float32)
    out = run_prepared(terms, q, k, v, None)
    assert out.transpose(1, 2).is_contiguous()


def _one_call_ops(pipe, controllers, prompts, guidance, want_cross: bool) -> list[str]:
    """The aten ops of one controlled attention call (cross or self) at the second denoising step."""
    side = 8 * pipe.vae_scale_factor
    state = {"step": 0, "ops": None}
    original = Attention.forward

    def forward(module, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        controlled = type(module.processor).__module__.startswith("promptcontrol")
        if state["step"] == 1 and state["ops"] is None and controlled and (encoder_hidden_states is not None) == want_cross:
            with Ops() as ops:
                out = original(module, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
            state["ops"] = ops.names
            return out
        return original(module, hidden_states, encoder_hidden_states, attention_mask, **kwargs)

    def on_step(p, i, t, kwargs):
        state["step"] += 1
        return kwargs

    Attention.forward = forward
    try:
        with pc.control(pipe, *controllers), torch.inference_mode():
            pipe(prompts, height=side, width=side, num_inference_steps=3, guidance_scale=guidance,
                 output_type="latent", callback_on_step_end=on_step)
    finally:
        Attention.forward = original
    assert state["ops"] is not None, "no controlled call was seen"
    return state["ops"]


@pytest.mark.parametrize("cross", [True, False])
def test_replace_and_inject_without_guidance_copy_no_rows(sd15, cross):
    """One source and one edit without guidance: every row takes the source row's queries and keys — broadcast
    views, so the site runs stock's kernels and no more (no row copies, no output copy)."""
    ops = _one_call_ops(sd15, (pc.Replace(1.0), InjectSelf(1.0)), [SOURCE, EDIT], 1.0, cross)
    assert "index_select" not in ops and "index" not in ops, ops
    assert ops.count("_scaled_dot_product_flash_attention_for_cpu") + ops.count("scaled_dot_product_attention") >= 1
    assert "clone" not in ops and "_unsafe_view" not in ops, ops  # the output's reshape stays a view


def test_recording_adds_into_the_running_sum_in_one_kernel(sd15):
    """From a site's second recorded call on, the store adds the conditional rows' head sum with one addmm_ (no
    row slice, no sum over heads, no view of the running sum built per call)."""
    store = pc.AttentionStore()
    site = next(s for s in pc.find_sites(sd15.unet) if s.kind == "cross")
    calls = []
    record = store.record

    def spy(site_, ctx, probs, plan):
        if site_.key == site.key:
            with Ops() as ops:
                record(site_, ctx, probs, plan)
            calls.append(ops.names)
        else:
            record(site_, ctx, probs, plan)

    store.record = spy
    side = 8 * sd15.vae_scale_factor
    with pc.control(sd15, store), torch.inference_mode():
        sd15(SOURCE, height=side, width=side, num_inference_steps=3, output_type="latent")
    assert len(calls) == 3
    assert [n for n in calls[2] if n not in ("view", "_reshape_alias", "reshape")] == ["addmm_"], calls[2]


def test_an_edit_plan_is_prepared_once_while_its_windows_stay_the_same(sd15, monkeypatch):
    """Replace and InjectSelf hand out the same plan objects while their windows do not change: the sites' prepared
    form is made once per plan and dtype for the whole run, not once per step."""
    prepared = []
    real = attention_module.prepare
    monkeypatch.setattr(attention_module, "prepare", lambda plan, dtype: prepared.append(plan) or real(plan, dtype))
    side = 8 * sd15.vae_scale_factor
    with pc.control(sd15, pc.Replace(1.0), InjectSelf(1.0)), torch.inference_mode():
        sd15([SOURCE, EDIT], height=side, width=side, num_inference_steps=4, guidance_scale=1.0, output_type="latent")
    assert len(prepared) == 2, prepared  # Replace's plan (cross sites) and InjectSelf's (self sites)
    assert len({id(p) for p in prepared}) == 2


class SdpaBatches(TorchDispatchMode):
    """The batch of every SDPA call run inside the mode."""

    def __init__(self):
        super().__init__()
        self.batches: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in func.__name__:
            self.batches.append(int(args[0].shape[0]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_a_later_term_runs_on_its_active_rows_only(grad, masked):
    """Refine's own-map term has zero values except at the edited rows: it runs SDPA on those rows alone and adds
    into them (in place without autograd, as a new tensor with it), with the reference's numbers — also with an
    attention mask and a logit bias (cut to the same rows)."""
    q, k, v = qkv()
    own = torch.zeros(3, 7)
    own[1] = torch.rand(7)
    second = AttentionTerm(value_scale=own, active_rows=(1,))
    if masked:
        second = AttentionTerm(value_scale=own, logit_bias=torch.rand(3, 7).log(), active_rows=(1,))
    mask = torch.zeros(3, 1, 1, 7).masked_fill(torch.arange(7) == 6, float("-inf")) if masked else None
    plan = AttentionPlan((
        AttentionTerm(qk_rows=torch.tensor([0, 0, 2]), value_map=torch.rand(3, 7, 7), qk_rows_host=(0, 0, 2)),
        second,
    ))
    terms = prepare(plan, torch.float32)
    assert terms[1].out_rows == slice(1, 2) and terms[1].value_scale.shape[0] == 1
    with torch.set_grad_enabled(grad), SdpaBatches() as sdpa:
        out = run_prepared(terms, q, k, v, mask)
    assert sdpa.batches == [3, 1]
    torch.testing.assert_close(out, run_plan(plan, q, k, v, mask), atol=1e-6, rtol=0)


def test_refine_plan_names_the_rows_its_own_map_term_acts_on():
    from promptcontrol.controllers.replace import edit_plan

    size = 4
    edits = [(1, 0, torch.eye(size), torch.tensor([1.0, 0.0, 1.0, 1.0]))]  # row 1 keeps its own map at token 1
    plan = edit_plan(2, edits, size)
    assert plan.terms[1].active_rows == (1,)
