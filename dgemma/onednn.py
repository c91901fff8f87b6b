"""bf16 experts kept in oneDNN's blocked layout, for a canvas's few rows an expert on the CPU.

torch multiplies bf16 matrices on a CPU with oneDNN, which first reorders the weight operand into its blocked
layout, on every call. A mixture of experts' matrices are multiplied by few rows each (a canvas's 256 tokens x 8 of
128 experts: 16 rows an expert on average), where that reorder costs about as much as the product: on a 2-core AMD
EPYC (Zen 5), one of the released model's experts' gate/up matrices (1,408 x 2,816) times 16 rows ran at 0.34
TFLOP/s through F.linear and 0.57 reordered once (`torch.ops.mkldnn._reorder_linear_weight`, what Inductor does for
a frozen model's weights) and multiplied with `torch.ops.mkldnn._linear_pointwise`; its down matrix (2,816 x 704)
0.32 and 0.67. It is the same oneDNN kernel with the same products and sums: the results were the same bits on
every shape measured (tests/test_onednn.py checks within a bf16 rounding, machine-independently).

So large bf16 experts on a CPU are held reordered in the parameters' place (`ReorderedExperts`, the same bytes, the
original's pages given back: `dgemma.allocator.page_out`) when a model is loaded to decode canvases
(`dgemma.checkpoints.reorder_experts`). Not for anything else: a reordered copy beside the plain tensor would cost
its size again (the vocabulary matrix, whose rows the embedding lookup reads in the plain layout, measured 15 to 18 %
faster reordered in the sampler's self-conditioning product, 1.4 GiB more for the released model), and a product whose
result is large ([rows, vocabulary]) allocates it anew on every call, which under glibc's default allocator costs
page faults (docs/performance.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import each_expert


@functools.cache
def available() -> bool:
    """Whether this torch's oneDNN multiplies bf16 on this CPU, and a reordered product agrees with F.linear's within
    a bf16 rounding (checked once per process)."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(16, 96, generator=generator).to(torch.bfloat16)
    weight = torch.randn(80, 96, generator=generator).to(torch.bfloat16)
    try:
        reordered = product(rows, reorder(weight, rows.shape[0])).float()
    except RuntimeError:
        return False
    return bool(torch.allclose(reordered, F.linear(rows, weight).float(), rtol=2**-7, atol=1e-3))


def reorder(matrix: torch.Tensor, rows: int) -> torch.Tensor:
    """A bf16 matrix [N, K] (a linear layer's weight) in oneDNN's blocked layout for products of about `rows` rows
    (oneDNN's hint: any number multiplies)."""
    return torch.ops.mkldnn._reorder_linear_weight(matrix.contiguous(), rows)


def product(rows: torch.Tensor, reordered: torch.Tensor) -> torch.Tensor:
    """rows [M, K] times the matrix [N, K] whose reordered copy this is, transposed: [M, N], as F.linear."""
    return torch.ops.mkldnn._linear_pointwise(rows, reordered, None, "none", [], "")


@dataclass(eq=False)
class ReorderedExperts:
    """A bf16 expert weight [E, N, K] as E matrices in oneDNN's blocked layout, held in a model in the parameter's
    place: the network's grouped products reach `grouped_linear`; `dense()` gives the tensor back, bit for bit."""

    matrices: tuple[torch.Tensor, ...]  # E reordered [N, K] matrices
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.bfloat16

    @classmethod
    def from_tensor(cls, weight: torch.Tensor, rows: int) -> ReorderedExperts:
        """`weight` [E, N, K] reordered one expert at a time, for about `rows` rows an expert."""
        return cls(matrices=tuple(reorder(weight[expert], rows) for expert in range(weight.shape[0])),
                   shape=tuple(weight.shape), dtype=weight.dtype)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def nbytes(self) -> int:
        return sum(matrix.numel() * matrix.element_size() for matrix in self.matrices)

    def dense(self) -> torch.Tensor:
        """The weight as a plain [E, N, K] tensor."""
        return torch.stack([matrix.to_dense() for matrix in self.matrices])

    def grouped_linear(self, rows: torch.Tensor, ends: list[int]) -> torch.Tensor:
        """rows [S, K] grouped by expert (group e ends at ends[e]) times expert e's matrix: [S, N], each group's
        product the one F.linear(rows[group], weight[e]) gives. No gradient is recorded."""
        if rows.dtype != self.dtype:
            raise TypeError(f"experts held in oneDNN's layout compute in {self.dtype}, not {rows.dtype}")
        return each_expert(rows, ends, self.shape[1], lambda group, expert: product(group, self.matrices[expert]))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise TypeError(f"{getattr(func, '__name__', func)} is not defined on experts held in oneDNN's layout "
                        "(load the model with decode=None for plain parameters)")
