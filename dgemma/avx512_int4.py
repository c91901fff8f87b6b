"""4-bit matrices on CPUs with AVX-512 BF16 and no AMX: a C++ kernel (dgemma/kernels/avx512_int4.cpp), built at
first use with the machine's C++ compiler against the installed torch and loaded as the op
`torch.ops.dgemma.avx512_int4_grouped`.

torch's eager CPU int4 kernel multiplies a released expert (16 rows of a canvas) at 0.32 TFLOP/s on a 2-core AMD
EPYC (Zen 5), below the 0.44 to 0.50 of the same expert in bf16, so 4-bit experts made a denoising step slower than
bf16 ones; Inductor's AVX-512 template was no faster (docs/quantization.md). This kernel turns a word of packed
codes into bf16 pairs with a shift and one logic op and multiplies them with VDPBF16PS, prefetching the codes ahead:
16 rows at 0.77 to 0.81 TFLOP/s, a canvas's 256 rows at bf16's speed (0.82 against 0.81 to 0.88), one row as fast
as torch's kernel or up to 1.5 times faster, both near the memory's rate (docs/quantization.md). It computes what
torch's int4 kernels compute, value = (code - 8) * scale + zero per group of 32 (`CpuInt4`'s scales and zeros), for
every expert of a layer in one call (`grouped`), each output one thread's fp32 sum in a fixed order: the same bits
with any number of threads.

The build is cached per source, torch version and compiler flags under $XDG_CACHE_HOME/dgemma/kernels (about 6
seconds once). `available()` says whether this process uses it: the CPU has AVX-512 BF16, compiling is allowed
(DGEMMA_COMPILE is not 0), the build and load work, and the kernel agrees with torch's eager kernel on a small
weight; otherwise 4-bit weights keep torch's kernels.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .compiling import AVX512_FLAGS, agrees_with_torch_int4, compiling_allowed, library_loads, load_library
from .compiling import block_pairs as pack_scales  # the kernel reads each block of 32 columns' pairs together

BLOCK_N = 32  # output columns per block of the kernel's layout
SOURCE = Path(__file__).parent / "kernels" / "avx512_int4.cpp"


def pack(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [N, K] (integers 0..15) in the kernel's layout, uint8 [N, K // 2]: blocks of 32 output columns,
    each K // 8 runs of 32 little-endian words, word j holding column j's 8 values of the run, value 2i in bits
    4i..4i+3 and value 2i + 1 in bits 16 + 4i..19 + 4i (dgemma/kernels/avx512_int4.cpp)."""
    n, k = codes.shape
    if n % BLOCK_N or k % 8:
        raise ValueError(f"the AVX-512 int4 layout needs rows in multiples of {BLOCK_N} and columns in multiples of 8, "
                         f"got a weight of {n} x {k}")
    values = codes.to(torch.int64).view(n // BLOCK_N, BLOCK_N, k // 8, 4, 2)
    shifts = 4 * torch.arange(4).view(4, 1) + 16 * torch.arange(2).view(1, 2)
    words = (values << shifts).sum((-2, -1)).transpose(1, 2)  # [blocks, runs, 32 columns], each below 2^32
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits, as int32
    return words.contiguous().view(torch.uint8).view(n, k // 2)


def grouped(rows: torch.Tensor, codes: torch.Tensor, scales_and_zeros: torch.Tensor, ends: list[int]) -> torch.Tensor:
    """rows [S, K] bf16 grouped by matrix (group e ends at ends[e]) times matrix e of codes [E, N, K // 2] (`pack`ed)
    with bf16 scales and zeros [E, N // 32, K // 32, 32, 2] (`pack_scales`), transposed: [S, N] bf16. No derivative:
    backward through it raises, as through torch's int4 kernels."""
    load_library(SOURCE, AVX512_FLAGS)
    return torch.ops.dgemma.avx512_int4_grouped(rows, codes, scales_and_zeros, ends)


def matmul(rows: torch.Tensor, codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """rows [M, K] bf16 times one matrix held as codes [N, K // 2] and scales and zeros [N // 32, K // 32, 32, 2]
    (`pack`, `pack_scales`): [M, N]."""
    return grouped(rows, codes[None], scales_and_zeros[None], [rows.shape[0]])


def matmul_torch_scales(rows: torch.Tensor, codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """`matmul` given scales and zeros in torch's int4 layout [K // 32, N, 2] (packed on each call: for checks)."""
    return matmul(rows, codes, pack_scales(scales_and_zeros))


@functools.cache
def available() -> bool:
    """Whether this process computes 4-bit matrices with this kernel: the CPU has AVX-512 BF16 (and no AMX, whose
    kernel is faster: dgemma.amx_int4), compiling is allowed, the library builds and loads, and on a small weight
    its products agree with torch's eager int4 kernel to bf16 rounding."""
    if (not compiling_allowed() or not torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
            or not library_loads(SOURCE, AVX512_FLAGS, "4-bit matrices run in torch's int4 kernels")):
        return False
    return agrees_with_torch_int4(pack, matmul_torch_scales, n=64, k=256, counts=(1, 3, 8, 17))
