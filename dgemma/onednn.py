"""bf16 matrices kept in oneDNN's blocked layout, for the CPU products that multiply the same large matrix every step.

torch multiplies bf16 matrices on a CPU with oneDNN, which first reorders the weight operand into its blocked
layout, on every call. For a matrix read once per call that reorder is a second pass over it: the fast sampler's
self-conditioning product, a canvas's [256, V] weights times the [V, H] vocabulary matrix, measured 90.9 ms as
`weights @ embedding` and 76.3 ms with the matrix reordered once (`torch.ops.mkldnn._reorder_linear_weight`, what
Inductor does for a frozen model's weights) and multiplied with `torch.ops.mkldnn._linear_pointwise`, at V 262,144
and H 512 on a 2-core AMD EPYC (Zen 5): the same oneDNN kernel, the same products and sums, and on the shapes
measured the same bits (tests/test_onednn.py checks within a bf16 rounding, machine-independently).

The reordered copy is held beside the matrix (the vocabulary matrix is also the embedding, whose rows a lookup reads
in the plain layout) and costs its size again: 256 MiB at V 262,144 and H 512, 1.4 GiB for the released model's
2,816. It is made at first use, for large vocabularies only (`LARGE_MATRIX`), and made again if the matrix changes in
place (its version counter) or is freed and another takes its address. Its product allocates its result: kept for
products whose result is small ([rows, H] here); a [rows, V] result allocated every step would pay page faults
under glibc's default allocator (docs/performance.md), more than the reorder saves.

A mixture of experts' matrices are multiplied by few rows each (a canvas's 256 tokens x 8 of 128 experts: 16 rows an
expert on average), where the reorder costs as much as the product: one of the released model's experts' gate/up
matrices (1,408 x 2,816) times 16 rows ran at 0.34 TFLOP/s through F.linear and 0.57 reordered, its down matrix
0.32 and 0.67, the same bits. Large bf16 experts on a CPU are therefore held reordered instead of as parameters
(`ReorderedExperts`, the same bytes), when a model is loaded for decoding (`dgemma.checkpoints.reorder_experts`).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Matrices of at least this many values get a reordered copy: the vocabulary matrices of vocabularies from 16k on
# (as the sampler's compiled digest) at the small configs' widths; the bundled model's (8,192 x 256) stays as it is.
LARGE_MATRIX = 1 << 22

# id(matrix) -> (a weak reference to the matrix, its version when reordered, the reordered copy of its transpose)
_transposes: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


@functools.cache
def available() -> bool:
    """Whether this torch's oneDNN multiplies bf16 on this CPU, and a reordered product agrees with F.linear's within
    a bf16 rounding (checked once per process)."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(16, 96, generator=generator).to(torch.bfloat16)
    weight = torch.randn(80, 96, generator=generator).to(torch.bfloat16)
    expected = F.linear(rows, weight).float()
    try:
        reordered = product(rows, torch.ops.mkldnn._reorder_linear_weight(weight, rows.shape[0])).float()
    except RuntimeError:
        return False
    return bool(torch.allclose(reordered, expected, rtol=2**-7, atol=1e-3))


def product(rows: torch.Tensor, reordered: torch.Tensor) -> torch.Tensor:
    """rows [M, K] times the matrix whose reordered copy (of [N, K], as a linear layer's weight) this is: [M, N]."""
    return torch.ops.mkldnn._linear_pointwise(rows, reordered, None, "none", [], "")


def reordered_transpose(matrix: torch.Tensor, rows: int) -> torch.Tensor | None:
    """The reordered copy of matrix.T, for `product(x, ...)` = x @ matrix, or None where the plain product is the
    one to run: not a large bf16 matrix on the CPU, no oneDNN bf16 here, or gradients being recorded. `rows`: the
    product's usual row count, oneDNN's hint for the layout (any count multiplies)."""
    if not (isinstance(matrix, torch.Tensor) and matrix.device.type == "cpu" and matrix.dtype == torch.bfloat16
            and matrix.dim() == 2 and matrix.numel() >= LARGE_MATRIX and not torch.is_grad_enabled()
            and available()):
        return None
    key = id(matrix)
    held = _transposes.get(key)
    if held is not None and held[0]() is matrix and held[1] == matrix._version:
        return held[2]
    _transposes.pop(key, None)  # stale: freed before its callback ran, or changed in place
    reordered = reorder(matrix.t(), rows)
    reference = weakref.ref(matrix, lambda _, key=key: _forget(key))
    _transposes[key] = (reference, matrix._version, reordered)
    return reordered


def _forget(key: int) -> None:
    """Drop the copy of a matrix that has been freed (unless its address already holds a newer one's)."""
    held = _transposes.get(key)
    if held is not None and held[0]() is None:
        del _transposes[key]


def reorder(matrix: torch.Tensor, rows: int) -> torch.Tensor:
    """A bf16 matrix [N, K] (a linear layer's weight) in oneDNN's blocked layout for products of about `rows` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(matrix.contiguous(), rows)


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
        out = rows.new_empty(rows.shape[0], self.shape[1])
        begin = 0
        for expert, end in enumerate(ends):
            if end > begin:
                out[begin:end] = product(rows[begin:end], self.matrices[expert])
            begin = end
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise TypeError(f"{getattr(func, '__name__', func)} is not defined on experts held in oneDNN's layout "
                        "(load the model with decode=None for plain parameters)")
