"""One row times large bf16 or fp16 matrices on a CPU, as an autoregressive token multiplies: compiled reductions
that read each matrix once, at the memory's bandwidth.

A token's forward is bound by the bytes of the matrices it reads (its attention, dense MLP, the 8 experts it routes
to and the vocabulary matrix), and torch's eager kernels for a [1, K] input read a bf16 matrix below the memory's
bandwidth. Measured on a 2-core AMD EPYC (Zen 5, no AMX), released shapes, weights read from memory
(`python scripts/quantized_matmul.py`, docs/amd/quantized_matmul.json): attention's q (4,096 x 2,816) 0.75 ms in
F.linear against 0.52 ms here (44 GB/s, what that machine reads any large tensor at), the dense MLP's up 0.39
against 0.29, an expert's gate/up 0.26 against 0.21. A token's experts are one loop over the 8 matrices it routes
to, read in place by their indices, where the reference's grouped matmul visits every one of the 128 experts (a
released layer's token: `dgemma bench --breakdown`, docs/cpu.md).

Each is one Inductor loop that widens each weight to float32, multiplies it by the row and sums along K in float32,
rounding once to the row's dtype: what the eager kernels compute, summed in another order, so a result can differ
from the eager kernel's (or from a batch's row) in its last bit. The model takes them only off the reference path
(`exact=False`, dgemma.model). Every size is dynamic: one graph serves many matrix shapes (the released model's
take two, rows up to 4,096 long and longer; compiling costs a few seconds once per process); float32 and small
matrices (test models, the bundled one) keep the eager kernels. On a CPU with AVX2 and no AVX-512, where Inductor's
loop widens bf16 slowly (from cache as slowly as from memory), dgemma's C++ kernel (`dgemma.avx2_rows`) computes
the same float32 sums instead, in another order.

On such a CPU a few rows sharing one matrix (an expert's rows in a denoising step) take that module's
register-blocked kernel too (`takes_rows_block`, below).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from .avx2_rows import available as avx2_rows_available, half_block as avx2_half_block, half_rows as avx2_half_rows
from .compiling import SUM_CHUNK, compiled_under_own_name, compiling_allowed

# Matrices smaller than this many values keep torch's eager kernels: below it the gain is tens of microseconds a matrix,
# which does not pay the seconds of compiling; the bundled model (its largest matrix, the head, 2^21) never compiles.
MIN_VALUES = 1 << 22


def _product(row: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """row [1, K] @ weight[N, K].T -> [N], accumulated in float32 and rounded once to row's dtype (K at most
    SUM_CHUNK, or a multiple of it)."""
    rows, width = weight.shape
    if width <= SUM_CHUNK:
        return (weight.float() * row.float()).sum(-1).to(row.dtype)
    chunks = weight.float().view(rows, -1, SUM_CHUNK) * row.float().view(1, -1, SUM_CHUNK)
    return chunks.sum(-1).sum(-1).to(row.dtype)


def _indexed_products(rows: torch.Tensor, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows [R, K], weight [E, N, K], index [R] -> [R, N]: row r times weight[index[r]].T, each matrix read in place
    (Inductor loads weight[index[r], n, k] inside the reduction; nothing is gathered into memory)."""
    return (weight[index].float() * rows.float().unsqueeze(1)).sum(-1).to(rows.dtype)


@functools.cache
def _kernel(function: Callable, dtype: torch.dtype) -> Callable:
    """Compiled at first use (a process that never decodes a token of a large model never imports the compiler), one
    code object per function and dtype: dynamo counts recompiles per code object. Every size is dynamic; the inputs
    are plain tensors (a parameter's sizes would be static) and not views (whose base dynamo guards on), so that no
    new shape asks for another graph."""
    name = f"one_row_{function.__name__.strip('_')}_{str(dtype).removeprefix('torch.')}"
    return compiled_under_own_name(function, name, dynamic=True, fullgraph=True)


def _applies(row: torch.Tensor, weight: object, values: int) -> bool:
    return (isinstance(weight, torch.Tensor) and weight.is_contiguous() and row.device.type == "cpu"
            and weight.device.type == "cpu"
            and row.dtype in (torch.bfloat16, torch.float16) and weight.dtype == row.dtype
            and values >= MIN_VALUES and not (torch.is_grad_enabled() and (row.requires_grad or weight.requires_grad))
            and compiling_allowed())


def takes_row(x: torch.Tensor, weight: object) -> bool:
    """Whether x [..., K] @ weight[N, K].T runs as the one-row product: x is a single row, and weight a large matrix
    in x's dtype (bf16 or fp16) on the CPU whose rows are at most SUM_CHUNK long or a multiple of it, with no gradient
    to record (the kernel has no backward)."""
    width = x.shape[-1]
    return (x.numel() == width > 0 and (width <= SUM_CHUNK or width % SUM_CHUNK == 0)
            and _applies(x, weight, weight.numel() if isinstance(weight, torch.Tensor) else 0))


def row_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] (a single row) @ weight.T, as `takes_row` allows."""
    if avx2_rows_available():
        out = avx2_half_rows(x.reshape(1, -1).contiguous(), weight.detach().unsqueeze(0),
                             torch.zeros(1, dtype=torch.long))
    else:
        with torch.no_grad():  # one grad mode for every call: no recompile for it
            out = _kernel(_product, x.dtype)(x.reshape(1, -1).clone(), weight.detach())
    return out.view(*x.shape[:-1], weight.shape[0])


def takes_experts(x: torch.Tensor, weight: object, top_k: int) -> bool:
    """Whether one token x [1, K] runs its `top_k` experts of weight [E, N, K] as `expert_products`: the experts'
    matrices read (top_k of them) are large in x's dtype on the CPU, as for `takes_row`."""
    values = top_k * weight[0].numel() if isinstance(weight, torch.Tensor) and weight.dim() == 3 else 0
    return x.shape[0] == 1 and _applies(x, weight, values)


def expert_products(rows: torch.Tensor, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows [R, K] @ weight[index[r]].T for each row r -> [R, N], as `takes_experts` allows."""
    if avx2_rows_available():
        return avx2_half_rows(rows.contiguous(), weight.detach(), index.contiguous())
    with torch.no_grad():
        return _kernel(_indexed_products, rows.dtype)(rows.clone(), weight.detach(), index.clone())


# ---- a few rows sharing one matrix ---------------------------------------------------------------------------------
# A denoising step of a mixture of experts sends each expert a few of its rows (a 256-token canvas, 16 on average to
# each of the released model's 128 experts, top-8). On a CPU with AVX2 and no AVX-512 such a product was widened to
# float32 tiles for torch's matmul, which ran 16 rows at 45 GFLOP/s; dgemma's register-blocked kernel
# (`dgemma.avx2_rows.half_block`) reads and widens the matrix once for all the rows. Measured on a 2-core Zen 3 EPYC
# (8 released experts one after another, bf16): 16 rows times a gate/up (1,408 x 2,816) 1.8 against 3.0 ms widened,
# times a down (2,816 x 704) 1.2 against 2.1; 4 rows 1.0 against 2.0, 8 rows 1.3 against 2.7, 32 rows 3.3 against 4.2,
# 64 rows 5.6 against 5.7. So up to BLOCK_ROWS rows take it.
BLOCK_ROWS = 32


def takes_rows_block(x: torch.Tensor, weight: object) -> bool:
    """Whether x [R, K] @ weight[N, K].T runs as `rows_block_product`: dgemma's AVX2 kernels are in use, x holds 1 to
    BLOCK_ROWS rows, weight is a bf16 or fp16 matrix in x's dtype on the CPU, and no gradient is recorded."""
    return (x.dim() == 2 and 0 < x.shape[0] <= BLOCK_ROWS and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and x.device.type == "cpu" and weight.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) and avx2_rows_available())


def rows_block_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [R, K] @ weight.T -> [R, N] in x's dtype, summed in float32 and rounded once, as `takes_rows_block` allows."""
    return avx2_half_block(x.contiguous(), weight.detach().contiguous())
