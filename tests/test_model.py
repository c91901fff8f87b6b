"""The network's choices of kernel that need no oracle: a faster kernel is used only where it computes exactly what
the reference's own operations compute."""

from __future__ import annotations

import pytest
import torch

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
