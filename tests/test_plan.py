"""The fused plan equals explicit softmax attention written out here (float32, ≤1e-5)."""

import torch

from promptcontrol.plan import AttentionPlan, AttentionTerm, attention_probs, run_plan, run_plan_on_probs

B, H, Q, K, D = 3, 2, 10, 7, 8


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, D, generator=g) for n in (Q, K, K))


def reference_probs(q, k, bias=None):
    logits = q @ k.transpose(-1, -2) / D**0.5
    if bias is not None:
        logits = logits + bias
    return torch.exp(logits - logits.amax(-1, keepdim=True)) / torch.exp(logits - logits.amax(-1, keepdim=True)).sum(-1, keepdim=True)


def test_identity_plan_is_plain_attention():
    q, k, v = qkv()
    out = run_plan(AttentionPlan(), q, k, v, None)
    assert torch.allclose(out, reference_probs(q, k) @ v, atol=1e-5)


def test_value_scale_equals_probabilities_scaled_after_softmax():
    q, k, v = qkv(1)
    w = torch.rand(B, K) * 3
    out = run_plan(AttentionPlan().scaled(w), q, k, v, None)
    expected = (reference_probs(q, k) * w[:, None, None, :]) @ v  # equalizer: not renormalised
    assert torch.allclose(out, expected, atol=1e-5)


def test_log_bias_equals_renormalised_reweight():
    q, k, v = qkv(2)
    w = torch.rand(B, K) * 3 + 0.1
    out = run_plan(AttentionPlan().biased(w.log()), q, k, v, None)
    p = reference_probs(q, k) * w[:, None, None, :]
    expected = (p / p.sum(-1, keepdim=True)) @ v
    assert torch.allclose(out, expected, atol=1e-5)


def test_rows_and_value_map_terms():
    q, k, v = qkv(3)
    rows = torch.tensor([0, 0, 1])
    m = torch.rand(B, K, K)
    alpha = torch.rand(B, K)
    plan = AttentionPlan(
        (AttentionTerm(qk_rows=rows, value_scale=alpha, value_map=m), AttentionTerm(value_scale=1 - alpha))
    )
    out = run_plan(plan, q, k, v, None)
    p = reference_probs(q, k)
    for b in range(B):
        src = p[rows[b]]  # (H, Q, K)
        first = src @ (m[b] @ (alpha[b][:, None] * v[b]))
        second = p[b] @ ((1 - alpha[b])[:, None] * v[b])
        assert torch.allclose(out[b], first + second, atol=1e-5)


def test_probability_path_matches_fused_path_with_masks():
    q, k, v = qkv(4)
    mask = torch.zeros(B, 1, 1, K)
    mask[..., -2:] = -10000.0
    plan = AttentionPlan(
        (AttentionTerm(qk_rows=torch.tensor([2, 1, 0]), logit_bias=torch.rand(B, K)), AttentionTerm(value_scale=torch.rand(B, K)))
    )
    fused = run_plan(plan, q, k, v, mask)
    probs = attention_probs(q, k, mask)
    assert torch.allclose(probs.sum(-1), torch.ones(B, H, Q), atol=1e-6)
    assert torch.allclose(run_plan_on_probs(plan, probs, v), fused, atol=1e-5)


def test_boolean_mask_is_honoured():
    q, k, v = qkv(5)
    keep = torch.ones(B, 1, 1, K, dtype=torch.bool)
    keep[..., 0] = False
    out = run_plan(AttentionPlan().biased(torch.zeros(B, K)), q, k, v, keep)
    expected = reference_probs(q[..., :, :], k[:, :, 1:]) @ v[:, :, 1:]
    assert torch.allclose(out, expected, atol=1e-5)


def test_prepared_terms_fold_scale_into_the_token_map_and_give_the_reference():
    """run_prepared (what the processors run) = the explicit reference of the scaled, mixed term; a term with
    both a scale and a map is prepared as one matrix (one kernel less per site)."""
    from promptcontrol.plan import prepare, run_prepared

    q, k, v = qkv(4)
    rows = torch.tensor([0, 0, 1])
    m, alpha = torch.rand(B, K, K), torch.rand(B, K)
    plan = AttentionPlan((AttentionTerm(qk_rows=rows, value_scale=alpha, value_map=m),))
    terms = prepare(plan, torch.float32)
    assert terms[0].value_scale is None and terms[0].value_map is not None
    out = run_prepared(terms, q, k, v, None)
    p = reference_probs(q, k)
    for b in range(B):
        assert torch.allclose(out[b], p[rows[b]] @ (m[b] @ (alpha[b][:, None] * v[b])), atol=1e-5)
