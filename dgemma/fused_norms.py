"""A layer's RMS norms fused with what follows them, for forwards off the reference path (`exact=False`) on a CPU: a
C++ kernel (dgemma/kernels/fused_norms.cpp) built at first use with the machine's C++ compiler against the installed
torch and loaded as two ops, `torch.ops.dgemma.rms_norm` (the norm, then a residual added and a scalar multiplied)
and `rms_norm_rope` (each head's norm, then its rotary embedding).

A token's layer is a string of small operations between large matrix products, and each product streams megabytes
of weights through the caches, evicting the code and data of what comes next: on a 2-core AMD EPYC of family 25
(Zen 3), torch's `rms_norm` of one released row (2,816 bf16 values, eight operations inside) took 25 us from warm
caches and 60 to 180 us inside a token, where a released layer's token has eleven of them, two RoPEs of seven
operations each and three more elementwise ones. Each is one call here, one pass over its rows, in float32 rounded
once to the input's dtype, where the reference rounds after every operation: the results differ from the reference's
path by its roundings.

`available()`: the CPU has AVX2, compiling is allowed (DGEMMA_COMPILE is not 0), the library builds and loads, and
on small cases each op agrees with the reference's operations in float64 to float32 rounding.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .compiling import AVX2_FLAGS, compiling_allowed, library_loads, load_library

SOURCE = Path(__file__).parent / "kernels" / "fused_norms.cpp"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, residual: torch.Tensor | None = None,
             multiplier: torch.Tensor | None = None) -> torch.Tensor:
    """(residual + x * (mean(x^2) + eps)^-1/2 * weight) * multiplier over the last dimension of x, in float32,
    rounded once to x's dtype; weight [D], residual like x, multiplier one value; each optional. No derivative."""
    load_library(SOURCE, AVX2_FLAGS)
    return torch.ops.dgemma.rms_norm(x.contiguous(), weight, eps,
                                     None if residual is None else residual.contiguous(), multiplier)


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """x [B, T, H, D] -> [B, T, H, D]: each head's row normed (as `rms_norm`) to n, then n * cos + rotate_half(n) *
    sin with its token's cos and sin ([B, 1, T, D] or [1, 1, T, D], x's dtype), rounded once. No derivative."""
    load_library(SOURCE, AVX2_FLAGS)
    # [B * T, D], a table for every row (the op names a mismatch)
    tables = (table.expand(x.shape[0], *table.shape[1:]) if table.shape[0] == 1 else table for table in (cos, sin))
    return torch.ops.dgemma.rms_norm_rope(x.contiguous(), weight, *(t.reshape(-1, t.shape[-1]) for t in tables), eps)


def takes(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether a norm of x (with `others`: its weight, residual, rotary tables) runs in the kernel: on a CPU, in bf16,
    fp16 or float32 (the others of x's dtype), no gradient to record, and the kernel available."""
    tensors = (x, *(other for other in others if other is not None))
    return (x.device.type == "cpu" and x.dtype in DTYPES and all(t.dtype == x.dtype for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) and available())


def _reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    h = x.double()
    h = h * (h.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    return h if weight is None else h * weight.double()


def _rotated(n: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = n.shape[-1] // 2
    return n * cos.double() + torch.cat((-n[..., half:], n[..., :half]), dim=-1) * sin.double()


@functools.cache
def available() -> bool:
    """Whether this process runs norms in the kernel: AVX2, compiling allowed, the library builds and loads, and on
    small float32 cases (rows of 40 and 2,816 values: the loops' tails and their vector part) both ops are the float64
    ones to float32 rounding."""
    if (not compiling_allowed() or not torch.cpu._is_avx2_supported()
            or not library_loads(SOURCE, AVX2_FLAGS, "norms run in torch's operations")):
        return False
    generator = torch.Generator().manual_seed(0)
    for width in (40, 2816):
        x, residual = torch.randn(2, 3, 2, width, generator=generator), torch.randn(2, 3, 2, width, generator=generator)
        weight, multiplier = torch.randn(width, generator=generator), torch.tensor([0.75])
        cos, sin = torch.randn(2, 1, 3, width, generator=generator), torch.randn(2, 1, 3, width, generator=generator)
        expected = (residual.double() + _reference(x, weight, 1e-6)) * 0.75
        got = rms_norm(x, weight, 1e-6, residual, multiplier).double()
        rotated = _rotated(_reference(x, None, 1e-6), cos.transpose(1, 2), sin.transpose(1, 2))
        got_rotated = rms_norm_rope(x, None, cos, sin, 1e-6).double()
        if not (torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
                and torch.allclose(got_rotated, rotated, rtol=1e-5, atol=1e-5)):
            return False
    return True
