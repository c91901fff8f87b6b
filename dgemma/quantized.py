"""Quantised weights kept quantised in memory: GGUF block formats as integer codes with per-group scales.

A `GroupQuantized` holds a weight [..., N, K] as unsigned integer codes plus one float32 scale (and, for some types,
one float32 offset) per group of `group` consecutive values along K, and rebuilds the values with
`value = (code - zero_code) * scale + offset`.

Design choices:
- One affine representation for every supported GGML type (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K), so the
  forward pass dequantises any of them with the same few elementwise torch ops, on whatever device the tensors are
  on, with no per-type kernel. The GGUF block layouts (bit planes spread over byte ranges, 6-bit scales packed into
  12 bytes, fp16 super-block scales) are decoded once, at load (`from_gguf`), by numpy over all blocks at once.
- Dequantisation is bitwise equal to `gguf.quants.dequantize`, the oracle the rest of dgemma dequantises GGUF files
  with, so a model run on quantised weights computes exactly what the same model dequantised at load computes. That
  fixes the representation: the stored scales and offsets are the float32 per-group products gguf forms (d * sc and
  dmin * m for the K-quants, d * scale for Q6_K, d and m themselves for the others). A K-quant product needs up to 18
  significant bits, more than fp16 or bf16 hold: stored rounded, most values change. From there every step before
  the offset is exact in float32: code - zero_code is a small integer, and code times scale needs at most 23
  significant bits (Q6_K's 5-bit code magnitudes times 18-bit scales). The one rounding is the final addition of the
  offset, a correctly rounded IEEE add in numpy and in torch alike, so the bits are the same on every device, fused
  multiply-add or not. `dequantize` still does each step as its own in-place torch op, in gguf's order.
- The offset is always added: +m for Q4_1 and Q5_1 (whose minimum is stored as is), -(dmin * m) for Q4_K and Q5_K
  (which subtract it). x + (-y) and x - y are the same IEEE operation, so one formula serves both exactly. Types
  without an offset (Q8_0, Q4_0, Q5_0, Q6_K) store None and skip the addition.
- Codes are uint8 for every type, with the type's zero point as `zero_code`: 8 for Q4_0, 16 for Q5_0, 32 for Q6_K,
  0 for the types with an offset. Q8_0's signed int8 codes are stored offset by 128 (its byte XOR 0x80) with
  zero_code 128, so that every type unpacks the same way.
- 4-bit codes (Q4_0, Q4_1, Q4_K) are packed two per byte, byte j of a row holding column 2j in its low nibble and
  column 2j + 1 in its high nibble: this halves the memory of the types large models are shipped in, and adjacent
  pairs unpack with one stack and a reshape, whatever the type's own GGUF nibble order. 5-, 6- and 8-bit codes take
  one byte each: packing them would cost bit-plane gathers on every forward pass.
- Memory, against the GGUF bytes of the same tensor: Q8_0 36/34 bytes per 32 values (1.06x), Q4_0 20/18 (1.11x),
  Q4_1 24/20 (1.20x), Q5_0 36/22 (1.64x), Q5_1 40/24 (1.67x), Q4_K 192/144 per 256 (1.33x), Q5_K 320/176 (1.82x),
  Q6_K 320/210 (1.52x). Scales are one float32 per 32 values (per 16 for Q6_K) instead of GGUF's fp16 super-block
  scale times 6-bit sub-block scales: the price of exact, kernel-free dequantisation.
- `dequantize(index)` dequantises only the selected leading-dimension entries (one expert of [E, N, K], some rows of
  [N, K]), so a mixture-of-experts layer materialises the experts it runs, never the whole stacked tensor.
- `from_gguf` decodes `_CHUNK_VALUES` values per numpy pass into preallocated outputs: vectorised over all the blocks
  of a chunk, and a real expert tensor (hundreds of millions of values) never needs more than a few chunk-sized
  temporaries.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, replace
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from .amx_int4 import BLOCK_N as AMX_BLOCK_N, available as amx_int4_available, block_codes
from .amx_int4 import calls as amx_int4_calls, matmul as amx_int4_matmul, product as amx_int4_product
from .avx2_rows import INT4_BLOCK as AVX2_INT4_BLOCK, available as avx2_rows_available
from .avx2_rows import byte_codes_rows as avx2_byte_codes_rows, int4_rows as avx2_int4_rows, pack as avx2_pack
from .avx512_int4 import BLOCK_N as AVX512_BLOCK_N, available as avx512_int4_available
from .avx512_int4 import grouped as avx512_int4_grouped, matmul as avx512_int4_matmul, pack as avx512_pack
from .compiling import SUM_CHUNK, block_pairs, compiled_under_own_name, compiling_allowed
from .model import attached_weights, each_expert
from .token_layer import TokenProduct
from .widening import linear as widened_linear, mix as widened_mix, widens


# eq=False: the fields are tensors, whose == is elementwise; identity is the only meaningful equality here.
@dataclass(eq=False)
class GroupQuantized:
    """A weight of shape [..., N, K] kept as integer codes with one scale (and optional offset) per group of
    `group` consecutive values along K: value = (code - zero_code) * scale[..., n, k // group] (+ offset[..., n, k //
    group])."""

    codes: torch.Tensor  # uint8 [..., N, K // 2] for 4-bit codes (column 2j low nibble, 2j + 1 high), else [..., N, K]
    bits: int  # 4, 5, 6 or 8
    group: int  # values per scale
    scale: torch.Tensor  # float32 [..., N, K // group]
    offset: torch.Tensor | None  # float32 [..., N, K // group], added after scaling; or None
    zero_code: int  # subtracted from the code before scaling
    shape: tuple[int, ...]  # the dequantized shape [..., N, K]
    qtype: str  # the GGML type name it came from, e.g. "Q4_K"
    dtype: torch.dtype = torch.float32  # what the network computes with it in: the dtype of its dequantised tiles

    def __post_init__(self) -> None:
        # Checked once here so that a mis-built instance fails with its shapes named, not inside a reshape later.
        *lead, k = self.shape
        packed = k // 2 if self.bits == 4 else k
        groups = (*lead, k // self.group)
        if (self.codes.dtype != torch.uint8 or tuple(self.codes.shape) != (*lead, packed) or k % self.group
                or tuple(self.scale.shape) != groups
                or (self.offset is not None and tuple(self.offset.shape) != groups)):
            raise ValueError(
                f"inconsistent {self.qtype} GroupQuantized for shape {self.shape}, {self.bits} bits, group "
                f"{self.group}: codes {self.codes.dtype} {tuple(self.codes.shape)}, scale {tuple(self.scale.shape)}, "
                f"offset {None if self.offset is None else tuple(self.offset.shape)}")

    def dequantize(self, index: int | slice | torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """The values (of the leading-dimension entries `index` when given: an expert of [E, N, K], rows of [N, K]),
        computed in float32 exactly as gguf.quants.dequantize does, then cast to dtype; or into `out`, a float32
        tensor of their shape (a reused tile: `dgemma.widening`). (A large tile of one-byte codes on the CPU cast to
        bf16 or fp16 takes one compiled pass, `_in_one_pass`, with the same bits.)"""
        codes, scale, offset = self.codes, self.scale, self.offset
        if index is not None:
            codes, scale = codes[index], scale[index]
            offset = None if offset is None else offset[index]
        if (self.bits != 4 and dtype != torch.float32 and out is None and codes.device.type == "cpu"
                and scale.numel() * self.group >= COMPILED_TILE_VALUES and compiling_allowed()):
            _every_size_dynamic(codes, scale, offset)  # every tile shape, one graph
            return _one_pass_kernel(self.qtype, dtype)(codes, scale, offset, self.zero_code, self.group, dtype)
        if self.bits == 4:
            codes = torch.stack((codes & 0x0F, codes >> 4), dim=-1)
        # [..., K // group, group], so that each group's scale and offset broadcast over its values.
        codes = codes.reshape(*scale.shape, self.group)
        if out is None:
            values = codes.float()
        else:
            if out.dtype != torch.float32 or out.numel() != codes.numel():
                raise ValueError(f"dequantize into {out.dtype} {tuple(out.shape)}: a float32 tensor of "
                                 f"{codes.numel()} values is needed")
            values = out.view(codes.shape).copy_(codes)
        # In place on the float32 tensor (no temporaries), one op per step of gguf's formula, in its order.
        if self.zero_code:
            values.sub_(self.zero_code)
        values.mul_(scale.unsqueeze(-1))
        if offset is not None:
            values.add_(offset.unsqueeze(-1))
        return out if out is not None else values.reshape(*scale.shape[:-1], self.shape[-1]).to(dtype)

    def nbytes(self) -> int:
        """bytes held (codes + scales + offsets)"""
        tensors = [self.codes, self.scale] + ([] if self.offset is None else [self.offset])
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> GroupQuantized:
        """The same weight with its codes, scales and offsets on `device`, computed in `dtype` (the scales and
        offsets stay float32 whatever it is: they are exact only there)."""
        device = self.device if device is None else device
        return replace(self, codes=self.codes.to(device), scale=self.scale.to(device),
                       offset=None if self.offset is None else self.offset.to(device), dtype=dtype or self.dtype)

    def __getitem__(self, index: int) -> GroupQuantized:
        """Entry `index` of the leading dimension (one expert of [E, N, K]), still quantised."""
        return replace(self, codes=self.codes[index], scale=self.scale[index],
                       offset=None if self.offset is None else self.offset[index], shape=self.shape[1:])

    @classmethod
    def quantize(cls, tensor: torch.Tensor, qtype: str) -> GroupQuantized:
        """A float tensor [..., N, K] quantised to GGML type `qtype` as `dgemma quantize` writes it."""
        from .gguf import quantize_blocks

        kind = GGMLQuantizationType[qtype]
        values = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
        return cls.from_gguf(quantize_blocks(values, kind), kind, tuple(tensor.shape))

    def linear(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] @ self.T, into `out` when given (the sampler's preallocated logits)."""
        return _linear(x, self, None, out)

    def token_product(self, row: torch.Tensor) -> TokenProduct | None:
        """How a single row [1, K] is multiplied by this weight, for a token's layer in one object
        (`dgemma.token_layer`): one-byte codes in dgemma's AVX2 kernel (`_few_rows_linear`), else None."""
        if not (_takes_few_rows_kernel(row, self) and avx2_rows_available()):
            return None
        held = (self.codes, self.scale) + (() if self.offset is None else (self.offset,))
        return TokenProduct("byte_codes", [t.contiguous() for t in held], zero_code=self.zero_code)

    def __rmatmul__(self, weights: torch.Tensor) -> torch.Tensor:
        """weights [..., N] @ self [N, K]: the self-conditioning mix of embeddings."""
        return _mix(weights, self)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """The network's calls on a weight (see "as a weight of the network" below); anything else is refused by
        name rather than silently dequantising a whole matrix."""
        kwargs = kwargs or {}
        if func is F.linear:
            return _linear(*args, **kwargs)
        if func is F.embedding:
            ids, weight = args[0], args[1]
            return weight.dequantize(ids.reshape(-1), weight.dtype).view(*ids.shape, -1)
        raise TypeError(f"{getattr(func, '__name__', func)} is not defined on a quantised weight")

    @classmethod
    def from_gguf(cls, data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> GroupQuantized:
        """From a GGUF tensor's raw block bytes (uint8, as gguf.GGUFReader's tensor.data gives them: shape [..., N,
        K//block*type_size]) and its checkpoint shape [..., N, K] (K multiple of the block size)."""
        qtype = GGMLQuantizationType(qtype)
        if qtype.name not in _LAYOUTS:
            raise ValueError(f"GGML type {qtype.name} cannot be kept quantized: supported types are "
                             f"{', '.join(_LAYOUTS)}")
        layout = _LAYOUTS[qtype.name]
        block, type_size = GGML_QUANT_SIZES[qtype]
        *lead, k = shape = tuple(int(d) for d in shape)
        if k % block:
            raise ValueError(f"{qtype.name} tensor of shape {shape}: its last dimension is not a multiple of the "
                             f"block size {block}")
        expected = (*lead, k // block * type_size)
        if data.dtype != np.uint8 or data.shape != expected:
            raise ValueError(f"{qtype.name} tensor of shape {shape} needs uint8 block bytes of shape {expected}, "
                             f"got {data.dtype} {data.shape}")

        blocks = data.reshape(-1, type_size)
        n_blocks = blocks.shape[0]
        groups = block // layout.group
        codes = np.empty((n_blocks, block // 2 if layout.bits == 4 else block), dtype=np.uint8)
        scale = np.empty((n_blocks, groups), dtype=np.float32)
        offset = np.empty((n_blocks, groups), dtype=np.float32) if layout.has_offset else None
        step = max(1, _CHUNK_VALUES // block)
        for start in range(0, n_blocks, step):
            part = slice(start, start + step)
            values, scale[part], chunk_offset = layout.decode(blocks[part])
            codes[part] = values[:, 0::2] | (values[:, 1::2] << 4) if layout.bits == 4 else values
            if offset is not None:
                offset[part] = chunk_offset
        return cls(codes=torch.from_numpy(codes.reshape(*lead, -1)), bits=layout.bits, group=layout.group,
                   scale=torch.from_numpy(scale.reshape(*lead, -1)),
                   offset=None if offset is None else torch.from_numpy(offset.reshape(*lead, -1)),
                   zero_code=layout.zero_code, shape=shape, qtype=qtype.name)


# ---- GGUF block layouts ------------------------------------------------------------------------------------------
# Each decoder maps blocks uint8 [B, type_size] to (codes uint8 [B, block] one per column, scale float32 [B, groups],
# offset float32 [B, groups] or None), the scales and offsets being the float32 products gguf's dequantize forms.

_CHUNK_VALUES = 1 << 22  # values decoded per numpy pass: a few tens of MB of temporaries
_QK_K = 256  # values per K-quant super-block

_Decoded = tuple[np.ndarray, np.ndarray, np.ndarray | None]


class _Layout(NamedTuple):
    bits: int
    group: int
    zero_code: int
    has_offset: bool
    decode: Callable[[np.ndarray], _Decoded]


def _fp16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 stored at byte `at` of each block, as float32 [B, 1]."""
    return np.ascontiguousarray(blocks[:, at:at + 2]).view(np.float16).astype(np.float32)


def _halves(packed: np.ndarray) -> np.ndarray:
    """Bytes [..., P] -> [..., 2P]: the low nibbles of a run of P bytes, then its high nibbles (ggml's order)."""
    return np.concatenate((packed & 0x0F, packed >> 4), axis=-1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1's 32-bit little-endian mask [B, 4] -> bit i of it (column i's fifth bit) [B, 32]."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's twelve scale bytes [B, 12] -> (the 6-bit scales, the 6-bit minimums), each [B, 8]. Sub-blocks
    0-3 keep theirs in the low six bits of bytes 0-3 (scales) and 4-7 (minimums); sub-blocks 4-7 keep their low four
    bits in bytes 8-11 (scale low nibble, minimum high nibble) and their top two bits in the spare top bits of bytes
    0-3 (scales) and 4-7 (minimums)."""
    first, second, third = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate((first & 0x3F, (third & 0x0F) | ((first >> 6) << 4)), axis=1)
    minimums = np.concatenate((second & 0x3F, (third >> 4) | ((second >> 6) << 4)), axis=1)
    return scales, minimums


def _q8_0(blocks: np.ndarray) -> _Decoded:
    # d fp16, 32 int8 codes; XOR 0x80 turns each int8 into its value + 128 as uint8.
    return blocks[:, 2:34] ^ 0x80, _fp16(blocks, 0), None


def _q4_0(blocks: np.ndarray) -> _Decoded:
    # d fp16, 16 bytes: columns 0-15 in the low nibbles, 16-31 in the high ones.
    return _halves(blocks[:, 2:18]), _fp16(blocks, 0), None


def _q4_1(blocks: np.ndarray) -> _Decoded:
    # d fp16, m fp16, 16 bytes of nibbles as Q4_0.
    return _halves(blocks[:, 4:20]), _fp16(blocks, 0), _fp16(blocks, 2)


def _q5_0(blocks: np.ndarray) -> _Decoded:
    # d fp16, 4 bytes of fifth bits, 16 bytes of low nibbles as Q4_0.
    return _halves(blocks[:, 6:22]) | (_fifth_bits(blocks[:, 2:6]) << 4), _fp16(blocks, 0), None


def _q5_1(blocks: np.ndarray) -> _Decoded:
    # d fp16, m fp16, 4 bytes of fifth bits, 16 bytes of low nibbles as Q4_0.
    return _halves(blocks[:, 8:24]) | (_fifth_bits(blocks[:, 4:8]) << 4), _fp16(blocks, 0), _fp16(blocks, 2)


def _k_affine(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's (scale d * sc, offset -(dmin * m)) per 32-value sub-block, each float32 [B, 8]."""
    scales, minimums = _k_scales(blocks[:, 4:16])
    return _fp16(blocks, 0) * scales.astype(np.float32), -(_fp16(blocks, 2) * minimums.astype(np.float32))


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K's 128 nibble bytes [B, 128] -> [B, 256]: bytes 32p..32p+31 hold sub-block 2p in their low
    nibbles and sub-block 2p + 1 in their high ones."""
    return _halves(qs.reshape(-1, 4, 32)).reshape(-1, _QK_K)


def _q4_k(blocks: np.ndarray) -> _Decoded:
    # d fp16, dmin fp16, 12 scale bytes, 128 nibble bytes.
    return _k_low_nibbles(blocks[:, 16:144]), *_k_affine(blocks)


def _q5_k(blocks: np.ndarray) -> _Decoded:
    # d fp16, dmin fp16, 12 scale bytes, 32 bytes of fifth bits (bit s of byte j: column j of sub-block s),
    # 128 nibble bytes as Q4_K.
    fifth = (blocks[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    return _k_low_nibbles(blocks[:, 48:176]) | (fifth.reshape(-1, _QK_K) << 4), *_k_affine(blocks)


def _q6_k(blocks: np.ndarray) -> _Decoded:
    # 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 int8 scales, d fp16. Each half h of the super-block
    # (128 columns) has 64 low-nibble bytes (columns 0-63 of the half low, 64-127 high) and 32 high-part bytes
    # (bits 2t, 2t + 1 of byte j: column 32t + j of the half).
    low = _halves(blocks[:, 0:128].reshape(-1, 2, 64))
    high = (blocks[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 0x03
    codes = low.reshape(-1, _QK_K) | (high.reshape(-1, _QK_K) << 4)
    return codes, _fp16(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32), None


_LAYOUTS: dict[str, _Layout] = {
    "Q8_0": _Layout(bits=8, group=32, zero_code=128, has_offset=False, decode=_q8_0),
    "Q4_0": _Layout(bits=4, group=32, zero_code=8, has_offset=False, decode=_q4_0),
    "Q4_1": _Layout(bits=4, group=32, zero_code=0, has_offset=True, decode=_q4_1),
    "Q5_0": _Layout(bits=5, group=32, zero_code=16, has_offset=False, decode=_q5_0),
    "Q5_1": _Layout(bits=5, group=32, zero_code=0, has_offset=True, decode=_q5_1),
    "Q4_K": _Layout(bits=4, group=32, zero_code=0, has_offset=True, decode=_q4_k),
    "Q5_K": _Layout(bits=5, group=32, zero_code=0, has_offset=True, decode=_q5_k),
    "Q6_K": _Layout(bits=6, group=16, zero_code=32, has_offset=False, decode=_q6_k),
}

QUANTIZED_TYPES = tuple(_LAYOUTS)  # the GGML types a model keeps quantised

# ---- as a weight of the network ------------------------------------------------------------------------------------
# A GroupQuantized stands where the network has a weight tensor: nn.Linear's F.linear, the embedding's F.embedding,
# the self-conditioning `probs @ embedding`, an expert's `weight[e]` in grouped_linear, the sampler's head matmul.
# Those calls reach `__torch_function__` (`__rmatmul__` for the `@`), which dequantise a tile of rows at a time in
# the compute dtype, so no matrix is ever expanded whole (the released vocabulary matrix alone is 1.5 GB in bf16).

# Values dequantised at once: 32 MB in bf16, so that a released attention or MLP matrix is one tile and the vocabulary
# matrix 44. Measured against 8 MB tiles (256 rows, Q8_0, weights from memory): the released attention q 6.0 against
# 8.0 ms, the vocabulary matrix 460 against 492 ms (fewer, larger matmuls, no strided copies of column slices).
# Where products are widened to float32 (`dgemma.widening`) the tiles are widening's instead: 4 MiB of float32 in one
# reused buffer. Fresh 64 MB float32 tiles are mapped page by page at each allocation under glibc's defaults: a
# 5,957 x 2,816 Q6_K tile took 44 ms dequantised into a fresh tensor against 13 ms into a reused one, and the
# sampler's two vocabulary products of a Q4_K_M-like file's released shapes 12.7 to 14.1 s a step against 7.0 to
# 9.0 s in tiles of 2^20 values (a 2-core Zen 3 EPYC, alternated in one process).
TILE_VALUES = 1 << 24


COMPILED_TILE_VALUES = 1 << 20  # smaller tiles (small matrices, test models) stay eager: compiling costs seconds


def _in_one_pass(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, zero_code: int, group: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """`GroupQuantized.dequantize` of one-byte codes (Q8_0, Q6_K, Q5_*) as one expression, which Inductor fuses into
    one pass: 2.7 to 3.7 times faster than the eager steps on the released model's matrices (a 1,490 x 2,816 Q8_0 tile
    in bf16: 0.54 against 1.71 ms; the whole 262,144 x 2,816 vocabulary matrix at Q6_K or Q5_K: 149 or 141 against
    398 ms). The same bits: code - zero_code and its product with the scale are exact in float32 (module docstring),
    so the offset's addition, fused into a multiply-add or not, and the cast are the only roundings, as in the eager
    steps. (4-bit tiles have their own pass, in nibble-plane order: `_nibble_planes`; float32 tiles measured no
    faster compiled.)"""
    return _grouped_values(codes, scale, offset, zero_code, group).reshape(*scale.shape[:-1], -1).to(dtype)


def _grouped_values(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, zero_code: int,
                    group: int) -> torch.Tensor:
    """The float32 values of one-byte codes [..., K] as [..., K // group, group], (code - zero_code) * scale (+
    offset): the compiled kernels' one expression of gguf's steps (`GroupQuantized.dequantize` does them in place)."""
    values = (codes.reshape(*scale.shape, group).float() - zero_code) * scale.unsqueeze(-1)
    return values if offset is None else values + offset.unsqueeze(-1)


@functools.cache
def _one_pass_kernel(qtype: str, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """Compiled at first use (importing the compiler costs a process that never dequantises a large tile nothing),
    one code object per type and dtype (its constants), so that no mix of types runs into dynamo's recompile limit,
    past which it would run eagerly: the same bits, slower."""
    return compiled_under_own_name(_in_one_pass, f"dequantize_in_one_pass_{qtype}_{str(dtype).removeprefix('torch.')}")


def _every_size_dynamic(*tensors: torch.Tensor | None, rows_only: bool = False) -> None:
    """Ask dynamo to compile for any sizes of these tensors (None: absent), or with `rows_only` any size of their
    first dimension, so that new shapes reuse the graph."""
    for tensor in tensors:
        if tensor is not None:
            torch._dynamo.maybe_mark_dynamic(tensor, 0 if rows_only else list(range(tensor.dim())))


def _rows_per_tile(width: int) -> int:
    return max(1, TILE_VALUES // width)


# ---- a few rows times a matrix of one-byte codes: one compiled reduction over the codes, or dgemma's AVX2 kernel ----
# An autoregressive token multiplies one row by every matrix it uses. Tiles would dequantise the whole matrix into
# memory and read it back for a matmul that has almost nothing to compute; one compiled loop that dequantises each code
# in registers and accumulates it straight into the product reads the codes once. Measured on this project's 2-core
# Xeon (`python scripts/quantized_matmul.py`, released shapes, weights from memory), one row: Q8_0 0.71 against 1.52
# ms for tiles (an expert's gate/up), 2.09 against 2.91 (attention's q); Q6_K 0.78 and 1.89 against 1.53 and 2.82.
# The loop redoes the dequantisation for each row (about 0.4 ms a row on the gate/up), so from two rows on tiles are
# as fast (2 rows: 1.20 ms in this loop, 1.24 in tiles; 4 rows: 1.30 and 1.26), and tiles take them. 4-bit codes (two
# per byte) measured slower than tiles this way (Inductor does not vectorise the nibble unpacking), and on AMX they
# have their own kernel anyway.
FEW_ROWS = 1
# dgemma's AVX2 kernel (`dgemma.avx2_rows`, on CPUs with AVX2 and no AVX-512) dequantises nothing: each row's integers
# multiply the codes straight from L1, so a row costs its products alone. Against tiles (dequantised, then widened
# to float32 products: `dgemma.widening`) on a 2-core AMD EPYC (Zen 3), weights from memory, an expert's Q8_0 gate/up
# (1,408 x 2,816) took 0.48 / 1.98 / 3.86 / 7.49 ms at 2 / 16 / 32 / 64 rows against 2.81 / 3.68 / 5.44 / 7.59, its
# down (2,816 x 704) 1.42 and 2.73 ms at 16 and 32 rows against 2.75 and 3.32 (6.19 against 5.70 at 48), attention's
# q (4,096 x 2,816) 5.41 and 10.83 at 16 and 32 against 11.08 and 14.42. A denoising step sends each expert about 16
# of a canvas's rows, a batch of autoregressive requests one row each.
AVX2_FEW_ROWS = 32


def _few_rows_product(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                      zero_code: int, group: int) -> torch.Tensor:
    """x [M, K] (float32) @ W.T for W [N, K] held as one-byte codes, accumulated in float32. x comes widened to
    float32 (exactly, from bf16 or fp16): with a bf16 x widened inside the loop, Inductor's loop read the codes from
    memory at a quarter of the rate (9 against 33 G codes/s for a Q8_0 matrix of 4,096 x 2,816 on a 2-core AMD EPYC;
    the same from cache)."""
    if not torch.compiler.is_compiling():  # eagerly, [M, N, K] float32 temporaries: the whole matrix, M times over
        raise RuntimeError("the few-row quantised product ran eagerly: it only exists compiled")
    values = _grouped_values(codes, scale, offset, zero_code, group)  # [N, K // group, group]
    # Summed in this grouped form, not flattened to [M, N, K] as the one-row kernel sums: flattened, Inductor's loop
    # read the codes at 9 against 33 G codes/s (rows of 2,816, Q8_0) and the chunks of a longer row at 1.2.
    rows, width = values.shape[0], values.shape[1] * group
    if width <= SUM_CHUNK or width % SUM_CHUNK:
        return (values * x.view(-1, 1, *values.shape[1:])).sum((-2, -1))
    chunk = SUM_CHUNK // group  # groups in a chunk: the row summed a chunk at a time (see SUM_CHUNK)
    chunks = values.view(rows, -1, chunk, group) * x.view(-1, 1, width // SUM_CHUNK, chunk, group)
    return chunks.sum((-2, -1)).sum(-1)


@functools.cache
def _few_rows_kernel(qtype: str) -> Callable[..., torch.Tensor]:
    """The compiled product for one GGML type (its zero code, group and offset are constants of the graph), behind its
    own code object. The matrix's sizes are dynamic: one graph for every shape."""
    return compiled_under_own_name(_few_rows_product, f"few_rows_product_{qtype}", fullgraph=True)


def _takes_few_rows_kernel(x: torch.Tensor, weight: GroupQuantized) -> bool:
    """Whether x [..., K] @ weight.T runs as the compiled few-row product: a large matrix of one-byte codes on the CPU,
    computed in bf16 or fp16 (float32 keeps the exact dequantised tiles), at most FEW_ROWS rows, and no gradient to
    record (the kernel has no backward). Where dgemma's AVX2 kernel stands for the compiled loop, which costs no
    compile, small matrices too (a released router's token: 0.45 ms in tiles), and up to AVX2_FEW_ROWS rows."""
    few = AVX2_FEW_ROWS if avx2_rows_available() else FEW_ROWS
    return (weight.bits != 4 and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
            and x.numel() <= few * x.shape[-1] and x.numel() > 0 and len(weight.shape) == 2
            and (weight.shape[0] * weight.shape[1] >= COMPILED_TILE_VALUES or avx2_rows_available())
            and not (x.requires_grad and torch.is_grad_enabled()) and compiling_allowed())


def _few_rows_linear(x: torch.Tensor, weight: GroupQuantized) -> torch.Tensor:
    """The compiled few-row product, or on a CPU with AVX2 and no AVX-512, where Inductor's loop is slow, dgemma's
    kernel for it (`dgemma.avx2_rows`)."""
    rows, codes, scale = (t.contiguous() for t in (x.reshape(-1, x.shape[-1]), weight.codes, weight.scale))
    offset = None if weight.offset is None else weight.offset.contiguous()
    if avx2_rows_available():  # the float32 sums rounded once, inside the kernel
        out = avx2_byte_codes_rows(rows, codes, scale, offset, weight.zero_code)
    else:
        rows = rows.float()
        _every_size_dynamic(rows, codes, scale, offset)  # every size dynamic: no shape ever asks for another graph
        with torch.no_grad():  # one grad mode for every call: no recompile for it
            out = _few_rows_kernel(weight.qtype)(rows, codes, scale, offset, weight.zero_code, weight.group)
        out = out.to(x.dtype)  # the float32 sums rounded once
    return out.view(*x.shape[:-1], weight.shape[0])


# ---- tiles of 4-bit codes in nibble planes ---------------------------------------------------------------------------
# A product only needs its input's columns and the weight's in the same order, not in the checkpoint's. Unpacked in the
# checkpoint's order, a 4-bit tile interleaves each byte's two nibbles, which Inductor does not vectorise (such tiles
# take `dequantize`'s eager steps); unpacked with each group's low nibbles (its even columns) before its high ones (its
# odd columns), each is a vector of the group's bytes, and the tile is one vectorised pass: a released dense MLP
# matrix (2,112 x 2,816, Q4_K) in bf16 0.8 to 0.95 against 2.8 to 3.1 ms on a 2-core AMD EPYC (Zen 5). The input
# takes the same order (`_plane_order`): the same products, summed in another order.


def _nibble_planes(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, zero_code: int, group: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """The values of 4-bit codes [N, K // 2] (byte j: column 2j low, 2j + 1 high) as [N, K] with each group's
    columns in plane order, even then odd: gguf's steps in one expression (the same bits as `dequantize`, whose
    steps before the offset are exact), cast to dtype."""
    pairs = codes.reshape(*scale.shape, group // 2)
    values = (torch.stack((pairs & 0x0F, pairs >> 4), dim=-2).float() - zero_code) * scale[..., None, None]
    if offset is not None:
        values = values + offset[..., None, None]
    return values.reshape(scale.shape[0], -1).to(dtype)


@functools.cache
def _nibble_planes_kernel(qtype: str, dtype: torch.dtype, width: int) -> Callable[..., torch.Tensor]:
    """Compiled at first use, one code object per type, dtype and row length, for every number of rows: with the row
    length dynamic too (as dynamo makes a size that changed between calls), the pass ran 13 to 30 times slower."""
    name = f"nibble_planes_{qtype}_{str(dtype).removeprefix('torch.')}_{width}"
    return compiled_under_own_name(_nibble_planes, name)


def _plane_tile(weight: GroupQuantized, selected: slice, dtype: torch.dtype) -> torch.Tensor:
    """Rows `selected` of a 4-bit weight [N, K] dequantised to dtype in plane order, in one compiled pass."""
    codes, scale = weight.codes[selected], weight.scale[selected]
    offset = None if weight.offset is None else weight.offset[selected]
    _every_size_dynamic(codes, scale, offset, rows_only=True)  # one graph for any number of rows
    kernel = _nibble_planes_kernel(weight.qtype, dtype, weight.shape[-1])
    return kernel(codes, scale, offset, weight.zero_code, weight.group, dtype)


@functools.cache
def _plane_order(width: int, group: int) -> torch.Tensor:
    """The columns [width] in plane order: each group's even columns, then its odd ones."""
    return torch.arange(width).view(width // group, group // 2, 2).transpose(1, 2).reshape(-1)


def _takes_nibble_planes(x: torch.Tensor, weight: GroupQuantized) -> bool:
    """Whether tiles of weight for x run in plane order: 4-bit codes of a large 2-D matrix computed in bf16 or fp16
    on the CPU, compiling allowed (float32, the parity path, keeps the checkpoint's order and gguf's eager steps).
    Where the product is widened to float32 (`_widens`), `_linear` takes widening's tiles before asking."""
    return (weight.bits == 4 and len(weight.shape) == 2 and x.device.type == "cpu"
            and x.dtype in (torch.bfloat16, torch.float16)
            and min(weight.shape[0], _rows_per_tile(weight.shape[1])) * weight.shape[1] >= COMPILED_TILE_VALUES
            and compiling_allowed())


def _linear(x: torch.Tensor, weight: GroupQuantized, bias: torch.Tensor | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K].T (+ bias) in x's dtype: a few rows in one compiled pass over the codes
    (`_takes_few_rows_kernel`), else a tile of weight rows at a time (4-bit ones in plane order where
    `_takes_nibble_planes`), dequantised to x's dtype; or where the CPU has no native half-precision matmuls, as
    `dgemma.widening` multiplies: x widened once, float32 tiles of its size dequantised into one reused buffer, the
    result rounded once."""
    if _takes_few_rows_kernel(x, weight):
        product = _few_rows_linear(x, weight)
        product = product if bias is None else product + bias
        return product if out is None else out.copy_(product)
    if _widens(x):
        return widened_linear(x, weight, bias, out)
    rows, width = weight.shape
    planes = _takes_nibble_planes(x, weight)
    if planes:
        x = x[..., _plane_order(width, weight.group).to(x.device)]
    bias = None if bias is None else bias.to(x.dtype)

    def tile_of(selected: slice) -> torch.Tensor:
        return _plane_tile(weight, selected, x.dtype) if planes else weight.dequantize(selected, x.dtype)
    tile = _rows_per_tile(width)
    if rows <= tile and out is None:
        return F.linear(x, tile_of(slice(None)), bias)
    out = x.new_empty(*x.shape[:-1], rows) if out is None else out
    for start in range(0, rows, tile):
        end = min(start + tile, rows)
        out[..., start:end] = F.linear(x, tile_of(slice(start, end)), None if bias is None else bias[start:end])
    return out


def _widens(x: torch.Tensor) -> bool:
    """Whether x's products with quantised tiles run widened (`dgemma.widening`): x has more than one row in bf16 or
    fp16 on a CPU without native half-precision matmuls (`dgemma.widening.widens`; x stands for the weight)."""
    return widens(x, x)


def _mix(weights: torch.Tensor, matrix: GroupQuantized) -> torch.Tensor:
    """weights [..., N] @ matrix[N, K] in weights' dtype, summed over tiles of matrix rows in fp32 and rounded once
    (widened where `_widens`, as `_linear`)."""
    rows, width = matrix.shape
    if _widens(weights):
        return widened_mix(weights.reshape(-1, rows), matrix).view(*weights.shape[:-1], width).to(weights.dtype)
    tile = _rows_per_tile(width)
    if rows <= tile:
        return weights @ matrix.dequantize(None, weights.dtype)
    total = torch.zeros(*weights.shape[:-1], width, dtype=torch.float32, device=weights.device)
    for start in range(0, rows, tile):
        end = min(start + tile, rows)
        total += (weights[..., start:end] @ matrix.dequantize(slice(start, end), weights.dtype)).float()
    return total.to(weights.dtype)


# ---- CPU int4 kernels, for experts and (on AMX or AVX-512 BF16) every 4-bit matrix reached through F.linear -------
# An expert sees few rows per step (a 256-token canvas routes 2,048 (token, expert) pairs over the released model's
# 128 experts: 16 rows each; an autoregressive token, one), so an expert matmul is bound by reading its weight, and a
# dequantised tile costs far more than the matmul it feeds. An int4 kernel reads the packed codes directly. Measured
# on this project's 2-core Xeon (`python scripts/quantized_matmul.py`, one released gate/up expert, 1,408 x 2,816,
# weights read from memory): 16 rows 0.43 ms on the AMX kernel and 0.82 ms in torch's eager one against 0.53 ms in
# bf16 and 3.3 ms dequantising a tile; one row 0.42 ms (AMX), 0.14 ms (eager) and 0.50 ms (bf16). For a canvas's 256
# rows (attention, dense MLP) the AMX kernel takes 1.1 to 1.2 times bf16's time, tiles 3.3 to 4.3 times and the
# eager kernel 9 times (docs/quantization.md). Without AMX, dgemma's AVX-512 BF16 kernel (dgemma.avx512_int4) runs
# a released expert at 16 rows 1.6 to 1.8 times as fast as bf16 and 2.4 times torch's eager kernel, one row as fast
# as the eager kernel or up to 1.5 times faster, a canvas's 256 rows as fast as bf16 and 1.5 to 1.9 times tiles (a
# 2-core AMD EPYC, Zen 5; docs/amd/quantized_matmul-avx512-int4.json). So every 4-bit matrix takes the fast kernel
# where there is one, and elsewhere only experts take the eager one's layout, or on a CPU with AVX2 and no AVX-512
# dgemma's AVX2 kernel's (`CpuInt4.takes_avx2_rows`).

def is_expert(name: str) -> bool:
    """Whether a tensor (by checkpoint or module name) is one of the experts' stacked matrices."""
    return ".experts." in name


def fast_int4_layout() -> str | None:
    """The layout of this CPU's fast int4 kernel: "amx" (Inductor's AMX template, dgemma.amx_int4), else "avx512"
    (dgemma.avx512_int4, on AVX-512 BF16), else None (torch's eager kernel alone)."""
    if amx_int4_available():
        return "amx"
    return "avx512" if avx512_int4_available() else None


def cpu_int4_layout(name: str, weight: GroupQuantized, device: torch.device | str, linear_only: bool,
                    one_row: bool = False) -> str | None:
    """The layout (`CpuInt4`) of the CPU int4 kernel a matrix computed in bf16 on the CPU runs through, or None for
    tiles. It needs 4-bit codes in groups of 32 (Q4_0, Q4_1, Q4_K) and a matrix the network reaches only through
    F.linear (`linear_only`: an nn.Linear's weight, not the head the sampler reads; experts always). With a fast
    kernel (`fast_int4_layout`: AMX, or AVX-512 BF16) every such matrix whose rows are a multiple of 32: faster than
    tiles at any number of rows. Without one, experts with rows a multiple of 16, in torch's eager kernel's layout
    or dgemma's AVX2 kernel's where that kernel takes them (`int4_layout_without_fast_kernel`): faster than tiles at an
    expert's few rows, slower at a canvas's 256 (docs/quantization.md); and the other matrices with such rows in
    that layout for single rows, their tiles kept for more rows (`keeps_tiles`).

    Q8_0 experts also take a layout, as two 4-bit halves (`CpuInt4`, `halves`): twice the 4-bit work, which at an
    expert's 16 rows on the AMX kernel still takes 0.63 to 0.71 of the time of its tiles, and at one row in the eager
    kernel 0.47 to 0.56 of the time of the one-row pass over its bytes (`scripts/quantized_matmul.py`). At a
    canvas's 256 rows tiles are faster (the kernel dequantises twice the codes per block of rows), so Q8_0 matrices
    other than experts stay tiles; so do Q8_0 experts loaded for diffusion without a fast kernel (the eager kernel
    at 16 rows: 1.1 to 1.2 times the tiles' time; where dgemma's AVX2 kernel for one-byte codes takes up to
    `AVX2_FEW_ROWS` rows, 16 rows times an expert's gate/up took 1.98 ms there against 3.19 as halves on a 2-core
    Zen 3). Loaded for one row on the AVX-512 kernel, the other Q8_0 matrices reached through F.linear (attention and
    the router under `int4`) take it as halves too: one row through attention's q in 0.23 against 0.33 ms for the
    one-row pass over its bytes (a 2-core AMD EPYC, Zen 5; docs/amd/quantized_matmul-avx512-int4.json), for 1.25
    against 1.125 bytes a value.

    `one_row`: the model is loaded for autoregressive decoding, where all but the prompt's products are one token's
    row. On AMX experts then take torch's eager kernel: at one row it is 2.3 to 3.9 times faster than the AMX kernel
    (which pads the row to two and dequantises the whole matrix either way), at an expert's share of a prompt (16
    rows) 1.9 times slower; the other matrices keep the AMX kernel (with a copy in the eager kernel's layout for
    single rows: `keeps_one_row_copy`). The AVX-512 kernel is the faster one at one row as at many. Without a fast
    kernel the eager one takes them all (tiles are 19 to 30 times slower for one row), keeping no tiles."""
    if not (weight.bits in (4, 8) and weight.group == 32 and weight.dtype == torch.bfloat16
            and torch.device(device).type == "cpu" and (linear_only or is_expert(name))):
        return None
    rows = weight.shape[-2]
    fast = fast_int4_layout()
    if fast and (rows % {"amx": AMX_BLOCK_N, "avx512": AVX512_BLOCK_N}[fast]
                 or (one_row and fast == "amx" and is_expert(name))):  # at one row torch's eager kernel is faster
        fast = None
    eager = int4_layout_without_fast_kernel(rows)
    if weight.bits == 8:
        if not is_expert(name) and not (one_row and fast == "avx512"):  # tiles, and for one row the byte pass
            return None
        return fast or (eager if one_row else None)
    return fast or eager


def int4_layout_without_fast_kernel(rows: int) -> str | None:
    """The int4 layout of a matrix of `rows` rows without a fast kernel: "avx2" where dgemma's AVX2 kernel takes it
    (`avx2_rows.available()`, rows in 32s): its own layout for the codes (`dgemma.avx2_rows.pack`: no unpacking in
    its loop), the pairs in blocks of 32 columns (one stream beside the codes: a released layer's 4-bit matrices from
    memory in 0.90 to 0.92 of the time they took with the pairs where torch's kernel reads them; docs/cpu.md). Else
    "int4pack", torch's eager kernel's (rows in 16s), else None."""
    if rows % AVX2_INT4_BLOCK == 0 and avx2_rows_available():
        return "avx2"
    return "int4pack" if rows % 16 == 0 else None


def keeps_one_row_copy(name: str, layout: str | None) -> bool:
    """Whether a matrix in a CPU int4 layout also keeps its codes in torch's eager layout, for single rows: the
    matrices on the AMX kernel other than experts. For one row the eager kernel is 2.3 times faster (attention's q,
    the dense MLP), and those matrices are 7 % of a released layer's weights, so the copy costs about 3 % of a
    4-bit model's memory; the experts, 93 %, take one layout, chosen by the decoding the model is loaded for."""
    return layout == "amx" and not is_expert(name)


def keeps_tiles(name: str, layout: str | None, one_row: bool) -> bool:
    """Whether a 4-bit matrix in a layout without a fast kernel (torch's eager one or dgemma's AVX2 one) also keeps its
    codes as they came (GroupQuantized), for more than one row: the matrices other than experts without a fast kernel
    (`fast_int4_layout`), loaded for diffusion. A canvas's 256 rows are faster in dequantised tiles than in the eager
    kernel, one token's row 19 to 30 times slower (a released layer's token, `int4` loaded for diffusion: 14 / 15 ms
    with tiles alone, docs/cpu.md). Under `int4` these are the dense MLP and the self-conditioning block (the dense MLP
    is 2 % of a released layer's weights; attention is 8-bit there), under `q4_k_m` also attention's q, k and o (5 %):
    the second copy cost 0.32 GiB of the released `int4` form's 15.9.
    Loaded for autoregressive decoding, they keep that layout alone."""
    return layout in WITHOUT_FAST_KERNEL and not is_expert(name) and not one_row


def _torch_int4_pack(codes: torch.Tensor) -> torch.Tensor:
    return torch._convert_weight_to_int4pack_for_cpu(codes, 1)


# How each layout packs a matrix's 4-bit codes [N, K] (int32, 0..15) into uint8 [N, K // 2].
PACKERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "amx": block_codes, "avx512": avx512_pack, "int4pack": _torch_int4_pack, "avx2": avx2_pack}
WITHOUT_FAST_KERNEL = ("int4pack", "avx2")  # the layouts of CPUs without a fast int4 kernel (`fast_int4_layout`)
# How a layout holds a matrix's bf16 scales and zeros, given in torch's int4 layout [K // 32, N, 2]: as given, but for
# dgemma's AVX-512 and AVX2 kernels, which read each block of 32 output columns' pairs together (`block_pairs`).
SCALE_PACKERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "amx": lambda pairs: pairs, "avx512": block_pairs, "int4pack": lambda pairs: pairs, "avx2": block_pairs}


@dataclass(eq=False)
class CpuInt4:
    """A 4-bit weight [..., N, K] (or an 8-bit one as two 4-bit halves, below) for a CPU int4 kernel: codes packed in
    the kernel's layout, and per group of 32 values a bf16 scale and zero with value = (code - 8) * scale + zero. A
    GroupQuantized value (code - zero_code) * s + o is that with scale = s and zero = (8 - zero_code) * s + o, formed
    in float32 and rounded once to bf16: the one rounding of the repack (relative 2^-9 of the scale and of the zero,
    about 1/64 of a quantisation step for Q4_K's zero). Computes in bf16.

    Four kernels, four layouts (`cpu_int4_layout` chooses; `PACKERS`, `SCALE_PACKERS`): "amx", Inductor's AMX
    template (dgemma.amx_int4), "avx512", dgemma's AVX-512 BF16 kernel (dgemma.avx512_int4), "int4pack", torch's
    eager kernel, packed by `torch._convert_weight_to_int4pack_for_cpu`, and "avx2", dgemma's AVX2 kernel
    (dgemma.avx2_rows), its codes laid out by `dgemma.avx2_rows.pack`, the pairs in blocks of 32 columns. Beside the amx
    layout the codes may also be kept in the int4pack one (`one_row_codes`): a single row then takes the eager
    kernel, faster for one row (the two kernels share the scales and zeros). Beside the int4pack and avx2 layouts the
    GroupQuantized weight it came from may be kept (`tiles`): more than one row then takes its dequantised tiles
    (`keeps_tiles`).

    8-bit codes (Q8_0) are held as two 4-bit halves (`halves`), a 4-bit matrix [..., N, 2K] whose first K columns
    are the codes' high nibbles and last K their low ones, times the input taken twice, [x, x]: code - zero_code =
    16 (high - 8) + low + 128 - zero_code, so the high half has scale 16 s and zero 0, the low half scale s and zero
    (136 - zero_code) s + offset, 8 s for Q8_0. The kernel sums both halves' products in fp32 and rounds once; 16 s
    and 8 s are exact multiples of s in bf16, so the repack rounds Q8_0's scale and nothing else."""

    codes: torch.Tensor  # uint8 [..., N, K // 2] (of 2K with `halves`), packed in the layout's order
    scales_and_zeros: torch.Tensor  # bf16 [..., K // 32, N, 2] (of 2K with `halves`), as `SCALE_PACKERS` holds them
    shape: tuple[int, ...]
    qtype: str
    layout: str  # "amx", "avx512", "int4pack" or "avx2"
    one_row_codes: torch.Tensor | None = None  # uint8 [..., N, K // 2] in the int4pack layout, beside amx codes
    tiles: GroupQuantized | None = None  # the weight as it came, for more than one row, beside int4pack or avx2 codes
    halves: bool = False  # 8-bit codes as two 4-bit halves: codes [..., N, K], scales and zeros for 2K columns

    GROUP = 32

    @classmethod
    def from_grouped(cls, weight: GroupQuantized, layout: str, one_row_copy: bool = False,
                     keep_tiles: bool = False) -> CpuInt4:
        """The same codes repacked (one leading entry, e.g. one expert, at a time: the kernels pack 2-D weights),
        in `layout` ("amx", "avx512", "int4pack" or "avx2", as `cpu_int4_layout` chooses), and with `one_row_copy`
        (amx only) also in the int4pack layout for single rows (`keeps_one_row_copy`); with `keep_tiles` (int4pack or
        avx2, 4-bit only) `weight` itself is kept for more than one row (`keeps_tiles`)."""
        *lead, n, k = weight.shape
        if layout not in PACKERS:
            raise ValueError(f"layout must be one of {', '.join(map(repr, PACKERS))}, not {layout!r}")
        if one_row_copy and layout != "amx":
            raise ValueError("a copy for single rows is kept beside the amx layout only (int4pack is that copy)")
        if keep_tiles and (layout not in WITHOUT_FAST_KERNEL or weight.bits != 4):
            raise ValueError("tiles for many rows are kept beside 4-bit codes in the int4pack or avx2 layout only")
        if weight.bits not in (4, 8) or weight.group != cls.GROUP:
            raise ValueError(f"a CPU int4 layout takes 4- or 8-bit codes in groups of {cls.GROUP}, not "
                             f"{weight.qtype}'s {weight.bits}-bit codes in groups of {weight.group}")
        halves = weight.bits == 8
        width = 2 * k if halves else k  # the 4-bit matrix's columns
        codes = weight.codes.reshape(-1, n, weight.codes.shape[-1])
        scale = weight.scale.reshape(-1, n, k // cls.GROUP)
        offset = None if weight.offset is None else weight.offset.reshape(-1, n, k // cls.GROUP)
        entries = codes.shape[0]
        packed = torch.empty(entries, n, width // 2, dtype=torch.uint8)
        one_row = torch.empty(entries, n, width // 2, dtype=torch.uint8) if one_row_copy else None
        scales_and_zeros = []
        for entry in range(entries):
            added = offset[entry] if offset is not None else 0
            if halves:
                unpacked = torch.cat((codes[entry] >> 4, codes[entry] & 0x0F), dim=-1).to(torch.int32)
                scales = torch.cat((16 * scale[entry], scale[entry]), dim=-1)
                zeros = torch.cat((torch.zeros_like(scale[entry]), (136 - weight.zero_code) * scale[entry] + added),
                                  dim=-1)
            else:
                unpacked = torch.stack((codes[entry] & 0x0F, codes[entry] >> 4), dim=-1).reshape(n, k).to(torch.int32)
                scales, zeros = scale[entry], (8 - weight.zero_code) * scale[entry] + added
            packed[entry] = PACKERS[layout](unpacked)
            if one_row is not None:
                one_row[entry] = PACKERS["int4pack"](unpacked)
            pairs = torch.stack((scales, zeros), dim=-1).transpose(0, 1).to(torch.bfloat16)
            scales_and_zeros.append(SCALE_PACKERS[layout](pairs))
        pairs = torch.stack(scales_and_zeros)
        return cls(codes=packed.reshape(*lead, n, width // 2), scales_and_zeros=pairs.reshape(*lead, *pairs.shape[1:]),
                   shape=tuple(weight.shape), qtype=weight.qtype, layout=layout,
                   one_row_codes=None if one_row is None else one_row.reshape(*lead, n, width // 2),
                   tiles=weight if keep_tiles else None, halves=halves)

    def nbytes(self) -> int:
        """bytes held (packed codes, the copy for single rows or the tiles if kept, scales and zeros)"""
        held = (self.codes, self.scales_and_zeros) + (() if self.one_row_codes is None else (self.one_row_codes,))
        return sum(t.numel() * t.element_size() for t in held) + (0 if self.tiles is None else self.tiles.nbytes())

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def __getitem__(self, index: int) -> CpuInt4:
        """Entry `index` of the leading dimension (one expert of [E, N, K])."""
        return replace(self, codes=self.codes[index], scales_and_zeros=self.scales_and_zeros[index],
                       shape=self.shape[1:],
                       one_row_codes=None if self.one_row_codes is None else self.one_row_codes[index],
                       tiles=None if self.tiles is None else self.tiles[index])

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """F.linear, the one call an expert's weight receives; anything else is refused by name."""
        if func is not F.linear:
            raise TypeError(f"{getattr(func, '__name__', func)} is not defined on a weight in a CPU int4 layout")
        x, weight, *rest = args
        bias = rest[0] if rest else (kwargs or {}).get("bias")
        if weight.tiles is not None and x.numel() > x.shape[-1]:
            return F.linear(x, weight.tiles, bias)
        flat = weight._kernel_rows(x)
        if weight.takes_avx2_rows:
            out = weight._avx2_product(flat, torch.zeros(flat.shape[0], dtype=torch.long))
        elif weight.one_row_codes is not None and flat.shape[0] == 1:
            out = torch._weight_int4pack_mm_for_cpu(flat, weight.one_row_codes, cls.GROUP, weight.scales_and_zeros)
        elif weight.layout == "amx":
            out = amx_int4_matmul(flat, weight.codes, weight.scales_and_zeros)
        elif weight.layout == "avx512":
            out = avx512_int4_matmul(flat, weight.codes, weight.scales_and_zeros)
        else:
            out = torch._weight_int4pack_mm_for_cpu(flat, weight.codes, cls.GROUP, weight.scales_and_zeros)
        out = out.view(*x.shape[:-1], weight.shape[-2])
        return out if bias is None else out + bias

    @property
    def takes_avx2_rows(self) -> bool:
        """Whether products run in dgemma's AVX2 kernel (`dgemma.avx2_rows`): the avx2 layout's, chosen where that
        kernel takes the matrix (`int4_layout_without_fast_kernel`). On a CPU with AVX2 and no AVX-512 it is 1.4 to 2
        times as fast as torch's eager kernel at any number of rows (a released expert, 1 to 64 rows, a 2-core AMD EPYC
        of family 25; docs/cpu.md)."""
        return self.layout == "avx2"

    @property
    def reads_by_index(self) -> bool:
        """Whether `linear_by_index` runs: experts [E, N, K] in dgemma's AVX2 kernel (`takes_avx2_rows`)."""
        return len(self.shape) == 3 and self.takes_avx2_rows

    def linear_by_index(self, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """rows [R, K] @ self[index[r]].T for each row r -> [R, N] in one kernel call, each expert's matrix read in
        place (`reads_by_index`): one token's experts. No gradient."""
        if not self.reads_by_index:
            raise ValueError("CpuInt4.linear_by_index takes experts in dgemma's AVX2 kernel (reads_by_index)")
        return self._avx2_product(self._kernel_rows(rows), index)

    def _avx2_product(self, flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Kernel rows [M, K'] (`_kernel_rows`) times matrix index[m] of this weight (a 2-D weight: its only matrix,
        index 0) in dgemma's AVX2 kernel: [M, N] in flat's dtype, the float32 sums rounded once."""
        return avx2_int4_rows(flat, *self._avx2_operands(), index.contiguous())

    def _avx2_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        """codes and scales and zeros as dgemma's AVX2 kernel takes them: [E, ...], a 2-D weight as its one entry."""
        if len(self.shape) == 3:
            return self.codes, self.scales_and_zeros
        return self.codes.unsqueeze(0), self.scales_and_zeros.unsqueeze(0)

    def token_product(self, row: torch.Tensor) -> TokenProduct | None:
        """How a single row [1, K] is multiplied by this weight (by matrix index, for experts), for a token's layer in
        one object (`dgemma.token_layer`): dgemma's AVX2 kernel where it takes the weight, else None."""
        if not self.takes_avx2_rows or row.dtype != torch.bfloat16:
            return None
        return TokenProduct("int4_rows", list(self._avx2_operands()), twice=self.halves)

    def _kernel_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] as the kernels take it: bf16 rows [M, K], contiguous, taken twice for `halves`."""
        if x.dtype != torch.bfloat16:
            raise TypeError(f"a weight in a CPU int4 layout computes in bfloat16, not {x.dtype}")
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        return torch.cat((flat, flat), dim=-1) if self.halves else flat

    def grouped_linear(self, rows: torch.Tensor, ends: list[int]) -> torch.Tensor:
        """rows [S, K] grouped by expert (group e ends at ends[e]) times expert e's matrix of these [E, N, K]: [S, N],
        each group's product the one F.linear(rows[group], self[e]) gives, without F.linear's dispatch for each
        expert (a denoising step multiplies 256 experts' matrices a layer). Without gradients to record
        (`dgemma.model.grouped_linear` takes F.linear per expert when there are)."""
        if rows.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("CpuInt4.grouped_linear records no gradient: multiply each expert with F.linear")
        if self.one_row_codes is not None or self.tiles is not None:  # experts keep one layout (keeps_one_row_copy)
            raise ValueError("CpuInt4.grouped_linear takes experts, which keep no second copy")
        if self.takes_avx2_rows:  # every expert in one call, each row naming its expert
            counts = torch.diff(torch.tensor([0, *ends]))
            return self.linear_by_index(rows, torch.repeat_interleave(torch.arange(len(ends)), counts))
        flat = self._kernel_rows(rows)
        if self.layout == "avx512":  # every expert in one call
            return avx512_int4_grouped(flat, self.codes, self.scales_and_zeros, ends)
        amx = self.layout == "amx"

        def product(group: torch.Tensor, expert: int) -> torch.Tensor:
            codes, scales_and_zeros = self.codes[expert], self.scales_and_zeros[expert]
            return (amx_int4_product(group, codes, scales_and_zeros) if amx else
                    torch._weight_int4pack_mm_for_cpu(group, codes, self.GROUP, scales_and_zeros))
        with amx_int4_calls() if amx else contextlib.nullcontext():  # one kernel window for every expert
            return each_expert(flat, ends, self.shape[-2], product)


QuantizedWeight = GroupQuantized | CpuInt4


def quantized_weights(model: nn.Module) -> Iterator[tuple[str, QuantizedWeight]]:
    """(module path, weight) of every weight kept quantised, each once (`dgemma.model.attached_weights`)."""
    return attached_weights(model, (GroupQuantized, CpuInt4))


# ---- quantisation schemes ------------------------------------------------------------------------------------------

SCHEMES = ("int8", "int4", "q4_k_m", "int4_experts")
# Under int4 these stay at eight bits: the embedding is also the vocabulary head, and quantised logits cost the
# entropy-bound sampler steps (a noisier distribution has more entropy, so fewer positions pass the bound); the
# router's choices and attention are small in bytes next to the experts, and sensitive.
_EIGHT_BIT_UNDER_INT4 = ("embed_tokens.", "lm_head.", "router.", "self_attn.")
# Under q4_k_m these take Q6_K, as llama.cpp's Q4_K_M gives more bits to the output matrix (here the tied
# embedding), attention's values and the down projections (llama.cpp does so in some layers; here in all).
_SIX_BIT_UNDER_Q4_K_M = ("embed_tokens.", "lm_head.", "v_proj.", "down_proj")
# llama.cpp's fallbacks for rows that are not a multiple of the K-quants' 256-value super-blocks.
_K_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}


def scheme_type(name: str, shape: tuple[int, ...], scheme: str) -> str | None:
    """The GGML type a checkpoint tensor takes under `scheme`, or None to keep it in floating point. int8: every
    matrix Q8_0. int4: the MLP, expert and self-conditioning matrices Q4_K (Q4_0 when their rows are not a multiple
    of Q4_K's 256-value super-blocks, as the released experts' 704), the rest Q8_0. q4_k_m, like llama.cpp's
    Q4_K_M: Q6_K for the embedding, attention's values and the down projections, Q4_K for the rest (Q8_0 and Q5_0
    where rows are not a multiple of 256). Vectors (norm weights, scales) and matrices whose rows are not a multiple
    of 32 stay floating point. int4_experts: the experts' matrices as under int4, everything else floating point:
    the form for a CPU (the experts are 93 % of the released model's weights and, at 4 bits, run in torch's int4
    kernel; the rest keeps bf16's fast matmuls for a canvas's hundreds of rows; docs/cpu.md)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantisation scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    if len(shape) < 2 or shape[-1] % 32 or (scheme == "int4_experts" and not is_expert(name)):
        return None
    if scheme == "q4_k_m":
        qtype = "Q6_K" if any(part in name for part in _SIX_BIT_UNDER_Q4_K_M) else "Q4_K"
        return qtype if shape[-1] % 256 == 0 else _K_FALLBACK[qtype]
    if scheme == "int8" or any(part in name for part in _EIGHT_BIT_UNDER_INT4):
        return "Q8_0"
    return "Q4_K" if shape[-1] % 256 == 0 else "Q4_0"
