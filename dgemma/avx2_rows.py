"""A token's rows times large matrices on CPUs with AVX2 and no AVX-512: C++ kernels (dgemma/kernels/avx2_rows.cpp),
built at first use with the machine's C++ compiler against the installed torch and loaded as four ops:
`torch.ops.dgemma.avx2_half_rows` (bf16 and fp16 matrices), `avx2_half_block` (a few rows sharing one bf16 or fp16
matrix: an expert's rows in a denoising step), `avx2_byte_codes_rows` (one-byte codes: Q8_0, Q6_K, Q5_*) and
`avx2_int4_rows` (4-bit codes in its own layout, `pack`, their scales and zeros in blocks of 32 output columns:
`block_pairs`).

An autoregressive token is bound by reading the matrices it uses, and on such a CPU the loops it had were not: on a
2-core AMD EPYC of family 25 (Zen 3), reading memory at 20 GB/s, torch's eager int4 kernel read a row's 4-bit matrix
at 5.5 GB/s, Inductor's one-row bf16 loop (`dgemma.one_row`) at 10 to 16 GB/s and its loop over byte codes at about
1 G codes/s, each about as slow from cache as from memory (docs/cpu.md has the figures; where the CPU has AVX-512
those loops are fast). These kernels widen half-precision weights to float32 8 an instruction and sum in float32,
or take each group of 32 (or 16) values of the row at 16 bits and sum the codes' products in int32, exactly, two an
instruction (the quantised ops: a bf16 value within 2^7 of its group's largest magnitude is taken exactly, any value
to 2^-15 of that largest; `error_bound`). Each output is one thread's sum in a fixed order: the same bits with any
number of threads, and a row's result does not depend on the other rows.

`available()` says whether this process uses them: the CPU has AVX2 and no AVX-512, compiling is allowed
(DGEMMA_COMPILE is not 0), the build and load work, and on small matrices each op's products are the float64 ones
within `error_bound`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .compiling import AVX2_FLAGS, block_pairs, compiling_allowed, library_loads, load_library

SOURCE = Path(__file__).parent / "kernels" / "avx2_rows.cpp"
INT4_GROUP = 32  # torch's int4 kernel's group, the 4-bit op's
INT4_BLOCK = 32  # its output columns packed together on an AVX2 CPU: the 4-bit op takes multiples of it


def half_rows(rows: torch.Tensor, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows [M, K] (float32, bf16 or fp16), weight [E, N, K] bf16 or fp16, index [M] int64 -> [M, N] in rows' dtype:
    row m times weight[index[m]].T, summed in float32 and rounded once. No derivative: backward through it raises."""
    load_library(SOURCE, AVX2_FLAGS)
    return torch.ops.dgemma.avx2_half_rows(rows, weight, index)


def half_block(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """rows [M, K] (float32, bf16 or fp16) @ weight[N, K].T, weight bf16 or fp16 -> [M, N] in rows' dtype: every row
    times the one matrix, read and widened once for all of them, summed in float32 and rounded once. No derivative."""
    load_library(SOURCE, AVX2_FLAGS)
    return torch.ops.dgemma.avx2_half_block(rows, weight)


def byte_codes_rows(rows: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                    zero_code: int) -> torch.Tensor:
    """rows [M, K] (float32, bf16 or fp16) @ W.T -> [M, N] in rows' dtype (float32 sums rounded once), W [N, K] =
    (codes - zero_code) * scale (+ offset) per group of K / scale.shape[1] values (16 or 32); codes uint8 [N, K],
    scale and offset float32 [N, K / group], contiguous. No derivative."""
    load_library(SOURCE, AVX2_FLAGS)
    return torch.ops.dgemma.avx2_byte_codes_rows(rows, codes, scale, offset, zero_code)


def int4_rows(rows: torch.Tensor, codes: torch.Tensor, scales_and_zeros: torch.Tensor,
              index: torch.Tensor) -> torch.Tensor:
    """rows [M, K] (float32, bf16 or fp16), codes uint8 [E, N, K / 2] (each matrix laid out by `pack`),
    scales_and_zeros bf16 [E, N / 32, K / 32, 32, 2] (torch's [E, K / 32, N, 2] through `block_pairs`), index [M]
    int64 -> [M, N] in rows' dtype (float32 sums rounded once): row m times matrix index[m], whose value is (code - 8)
    * scale + zero per group of 32 (torch's int4 kernel's matrix); N a multiple of 32. No derivative."""
    load_library(SOURCE, AVX2_FLAGS)
    return torch.ops.dgemma.avx2_int4_rows(rows, codes, scales_and_zeros, index)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [N, K] (integers 0..15; N a multiple of 32, K of 2) in `int4_rows`' layout, uint8 [N, K // 2]:
    blocks of 32 output columns, each K // 2 runs of 32 bytes for the depths (k, k + 1), k even, read as sixteen
    16-bit lanes: lane 2i + s holds depth k + s of columns i, 8 + i, 16 + i and 24 + i in its four nibbles, lowest
    first (dgemma/kernels/avx2_rows.cpp says why)."""
    n, k = codes.shape
    if n % INT4_BLOCK or k % 2:
        raise ValueError(f"the AVX2 int4 layout needs rows in multiples of {INT4_BLOCK} and an even number of "
                         f"columns, got a weight of {n} x {k}")
    # columns as (byte of the lane, nibble of the byte, i), depths as (pair, s) -> [blocks, pairs, i, s, byte, nibble]
    values = codes.to(torch.uint8).view(n // INT4_BLOCK, 2, 2, 8, k // 2, 2).permute(0, 4, 3, 5, 1, 2)
    return (values[..., 0] | values[..., 1] << 4).contiguous().view(n, k // 2)


def byte_code_values(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                     zero_code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The matrix `byte_codes_rows` multiplies, in float64, and its part from the codes alone ((code - zero) * scale),
    the part the 16-bit row multiplies: [N, K] each."""
    group = codes.shape[1] // scale.shape[1]
    coded = ((codes.double().view(*scale.shape, group) - zero_code) * scale.double().unsqueeze(-1)).view(codes.shape)
    if offset is None:
        return coded, coded
    return coded + offset.double().repeat_interleave(group, dim=-1), coded


def int4_values(codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The matrix of 4-bit codes [N, K] (0..15, unpacked) and their bf16 scales_and_zeros [K / 32, N, 2] (torch's
    layout; `int4_rows` takes them through `block_pairs`) that `int4_rows` multiplies, in float64, and its part from
    the codes ((code - 8) * scale): [N, K] each."""
    pairs = scales_and_zeros.double().transpose(0, 1).repeat_interleave(INT4_GROUP, dim=1)  # [N, K, 2]
    coded = (codes.double() - 8) * pairs[..., 0]
    return coded + pairs[..., 1], coded


def error_bound(rows: torch.Tensor, values: torch.Tensor, coded: torch.Tensor, group: int | None) -> torch.Tensor:
    """How far these kernels' products of rows [M, K] with a matrix [N, K] (`values`, in float64) may be from the
    exact ones: float32 sums (K x 2^-24 of the terms' magnitudes, doubled), and for the quantised ops (`group` the
    row's groups) 2^-15 of each group's largest magnitude in the row times the codes' part of the matrix (`coded`)."""
    rows = rows.double()
    bound = 2 * rows.shape[1] * 2**-24 * (rows.abs() @ values.abs().t())
    if group is not None:
        largest = rows.abs().view(rows.shape[0], -1, group).amax(-1).repeat_interleave(group, dim=-1)
        bound = bound + 2**-15 * (largest @ coded.abs().t())
    return bound


def _agrees(got: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, coded: torch.Tensor,
            group: int | None) -> bool:
    return bool(((got.double() - rows.double() @ values.t()).abs() <= error_bound(rows, values, coded, group)).all())


@functools.cache
def available() -> bool:
    """Whether this process multiplies a token's rows in these kernels: AVX2 without AVX-512, compiling allowed, the
    library builds and loads, and on small matrices (bf16 and fp16, by index and as a block; one-byte codes in groups
    of 16 and 32, with and without offsets; 4-bit codes) its products are the float64 ones within `error_bound`."""
    if (not compiling_allowed() or not torch.cpu._is_avx2_supported() or torch.cpu._is_avx512_supported()
            or not library_loads(SOURCE, AVX2_FLAGS, "a token's rows run in torch's and Inductor's loops")):
        return False
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 256, generator=generator)
    index = torch.tensor([1, 0, 1])
    for dtype in (torch.bfloat16, torch.float16):
        weight = torch.randn(2, 40, 256, generator=generator).to(dtype)
        got = half_rows(rows, weight, index)
        matrices = [weight[index[m]].double() for m in range(3)]
        if not all(_agrees(got[m:m + 1], rows[m:m + 1], matrices[m], matrices[m], None) for m in range(3)):
            return False
        block = weight[0, :, :251]  # a row length that is no multiple of 8
        if not _agrees(half_block(rows[:, :251].contiguous(), block.contiguous()), rows[:, :251], block.double(),
                       block.double(), None):
            return False
    for group, with_offset in ((32, False), (16, False), (32, True)):
        codes = torch.randint(0, 256, (40, 256), generator=generator, dtype=torch.uint8)
        scale = torch.rand(40, 256 // group, generator=generator) / 64
        offset = torch.randn(40, 256 // group, generator=generator) / 64 if with_offset else None
        if not _agrees(byte_codes_rows(rows, codes, scale, offset, 128), rows,
                       *byte_code_values(codes, scale, offset, 128), group):
            return False
    codes = torch.randint(0, 16, (2, 64, 256), generator=generator, dtype=torch.int32)
    pairs = (torch.rand(2, 256 // INT4_GROUP, 64, 2, generator=generator) - 0.5).to(torch.bfloat16)
    got = int4_rows(rows, torch.stack([pack(matrix) for matrix in codes]), block_pairs(pairs), index)
    return all(_agrees(got[m:m + 1], rows[m:m + 1], *int4_values(codes[index[m]], pairs[index[m]]), INT4_GROUP)
               for m in range(3))
