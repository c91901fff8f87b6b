"""4-bit matrices on AMX: Inductor's weight-only int4 GEMM template, called with each matrix's codes as an input.

torch's eager CPU int4 kernel (`torch._weight_int4pack_mm_for_cpu`) does not use AMX: at an expert's share of a
canvas (16 rows) it takes 1.3 to 1.5 times a bf16 matmul's time, at a canvas's 256 rows 6 to 9 times. Inductor
lowers the same op, under max-autotune, to a C++ template whose AMX micro-kernel dequantises the codes in registers
(about 2x faster than the eager kernel at 16 rows, 7 to 9x at 256; docs/quantization.md), but only for a
weight that is a frozen module constant, which it re-blocks at compile time. A mixture of experts has thousands of
such matrices (128 experts x 2 x 30 layers of the released model): compiling each is out of the question. So this
module compiles one graph per weight shape with the weight as an input, already in the template's blocked layout
(`block_codes`), and lets Inductor's check accept such a weight while this module's kernels run; every matrix of
that shape then runs through the same compiled kernel. Rows are dynamic, so a canvas's changing expert loads never
recompile.

The graph means "codes in the blocked layout": run eagerly, the same op would read them as torch's own layout and
return garbage. Four things keep that from happening: `available()` compiles and checks the kernel against the
eager one once per process before any weight is blocked for it (no AMX, no compiler, another torch: the eager
layout stays); a recompile (a guard that fails) can only pick this template, or raise; the function raises if it
ever runs eagerly (a compiler stance that forces eager, or falls back to it); and each shape gets its own code object,
whose recompile limit, with fullgraph, raises when hit. A single row (dynamo specialises size 1, for which Inductor
picks its AVX-512 micro-kernel and that kernel's layout) is padded to two.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Iterator

import torch

from .compiling import agrees_with_torch_int4, compiled_under_own_name, compiling_allowed

GROUP = 32  # values per scale and zero, as CpuInt4 stores them
BLOCK_N = 32  # output columns per block of the AMX micro-kernel's weight layout


def block_codes(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [N, K] (integers 0..15) in the AMX template's layout, uint8 [N, K // 2]: blocks of 32 output
    columns, each [K, 16] bytes whose low nibble holds column j and high nibble column j + 16 of the block."""
    n, k = codes.shape
    if n % BLOCK_N:
        raise ValueError(f"the AMX int4 layout needs rows in multiples of {BLOCK_N}, got a weight of {n} x {k}")
    blocks = codes.to(torch.uint8).view(n // BLOCK_N, BLOCK_N, k).transpose(1, 2).reshape(n // BLOCK_N, k, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2)


def _int4_matmul(rows: torch.Tensor, codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    if not torch.compiler.is_compiling():  # dropped when traced; an eager run (a stance can force one) misreads
        raise RuntimeError("the AMX int4 kernel ran eagerly on blocked codes: it only exists compiled")
    return torch._weight_int4pack_mm_for_cpu(rows, codes, GROUP, scales_and_zeros)


_kernels: dict[tuple[int, int], Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {}
# Set in a thread while it runs one of this module's kernels (Inductor lowers in the calling thread, so a compile
# or a recompile on a failed guard happens inside that window).
_running = threading.local()


@functools.cache
def _allow_weight_as_input() -> None:
    """Inductor's int4 lowering offers its C++ template only for a constant weight. Wrap its check, once per
    process, so that it allows a weight that is an input while this module's kernels run, and only then (other
    code compiling the op keeps the stock behaviour)."""
    import torch._inductor.lowering  # noqa: F401  (quantized_lowerings is imported through it)
    from torch._inductor import quantized_lowerings

    stock = quantized_lowerings.use_cpp_gemm_template

    def use_cpp_gemm_template(*args, **kwargs):
        ours = getattr(_running, "kernel", False)
        return stock(*args, **({**kwargs, "require_constant_mat2": False} if ours else kwargs))

    quantized_lowerings.use_cpp_gemm_template = use_cpp_gemm_template


def _kernel(n: int, k: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The kernel for weights of n x k, behind its own code object."""
    if (n, k) not in _kernels:
        _allow_weight_as_input()
        _kernels[n, k] = compiled_under_own_name(
            _int4_matmul, f"amx_int4_matmul_{n}x{k}", dynamic=False, fullgraph=True,
            options={"max_autotune": True, "max_autotune_gemm_backends": "CPP"})
    return _kernels[n, k]


@contextlib.contextmanager
def calls() -> Iterator[None]:
    """The window this module's kernels run in (`product`): Inductor may use its template for them, and one grad
    mode for every call (no recompile for it). One window may hold many calls: a layer's experts in a denoising step
    make 256, and around one call alone the set-up took about a sixth of an expert's product at 16 rows."""
    _running.kernel = True
    try:
        with torch.no_grad():
            yield
    finally:
        _running.kernel = False


def product(rows: torch.Tensor, codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """`matmul`'s product of one or more rows, inside `calls()`, recording no gradient."""
    count = rows.shape[0]
    kernel = _kernel(codes.shape[0], rows.shape[-1])
    if count == 1:
        rows = torch.cat((rows, rows))
    # Compiled once for every number of rows: a row count fixed at compile time below 5 would get Inductor's
    # AVX-512 micro-kernel, which reads the other layout. Strict, so that a specialisation raises instead.
    torch._dynamo.mark_dynamic(rows, 0)
    return kernel(rows, codes, scales_and_zeros)[:count]


def _run(rows: torch.Tensor, codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    if rows.shape[0] == 0:
        return rows.new_empty(0, codes.shape[0])
    with calls():
        return product(rows, codes, scales_and_zeros)


class _WithoutBackward(torch.autograd.Function):
    """The product inside a graph that records gradients: computed, with a backward that raises, as torch's eager
    int4 op behaves (its derivative is not implemented either)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
        return _run(rows, codes, scales_and_zeros)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise RuntimeError("4-bit weights on the AMX int4 kernel have no backward (torch's int4 kernels have none)")


def matmul(rows: torch.Tensor, codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """rows [M, K] bf16 times the weight [N, K] held as blocked codes [N, K // 2] and bf16 scales and zeros
    [K // 32, N, 2] (value = (code - 8) * scale + zero): [M, N] bf16."""
    if rows.requires_grad and torch.is_grad_enabled():
        return _WithoutBackward.apply(rows, codes, scales_and_zeros)
    return _run(rows, codes, scales_and_zeros)


@functools.cache
def available() -> bool:
    """Whether this process computes 4-bit matrices with the AMX template: the CPU has AMX, compiling is allowed
    (DGEMMA_COMPILE is not 0) and works, and the compiled kernel on blocked codes agrees with torch's eager kernel on
    its own layout (to bf16 rounding) on a small weight."""
    if not compiling_allowed() or not torch.cpu._is_amx_tile_supported():
        return False
    # four blocks of columns, two of them a multiple of 64 (where the AVX-512 micro-kernel could apply)
    return agrees_with_torch_int4(block_codes, matmul, n=128, k=256, counts=(5, 2, 3, 4, 17, 1))
