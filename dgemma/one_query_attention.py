"""A token's attention on CPUs with AVX-512 BF16 or with AVX2: a C++ kernel (dgemma/kernels/one_query_attention.cpp)
built at first use with the machine's C++ compiler against the installed torch (`dgemma.compiling.built_library`),
with this CPU's instructions, and loaded as the op `torch.ops.dgemma.avx512_one_query_attention` or
`avx2_one_query_attention`.

An autoregressive token's query attends to the whole cache of its layer (a released sliding layer's up to 1,024 keys
of 8 heads of 256, a full layer's every key of 2 heads of 512). `dgemma.model.attend_one_query` computes it in
float32 as two batched matmuls, which first widen every key and value to a float32 copy: the cache's bytes through
memory five times over, which grows with the context. This kernel reads each key and value once, in chunks of 256
keys spread over the threads, with the same float32 arithmetic (products of the bf16 values, float32 sums in
another order, a polynomial exponential within 2 units in the last place), rounding the result once to bf16.
Measured on a 2-core AMD EPYC of family 25 (Zen 3, AVX2), the eager attention of 16 query heads over 8 key heads of
256: 0.51 ms at 260 keys, 1.9 ms at 1,024 (a sliding layer's window) and 51 ms at 4,096; over 2 key heads of 512
(a full layer) 0.49 ms at 260 keys and 10.5 ms at 4,096 (docs/cpu.md has the kernel's).

`available()`: the CPU has AVX-512 BF16 (the AVX-512 build) or AVX2 and no AVX-512 (the AVX2 build), compiling is
allowed (DGEMMA_COMPILE is not 0), the library builds and loads, and on a small case its result is the float64 one
to bf16 rounding; otherwise a token's attention stays eager.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .compiling import AVX2_FLAGS, AVX512_FLAGS, compiling_allowed, library_loads, load_library

SOURCE = Path(__file__).parent / "kernels" / "one_query_attention.cpp"
MAX_GROUP = 16  # query heads a key head may serve (the kernel's kMaxGroup)


@functools.cache
def build() -> tuple[str, tuple[str, ...]] | None:
    """The kernel's build for this CPU (read once: a token asks at every layer): its op's name and compiler flags,
    or None where there is none (neither AVX-512 BF16 nor AVX2; and AVX-512 without BF16, where the AVX2 build has
    not been measured: no such machine here)."""
    if torch.cpu._is_avx512_bf16_supported():
        return "avx512_one_query_attention", AVX512_FLAGS
    if torch.cpu._is_avx2_supported() and not torch.cpu._is_avx512_supported():
        return "avx2_one_query_attention", AVX2_FLAGS
    return None


def one_query(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q [B, H, 1, D] bf16 attending (scale 1) to keys and values [B, H_kv, S, D] bf16 (views of a longer cache
    are fine: their last dimension must be contiguous) under a boolean mask [B, 1, 1, S] (None: every key):
    [B, H, 1, D] bf16. A query that sees no key gets zeros. No derivative."""
    op, flags = build()
    load_library(SOURCE, flags)
    if mask is not None:  # one mask for every row may come broadcast
        mask = mask.expand(q.shape[0], 1, 1, keys.shape[2])
    return getattr(torch.ops.dgemma, op)(q, keys, values, mask)


def takes(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether a query [B, H, 1, D] and its keys and values run in the kernel: bf16 on a CPU, D a multiple of 16, at
    most MAX_GROUP query heads a key head, rows contiguous, no gradient to record, and the kernel available."""
    return (q.device.type == "cpu" and q.dtype == keys.dtype == values.dtype == torch.bfloat16
            and q.shape[-1] % 16 == 0 and q.shape[1] % keys.shape[1] == 0 and q.shape[1] // keys.shape[1] <= MAX_GROUP
            and keys.stride(-1) == 1 and values.stride(-1) == 1
            and not (torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad or values.requires_grad))
            and available())


def _exact_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The attention in float64, for the check: softmax(q . k) v with the query heads grouped over the key heads."""
    batch, heads, _, dim = q.shape
    grouped = q.double().reshape(batch, keys.shape[1], heads // keys.shape[1], dim)
    scores = (grouped @ keys.double().transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ values.double()).reshape(batch, heads, 1, dim)


@functools.cache
def available() -> bool:
    """Whether this process runs a token's attention in this kernel: a build for this CPU (`build`), compiling
    allowed, the library builds and loads, and on a small case (two rows, a masked key, 600 keys: three chunks) its
    result is the float64 one to bf16 rounding."""
    if (not compiling_allowed() or build() is None
            or not library_loads(SOURCE, build()[1], "a token's attention runs eagerly")):
        return False
    generator = torch.Generator().manual_seed(0)
    q, keys, values = (torch.randn(2, heads, length, 32, generator=generator).to(torch.bfloat16)
                       for heads, length in ((8, 1), (2, 600), (2, 600)))
    mask = torch.rand(2, 1, 1, 600, generator=generator) > 0.2
    expected = _exact_attention(q, keys, values, mask)
    got = one_query(q, keys, values, mask).double()
    # 1e-5: float32 sums of scores carry about 1e-6 into outputs near zero (the eager float32 formula's too)
    return bool(((got - expected).abs() <= 2**-8 * expected.abs() + 1e-5).all())
