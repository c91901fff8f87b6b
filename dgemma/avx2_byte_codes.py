"""A few rows times a matrix of one-byte codes (Q8_0, Q6_K, Q5_*) on CPUs with AVX2 and no AVX-512: a C++ kernel
(dgemma/kernels/avx2_byte_codes.cpp), built at first use with the machine's C++ compiler against the installed torch
and loaded as the op `torch.ops.dgemma.avx2_byte_codes_rows`.

An autoregressive token multiplies one row by its 8-bit matrices (the vocabulary matrix under `int4` and `q4_k_m`,
attention and the router under `int4`, and the 6-bit ones of `q4_k_m`). Where the CPU has AVX-512, Inductor's loop
over the codes (`dgemma.quantized._few_rows_product`) reads them at 31 to 37 G codes/s; on AVX2 it loads 8 codes at a
time through a partial load and read a released Q8_0 attention matrix at about 1 G codes/s on a 2-core AMD EPYC of
family 25 (Zen 3): 11 ms, where its bf16 copy takes 1.8 ms, and the 262,144 x 2,816 vocabulary matrix 0.7 s a token.
This kernel widens 32 codes at a time and accumulates their products with the row in float32: what the compiled
loop computes, (code - zero) * scale (+ offset) times the row summed in float32, regrouped (the scale applied per
group, the zero and offset through the group's sum of the row), so a result can differ from it in its last bits.
Each output is one thread's sum in a fixed order: the same bits with any number of threads.

`available()` says whether this process uses it: the CPU has AVX2 and no AVX-512 (where Inductor's loop is fast),
compiling is allowed (DGEMMA_COMPILE is not 0), the build and load work, and on a small matrix of each group size its
products are the float64 ones to float32 rounding.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .compiling import AVX2_FLAGS, compiling_allowed, library_loads, load_library

SOURCE = Path(__file__).parent / "kernels" / "avx2_byte_codes.cpp"


def rows_times_codes(rows: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                     zero_code: int) -> torch.Tensor:
    """rows [M, K] float32 @ W.T -> [M, N] float32, W [N, K] = (codes - zero_code) * scale (+ offset) per group of
    K / scale.shape[1] values (16 or 32); codes uint8 [N, K], scale and offset float32 [N, K / group], contiguous.
    No derivative: backward through it raises."""
    load_library(SOURCE, AVX2_FLAGS)
    return torch.ops.dgemma.avx2_byte_codes_rows(rows, codes, scale, offset, zero_code)


def exact_product(rows: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                  zero_code: int) -> torch.Tensor:
    """`rows_times_codes` in float64, for checks: the dequantised matrix times the rows."""
    group = codes.shape[1] // scale.shape[1]
    values = (codes.double().view(*scale.shape, group) - zero_code) * scale.double().unsqueeze(-1)
    if offset is not None:
        values = values + offset.double().unsqueeze(-1)
    return rows.double() @ values.view(codes.shape).t()


@functools.cache
def available() -> bool:
    """Whether this process multiplies a few rows by one-byte codes in this kernel: AVX2 without AVX-512, compiling
    allowed, the library builds and loads, and on small matrices (groups of 16 and of 32, with and without offsets)
    its products are the float64 ones to float32 rounding."""
    if (not compiling_allowed() or not torch.cpu._is_avx2_supported() or torch.cpu._is_avx512_supported()
            or not library_loads(SOURCE, AVX2_FLAGS, "a token's row times 8-bit matrices runs in Inductor's loop")):
        return False
    generator = torch.Generator().manual_seed(0)
    for group, with_offset in ((32, False), (16, False), (32, True)):
        codes = torch.randint(0, 256, (40, 8 * group), generator=generator, dtype=torch.uint8)
        scale = torch.rand(40, 8, generator=generator) / 64
        offset = torch.randn(40, 8, generator=generator) / 64 if with_offset else None
        rows = torch.randn(3, 8 * group, generator=generator)
        expected = exact_product(rows, codes, scale, offset, 128)
        magnitude = exact_product(rows.abs(), codes, scale.abs(), None if offset is None else offset.abs(), 0)
        got = rows_times_codes(rows, codes, scale, offset, 128).double()
        if not ((got - expected).abs() <= 1e-5 * magnitude + 1e-6).all():
            return False
    return True
