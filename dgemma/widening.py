"""bf16 and fp16 products on CPUs without native half-precision matmuls, computed in float32.

torch multiplies bf16 matrices on a CPU through oneDNN where the CPU has AVX-512 BF16 (Intel since Cooper Lake, AMD
since Zen 4); elsewhere (AVX2 CPUs: AMD Zen 3 and older, Intel's client chips) through a generic kernel. On a 2-core
AMD EPYC of family 25 (Zen 3, AVX2) that kernel ran a canvas's products at 11 to 21 GFLOP/s against 100 for the same
product in float32, and the sampler's self-conditioning product at vocabulary 32k ([256, 32768] @ [32768, 512]) took
14 s: a bf16 denoising step of the bench's small config 18.5 s against 0.45 s in float32. fp16 is no better there.

So on such CPUs the fast path (exact=False) widens: the row operand once, the matrix a tile of rows at a time (of
TILE_VALUES, which stays in cache), multiplied in float32 and rounded once to the operands' dtype. The products are
exact in float32 (a bf16 or fp16 product fits its 24-bit significand), the sums float32 as in oneDNN's bf16 kernel,
in another order: a result can differ from the native kernel's in its last bit. A weight stays in its dtype in memory,
so a bf16 checkpoint costs what it costs, and only the tile is float32. The reference path keeps torch's kernels (its
results are transformers' bit for bit), and so do single rows (an autoregressive token reads each matrix once; widened,
it would read and write it again: `dgemma.one_row` takes the large ones).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

HALF = (torch.bfloat16, torch.float16)
# Matrix values widened at a time: 4 MiB of float32. A released attention matrix (4,096 x 2,816) times a canvas's
# 256 rows on the Zen 3 EPYC: 45 ms in tiles of this size, 68 ms widened whole (which writes and reads its float32
# copy through memory), 335 ms in bf16.
TILE_VALUES = 1 << 20


@functools.cache
def native_half_matmuls() -> bool:
    """Whether torch multiplies bf16 and fp16 natively on this CPU: it has AVX-512 BF16 (every CPU with AMX has it)."""
    return torch.cpu._is_avx512_bf16_supported()


def widens(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x [..., K] @ weight[..., N, K].T runs widened to float32: bf16 or fp16 tensors of one dtype on a CPU
    without native half-precision matmuls, more than one row, no gradient to record."""
    return (isinstance(weight, torch.Tensor) and x.dtype in HALF and weight.dtype == x.dtype
            and x.device.type == "cpu" and x.numel() > x.shape[-1] and not native_half_matmuls()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def _widened_rows(tile: torch.Tensor, matrix, start: int, end: int) -> None:
    """Rows start:end of a matrix into the float32 tile: copied from a tensor, dequantised there from a quantised
    weight (`dgemma.quantized.GroupQuantized`, whose tiles are float32 on such CPUs)."""
    if isinstance(matrix, torch.Tensor):
        tile.copy_(matrix[start:end])
    else:
        matrix.dequantize(slice(start, end), out=tile)


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K].T (+ bias) in float32, a tile of weight rows widened (or dequantised) at a time,
    rounded once to x's dtype (into `out` [..., N] when given)."""
    rows, width = weight.shape
    wide = x.reshape(-1, width).float()
    out = x.new_empty(*x.shape[:-1], rows) if out is None else out
    flat_out = out.view(-1, rows)
    tile = min(rows, max(1, TILE_VALUES // width))
    # One float32 tile and one float32 product reused: fresh ones per tile can cost page faults under glibc's
    # defaults (the released vocabulary matrix widened a tile at a time on the Zen 3 EPYC: 55 and 231 ms in two runs
    # into fresh tensors, 19 and 22 ms into one buffer; the whole product, alternated in one process, 4 % faster).
    widened = torch.empty(tile, width, dtype=torch.float32, device=x.device)
    product = torch.empty(wide.shape[0], tile, dtype=torch.float32, device=x.device)
    for start in range(0, rows, tile):
        end = min(start + tile, rows)
        part, part_product = widened[:end - start], product[:, :end - start]
        _widened_rows(part, weight, start, end)
        if bias is None:
            torch.mm(wide, part.t(), out=part_product)
        else:
            torch.addmm(bias[start:end].float(), wide, part.t(), out=part_product)
        flat_out[:, start:end] = part_product
    return out


def mix(weights: torch.Tensor, matrix) -> torch.Tensor:
    """weights [R, N] (any float dtype) @ matrix[N, K] as float32 [R, K]: matrix widened (or dequantised) a tile of
    rows at a time, the tiles' products summed in float32 (the sampler's self-conditioning product, N the
    vocabulary)."""
    rows, width = matrix.shape
    tile = min(rows, max(1, TILE_VALUES // width))
    total = torch.zeros(weights.shape[0], width, dtype=torch.float32, device=weights.device)
    widened = torch.empty(tile, width, dtype=torch.float32, device=weights.device)  # reused, as in `linear`
    mixing = torch.empty(weights.shape[0], tile, dtype=torch.float32, device=weights.device)
    for start in range(0, rows, tile):
        end = min(start + tile, rows)
        part, part_weights = widened[:end - start], mixing[:, :end - start]
        _widened_rows(part, matrix, start, end)
        part_weights.copy_(weights[:, start:end])
        total.addmm_(part_weights, part)
    return total


def bmm(batch: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """batch [E, C, K] @ weights[E, N, K].T -> [E, C, N] in batch's dtype, computed in float32 a few matrices at a time
    (the small experts' padded batch, `dgemma.model.Experts`)."""
    experts, rows, width = weights.shape
    out = batch.new_empty(experts, batch.shape[1], rows)
    step = max(1, TILE_VALUES // (rows * width))
    for start in range(0, experts, step):
        end = min(start + step, experts)
        out[start:end] = torch.bmm(batch[start:end].float(), weights[start:end].float().transpose(-2, -1))
    return out
