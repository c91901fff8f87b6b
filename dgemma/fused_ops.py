"""A layer's small operations fused, for forwards off the reference path (`exact=False`) on a CPU: a C++ kernel
(dgemma/kernels/fused_ops.cpp) built at first use with the machine's C++ compiler against the installed torch and
loaded as four ops: `torch.ops.dgemma.rms_norm` (the norm, then a residual added and a scalar multiplied),
`rms_norm_rope` (each head's norm, then its rotary embedding), `route` (the router's softmax, top-k, renormalisation
and per-expert scale) and `weighted_sum` (a token's experts' outputs times their weights, summed).

A token's layer is a string of small operations between large matrix products, and each product streams megabytes
of weights through the caches, evicting the code and data of what comes next: on a 2-core AMD EPYC of family 25
(Zen 3), torch's `rms_norm` of one released row (2,816 bf16 values, eight operations inside) took 25 us from warm
caches and 60 to 180 us inside a token, where a released layer's token has eleven of them, two RoPEs of seven
operations each, a router's six after its product and the experts' four for their sum. Each is one call here, one
pass over its rows, in float32 rounded once to the input's dtype, where the reference rounds after every operation:
the results differ from the reference's path by its roundings.

`available()`: the CPU has AVX2, compiling is allowed (DGEMMA_COMPILE is not 0), the library builds and loads, and
on small cases each op agrees with the reference's operations in float64 to float32 rounding.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .compiling import AVX2_FLAGS, compiling_allowed, library_loads, load_library

SOURCE = Path(__file__).parent / "kernels" / "fused_ops.cpp"
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


def route(logits: torch.Tensor, k: int, per_expert_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] -> (weights [N, k] float32, index [N, k] int64): softmax over E in float32, the k largest in
    descending order, renormalised to sum to 1, each times per_expert_scale [E] (logits' dtype) at its expert. No
    derivative."""
    load_library(SOURCE, AVX2_FLAGS)
    return torch.ops.dgemma.route(logits.contiguous(), k, per_expert_scale.contiguous())


def weighted_sum(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """rows [N * k, H] (token n's k rows at n * k + j), weights [N, k] float32 -> [N, H] in rows' dtype: the sums of
    rows times weights in float32, in choice order, rounded once. No derivative."""
    load_library(SOURCE, AVX2_FLAGS)
    return torch.ops.dgemma.weighted_sum(rows.contiguous(), weights.contiguous())


def takes(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether an op on x (with `others`: a norm's weight, residual, rotary tables; a router's per-expert scale) runs
    in the kernel: on a CPU, in bf16, fp16 or float32 (the others of x's dtype), no gradient to record, and the kernel
    available."""
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
    """Whether this process runs these ops in the kernel: AVX2, compiling allowed, the library builds and loads, and on
    small float32 cases (norms of rows of 40 and 2,816 values: the loops' tails and their vector part; a router of 40
    experts; a weighted sum) each op gives the float64 result to float32 rounding (the router's choices exactly)."""
    if (not compiling_allowed() or not torch.cpu._is_avx2_supported()
            or not library_loads(SOURCE, AVX2_FLAGS, "a layer's small operations run in torch's")):
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
    logits, scale = torch.randn(3, 40, generator=generator), torch.rand(40, generator=generator)
    probabilities, index = logits.double().softmax(-1).topk(4)
    weights, got_index = route(logits, 4, scale)
    expected = probabilities / probabilities.sum(-1, keepdim=True) * scale.double()[index]
    rows = torch.randn(12, 40, generator=generator)
    summed = (rows.double().view(3, 4, 40) * weights.double()[..., None]).sum(1)
    return (torch.equal(got_index, index) and torch.allclose(weights.double(), expected, rtol=1e-5, atol=1e-6)
            and torch.allclose(weighted_sum(rows, weights).double(), summed, rtol=1e-5, atol=1e-5))
