"""The network's choices of kernel that need no oracle: a faster kernel is used only where it computes exactly what
the reference's own operations compute, or (a canvas's attention off the reference path in bf16) what transformers'
eager attention computes, within a stated bound."""

from __future__ import annotations

import pytest
import torch

import dgemma.model
from dgemma.model import rms_norm, rms_norm_as_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [16, 33, 256, 512, 2816])
def test_rms_norm_is_bit_identical_to_the_reference_operations(dtype, width):
    generator = torch.Generator().manual_seed(width)
    for scale in (1e-3, 1.0, 30.0):
        x = (torch.randn(1024, width, generator=generator) * scale).to(dtype)
        weight = torch.randn(width, generator=generator).to(dtype)
        for w in (weight, None):
            assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_as_reference(x, w, 1e-6)), (scale, w is None)


def test_rms_norm_gradients_match_the_reference_operations():
    """Training differentiates through torch's rms_norm; its gradients agree with those of the composite."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=generator, requires_grad=True)
    weight = torch.randn(96, generator=generator, requires_grad=True)
    upstream = torch.randn(64, 96, generator=generator)
    grads = []
    for norm in (rms_norm, rms_norm_as_reference):
        x.grad = weight.grad = None
        (norm(x, weight, 1e-6) * upstream).sum().backward()
        grads.append((x.grad.clone(), weight.grad.clone()))
    for fused, composite in zip(*grads):
        torch.testing.assert_close(fused, composite, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv_heads", [4, 1])
def test_many_query_attention_with_matmuls_is_sdpas_formula_and_rounds_only_scores_and_probabilities(kv_heads):
    """`attend_with_matmuls` (a canvas's or prompt's attention off the reference path in bf16 or fp16 on a CPU): in
    float64 it is SDPA's result (grouped query heads folded, the mask, a query that sees no key giving zeros); in
    bf16 it stays within 0.02 of the float64 result of its bf16 inputs (scores and probabilities rounded to bf16);
    attend takes it only for exact=False in bf16 / fp16 (on a CPU with native half-precision matmuls; without, float32's
    attention: tests/test_widening.py), SDPA otherwise."""
    from dgemma import widening
    from dgemma.model import attend, attend_with_matmuls

    generator = torch.Generator().manual_seed(0)
    batch, heads, queries, keys, dim = 2, 8, 6, 37, 64
    q = torch.randn(batch, heads, queries, dim, generator=generator) / 2
    k = torch.randn(batch, kv_heads, keys, dim, generator=generator) / 2
    v = torch.randn(batch, kv_heads, keys, dim, generator=generator)
    mask = torch.rand(batch, 1, queries, keys, generator=generator) > 0.3
    mask[1, 0, 3] = False  # a query that sees nothing
    for m in (mask, None):
        wide = [t.double() for t in (q, k, v)]
        expected = torch.nn.functional.scaled_dot_product_attention(*wide, attn_mask=m, scale=1.0,
                                                                    enable_gqa=kv_heads != heads)
        torch.testing.assert_close(attend_with_matmuls(*wide, m), expected, rtol=1e-12, atol=1e-12)
        low = [t.to(torch.bfloat16) for t in (q, k, v)]
        truth = torch.nn.functional.scaled_dot_product_attention(*[t.double() for t in low], attn_mask=m, scale=1.0,
                                                                 enable_gqa=kv_heads != heads)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(widening, "native_half_matmuls", lambda: True)
            out = attend(*low, m, exact=False)
        assert out.dtype == torch.bfloat16 and torch.equal(out, attend_with_matmuls(*low, m))
        torch.testing.assert_close(out.double(), truth, rtol=0, atol=0.02)
        assert torch.equal(attend(*low, m), torch.nn.functional.scaled_dot_product_attention(
            *low, attn_mask=m, scale=1.0, enable_gqa=kv_heads != heads))  # exact: SDPA itself
    low = [t.to(torch.bfloat16) for t in (q, k, v)]
    whole = attend_with_matmuls(*low, mask)
    with pytest.MonkeyPatch.context() as patch:  # scores for 2 queries at a time (a long prompt's way)
        patch.setattr(dgemma.model, "SCORE_VALUES", batch * heads * keys * 2)
        torch.testing.assert_close(attend_with_matmuls(*low, mask).float(), whole.float(), rtol=2**-7, atol=1e-2)
    many = attend(q, k, v, mask, exact=False)  # fp32: SDPA, no faster another way
    assert torch.equal(many, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0,
                                                                              enable_gqa=kv_heads != heads))


@pytest.mark.parametrize("kv_heads", [4, 1])
def test_one_query_attention_is_sdpas_result_in_float32_and_the_float64_one_rounded_in_bf16(kv_heads):
    """`attend_one_query` (a token's attention off the reference path): fp32 equals SDPA to float32 rounding, grouped
    query heads and the mask included; bf16 is the float64 result rounded once (within half a bf16 unit, doubled)."""
    from dgemma.model import attend, attend_one_query

    generator = torch.Generator().manual_seed(0)
    batch, heads, keys, dim = 2, 8, 37, 64
    q = torch.randn(batch, heads, 1, dim, generator=generator) / 4
    k = torch.randn(batch, kv_heads, keys, dim, generator=generator) / 4
    v = torch.randn(batch, kv_heads, keys, dim, generator=generator)
    mask = torch.rand(batch, 1, 1, keys, generator=generator) > 0.3
    mask[..., 0] = True
    for m in (mask, None):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=1.0,
                                                                    enable_gqa=kv_heads != heads)
        torch.testing.assert_close(attend_one_query(q, k, v, m), expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(attend(q, k, v, m, exact=False), attend_one_query(q, k, v, m))
        assert torch.equal(attend(q, k, v, m), expected)  # exact: SDPA itself
    low = [t.to(torch.bfloat16) for t in (q, k, v)]
    truth = attend_one_query(*[t.double() for t in low], mask)
    out = attend_one_query(*low, mask)
    assert out.dtype == torch.bfloat16
    assert ((out.double() - truth).abs() <= 2**-8 * truth.abs() + 1e-6).all()
