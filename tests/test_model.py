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
