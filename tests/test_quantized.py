"""dgemma.quantized: GGUF block formats kept as codes + per-group scales.

Oracle: `gguf.quants.dequantize`, which dequantisation must match bit for bit. Test tensors are quantised by
`gguf.quants.quantize` (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) or by dgemma's ports of ggml's reference K-quantizers
(`dgemma.gguf.quantize_blocks`: Q4_K, Q5_K, Q6_K, which gguf-py cannot quantise).
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

import dgemma.quantized
from dgemma import amx_int4, avx512_int4, widening
from dgemma.compiling import SUM_CHUNK
from dgemma.gguf import quantize_blocks
from dgemma.quantized import CpuInt4, GroupQuantized

TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]
SHAPES = [(6, 512), (3, 4, 512)]  # [N, K] and [E, N, K]; K spans two K-quant super-blocks


@lru_cache(maxsize=None)
def raw(qtype: T, shape: tuple[int, ...]) -> np.ndarray:
    """Block bytes of a random tensor whose rows span magnitudes 1e-3..1e2, with one all-zero row (scale 0: signed
    zeros) and one all-negative row (nonzero minimums), so scales, offsets and codes take varied values."""
    rng = np.random.default_rng(sum(shape) * 100 + list(T).index(qtype))
    rows = rng.standard_normal(shape, dtype=np.float32).reshape(-1, shape[-1])
    rows *= np.float32(10.0) ** rng.uniform(-3, 2, size=(rows.shape[0], 1)).astype(np.float32)
    rows[0] = 0
    rows[1] = -1 - np.abs(rows[1])
    return quantize_blocks(rows.reshape(shape), qtype)


def oracle(qtype: T, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(dequantize(raw(qtype, shape), qtype).reshape(shape))


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # torch.equal calls 0.0 and -0.0 equal; comparing the bit patterns as well makes the check truly bitwise.
    assert actual.dtype == expected.dtype == torch.float32 and actual.shape == expected.shape
    assert torch.equal(actual, expected)
    assert torch.equal(actual.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_is_bitwise_equal_to_gguf(qtype: T, shape: tuple[int, ...]) -> None:
    quantized = GroupQuantized.from_gguf(raw(qtype, shape), qtype, shape)
    assert quantized.shape == shape and quantized.qtype == qtype.name
    assert_bitwise_equal(quantized.dequantize(), oracle(qtype, shape))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_decoding_in_chunks_matches_one_pass(qtype: T, monkeypatch: pytest.MonkeyPatch) -> None:
    # Real tensors are decoded in many chunks, the test tensors above in one: force 3 blocks per chunk, which leaves
    # a partial last chunk.
    shape = SHAPES[1]
    monkeypatch.setattr(dgemma.quantized, "_CHUNK_VALUES", 3 * GGML_QUANT_SIZES[qtype][0])
    assert_bitwise_equal(GroupQuantized.from_gguf(raw(qtype, shape), qtype, shape).dequantize(), oracle(qtype, shape))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_index_selects_leading_entries(qtype: T) -> None:
    for shape, indices in [(SHAPES[0], [4, slice(2, 5), torch.tensor([5, 0, 5])]),  # rows of [N, K]
                           (SHAPES[1], [1, slice(1, 3), torch.tensor([2, 0])])]:  # experts of [E, N, K]
        quantized, full = GroupQuantized.from_gguf(raw(qtype, shape), qtype, shape), oracle(qtype, shape)
        for index in indices:
            assert_bitwise_equal(quantized.dequantize(index), full[index])
        assert torch.equal(quantized.dequantize(1, dtype=torch.bfloat16), full[1].to(torch.bfloat16))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_into_a_float32_tile_gives_the_same_bits_and_refuses_any_other(qtype: T) -> None:
    shape = SHAPES[0]
    quantized, full = GroupQuantized.from_gguf(raw(qtype, shape), qtype, shape), oracle(qtype, shape)
    buffer = torch.full((5, shape[1]), float("nan"))
    tile = buffer[:3]  # the first rows of a reused buffer, as `dgemma.widening` passes them
    assert quantized.dequantize(slice(2, 5), out=tile) is tile
    assert_bitwise_equal(tile, full[2:5])
    assert buffer[3:].isnan().all()  # nothing written past the tile
    for wrong in (torch.empty(2, shape[1]), torch.empty(3, shape[1], dtype=torch.bfloat16)):
        with pytest.raises(ValueError, match="float32 tensor of"):
            quantized.dequantize(slice(2, 5), out=wrong)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_on_each_device_is_bitwise_equal_to_gguf(qtype: T, device: str) -> None:
    # The ops run where the tensors are: every tensor must move, and the device's float32 ops must give gguf's bits.
    shape = SHAPES[1]
    quantized = GroupQuantized.from_gguf(raw(qtype, shape), qtype, shape).to(device)
    tensors = [quantized.codes, quantized.scale] + ([] if quantized.offset is None else [quantized.offset])
    assert all(t.device.type == torch.device(device).type for t in tensors)
    full = oracle(qtype, shape)
    assert_bitwise_equal(quantized.dequantize().cpu(), full)
    assert_bitwise_equal(quantized.dequantize(torch.tensor([2, 0], device=device)).cpu(), full[[2, 0]])


# (bits, group, zero_code, offset): "+m" adds the stored minimum, "-dmin*m" adds the negated product.
REPRESENTATION = {"Q8_0": (8, 32, 128, None), "Q4_0": (4, 32, 8, None), "Q4_1": (4, 32, 0, "+m"),
                  "Q5_0": (5, 32, 16, None), "Q5_1": (5, 32, 0, "+m"), "Q4_K": (4, 32, 0, "-dmin*m"),
                  "Q5_K": (5, 32, 0, "-dmin*m"), "Q6_K": (6, 16, 32, None)}


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_representation_is_the_documented_one(qtype: T) -> None:
    shape = SHAPES[0]
    quantized = GroupQuantized.from_gguf(raw(qtype, shape), qtype, shape)
    bits, group, zero_code, offset = REPRESENTATION[qtype.name]
    assert (quantized.bits, quantized.group, quantized.zero_code) == (bits, group, zero_code)
    assert quantized.codes.dtype == torch.uint8 and quantized.scale.dtype == torch.float32
    assert quantized.scale.shape == (*shape[:-1], shape[-1] // group)
    codes = quantized.codes
    if bits == 4:  # two per byte: column 2j in the low nibble of byte j, column 2j + 1 in the high nibble
        assert codes.shape == (*shape[:-1], shape[-1] // 2)
        codes = torch.stack((codes & 0x0F, codes >> 4), dim=-1).reshape(shape)
    assert codes.shape == shape and int(codes.max()) < 2 ** bits
    expected = (codes.float() - zero_code) * quantized.scale.repeat_interleave(group, dim=-1)
    if offset is None:
        assert quantized.offset is None
    else:
        expected = expected + quantized.offset.repeat_interleave(group, dim=-1)
        # Row 1 is all negative, so its minimum is negative in both conventions: the offset is always added.
        assert bool((quantized.offset[1] < 0).all())
    assert_bitwise_equal(expected, oracle(qtype, shape))


# Bytes held per GGUF block of the type (codes + float32 scales + float32 offsets), next to the block's own bytes.
BYTES_PER_BLOCK = {"Q8_0": 32 + 4, "Q4_0": 16 + 4, "Q4_1": 16 + 4 + 4, "Q5_0": 32 + 4, "Q5_1": 32 + 4 + 4,
                   "Q4_K": 128 + 32 + 32, "Q5_K": 256 + 32 + 32, "Q6_K": 256 + 64}


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_nbytes_counts_codes_scales_and_offsets(qtype: T) -> None:
    shape = SHAPES[1]
    data = raw(qtype, shape)
    quantized = GroupQuantized.from_gguf(data, qtype, shape)
    tensors = [quantized.codes, quantized.scale] + ([] if quantized.offset is None else [quantized.offset])
    assert quantized.nbytes() == sum(t.numel() * t.element_size() for t in tensors)
    blocks = data.nbytes // GGML_QUANT_SIZES[qtype][1]
    assert quantized.nbytes() == blocks * BYTES_PER_BLOCK[qtype.name]
    if qtype == T.Q4_K:  # the type large models ship in stays within 1.5x of its file size
        assert quantized.nbytes() <= 1.5 * data.nbytes


def test_from_gguf_takes_gguf_readers_tensor_data(tmp_path) -> None:
    # GGUFReader gives each tensor's bytes as a read-only memory-mapped [..., N, bytes per row] array and its shape
    # in ggml order (reversed).
    path = tmp_path / "t.gguf"
    writer = GGUFWriter(path, "test")
    for qtype, shape in [(T.Q4_K, SHAPES[1]), (T.Q8_0, SHAPES[0])]:
        writer.add_tensor(qtype.name, raw(qtype, shape), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for tensor in GGUFReader(path).tensors:
        qtype, shape = T(tensor.tensor_type), tuple(int(d) for d in reversed(tensor.shape))
        assert_bitwise_equal(GroupQuantized.from_gguf(tensor.data, qtype, shape).dequantize(), oracle(qtype, shape))


@pytest.mark.parametrize("qtype", [T.F16, T.F32, T.Q2_K, T.Q3_K, T.IQ4_NL], ids=lambda t: t.name)
def test_unsupported_type_raises_value_error_naming_it(qtype: T) -> None:
    with pytest.raises(ValueError, match=rf"\b{qtype.name}\b"):
        GroupQuantized.from_gguf(np.zeros((4, 256), dtype=np.uint8), qtype, (4, 256))


def test_mismatched_bytes_or_shape_raise_value_error() -> None:
    data = raw(T.Q4_K, SHAPES[0])
    with pytest.raises(ValueError, match="needs uint8 block bytes of shape"):
        GroupQuantized.from_gguf(data, T.Q4_K, (3, 1024))  # the same bytes, another shape
    with pytest.raises(ValueError, match="needs uint8 block bytes of shape"):
        GroupQuantized.from_gguf(data.view(np.int8), T.Q4_K, SHAPES[0])
    with pytest.raises(ValueError, match="not a multiple of the block size 256"):
        GroupQuantized.from_gguf(data, T.Q4_K, (6, 500))
    quantized = GroupQuantized.from_gguf(data, T.Q4_K, SHAPES[0])
    with pytest.raises(ValueError, match="inconsistent Q4_K GroupQuantized"):
        GroupQuantized(codes=quantized.codes, bits=5, group=32, scale=quantized.scale, offset=quantized.offset,
                       zero_code=0, shape=SHAPES[0], qtype="Q4_K")  # 5-bit codes would be unpacked, one per byte


# ---- torch's CPU int4 layout (experts computed in bf16 on the CPU) --------------------------------------------------

needs_amx = pytest.mark.skipif(not torch.cpu._is_amx_tile_supported() or os.environ.get("DGEMMA_COMPILE") == "0",
                               reason="no AMX on this CPU, or compiling turned off")
needs_compiling = pytest.mark.skipif(os.environ.get("DGEMMA_COMPILE") == "0", reason="compiling turned off")
needs_avx512 = pytest.mark.skipif(not avx512_int4.available(),
                                  reason="no AVX-512 BF16 kernel here (no such CPU, AMX instead, or compiling off)")
needs_avx2 = pytest.mark.skipif(not dgemma.quantized.avx2_rows_available(),
                                reason="no AVX2 kernel here (AVX-512 instead, no AVX2, or compiling off)")
LAYOUTS = ["int4pack", pytest.param("amx", marks=needs_amx), pytest.param("avx512", marks=needs_avx512),
           pytest.param("avx2", marks=needs_avx2)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q4_K, T.Q8_0], ids=lambda t: t.name)
def test_cpu_int4_layout_multiplies_by_the_exact_values_to_bf16_rounding(qtype: T, layout: str) -> None:
    shape = (2, 32, 512)  # [E, N, K]: the kernels pack rows in multiples of 16 (int4pack) and 32 (amx)
    weight = GroupQuantized.from_gguf(raw(qtype, shape), qtype, shape).to(dtype=torch.bfloat16)
    kernel = CpuInt4.from_grouped(weight, layout)
    assert kernel.shape == shape and kernel.qtype == qtype.name and kernel.halves == (qtype == T.Q8_0)
    if qtype == T.Q8_0:  # two 4-bit halves: the same code bytes, two bf16 scales and zeros for one float32 scale
        assert kernel.nbytes() == weight.nbytes() + 4 * weight.scale.numel()
    else:
        assert kernel.nbytes() <= weight.nbytes()
    assert kernel.layout == layout
    exact = oracle(qtype, shape)
    for rows in (1, 5, 40):  # one row (an autoregressive token, padded to two on amx) and dynamic counts
        x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
        for expert in range(shape[0]):
            out = F.linear(x, kernel[expert])
            assert out.dtype == torch.bfloat16 and out.shape == (rows, 32)
            truth = x.float() @ exact[expert].T
            # Scales and zeros rounded to bf16 (relative 2^-9) and the output rounded to bf16: within 2^-9 of the
            # largest a row could sum to. (A zero off by one quantisation step is about 2^-4 of it.)
            bound = 2**-9 * x.float().abs().sum(-1, keepdim=True) * exact[expert].abs().amax(-1)
            assert ((out.float() - truth).abs() <= bound).all()
            if qtype == T.Q8_0:
                # Q8_0's values span 255 steps, so a zero off by one step is within that bound; without offsets, its
                # roundings are independent across a row's values and their sum grows as its square root: 2.2e-3
                # to 3e-3 of the product as a whole (a zero off by one step: 0.011 on these values).
                assert (out.float() - truth).norm() <= 2**-7 * truth.norm()


@needs_compiling
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q6_K, T.Q5_K], ids=lambda t: t.name)  # Q5_K: an offset to add
def test_large_tiles_of_byte_codes_take_one_compiled_pass_with_the_eager_bits(qtype: T, monkeypatch) -> None:
    shape = (2, 1024, 1024)  # an expert is a tile of 2^20 values: the compiled pass's threshold
    weight = GroupQuantized.from_gguf(raw(qtype, shape), qtype, shape).to(dtype=torch.bfloat16)
    calls = []
    kernel = dgemma.quantized._one_pass_kernel

    def counted(*key):
        compiled = kernel(*key)
        return lambda *args: calls.append(key) or compiled(*args)

    monkeypatch.setattr(dgemma.quantized, "_one_pass_kernel", counted)
    exact = oracle(qtype, shape)

    def bits(values: torch.Tensor) -> torch.Tensor:  # signed zeros told apart, as torch.equal does not
        return values.view(torch.int16)

    for index in (1, 0):
        assert torch.equal(bits(weight.dequantize(index, torch.bfloat16)), bits(exact[index].to(torch.bfloat16)))
    assert torch.equal(bits(weight.dequantize(None, torch.float16)), bits(exact.to(torch.float16)))
    assert calls == [(qtype.name, torch.bfloat16)] * 2 + [(qtype.name, torch.float16)]
    weight.dequantize(0, torch.float32)  # float32 and smaller tiles stay eager
    small = GroupQuantized.from_gguf(raw(qtype, (512, 1024)), qtype, (512, 1024)).to(dtype=torch.bfloat16)
    small.dequantize(None, torch.bfloat16)
    assert len(calls) == 3


@needs_compiling
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q4_K], ids=lambda t: t.name)  # zero code 8; offsets
def test_large_4_bit_tiles_run_in_nibble_plane_order_with_the_eager_bits_and_the_same_product(qtype: T,
                                                                                               monkeypatch) -> None:
    shape = (1024, 1024)  # 2^20 values: the compiled tiles' threshold
    weight = GroupQuantized.from_gguf(raw(qtype, shape), qtype, shape)
    exact = oracle(qtype, shape)
    order = dgemma.quantized._plane_order(1024, 32)
    assert torch.equal(order[:34], torch.tensor([*range(0, 32, 2), *range(1, 32, 2), 32, 34]))
    for dtype in (torch.bfloat16, torch.float16):
        typed = weight.to(dtype=dtype)
        for rows in (slice(None), slice(100, 612)):  # every number of rows: one graph
            planes = dgemma.quantized._plane_tile(typed, rows, dtype)
            # the same values as gguf's (signed zeros told apart), each group's columns even then odd
            assert torch.equal(planes.view(torch.int16), exact[rows][:, order].to(dtype).view(torch.int16))
        code = dgemma.quantized._nibble_planes_kernel(qtype.name, dtype, 1024)._torchdynamo_orig_callable.__code__
        assert len(torch._dynamo.eval_frame._debug_get_cache_entry_list(code)) == 1
        x = torch.randn(2, 40, 1024, generator=torch.Generator().manual_seed(0)).to(dtype)
        assert dgemma.quantized._takes_nibble_planes(x, typed)
        with monkeypatch.context() as patch:  # where products widen to float32, tiles are widening's instead
            patch.setattr(widening, "native_half_matmuls", lambda: True)
            out, tiles = F.linear(x, typed).float(), F.linear(x, exact.to(dtype)).float()
        # the same products summed in another order: within one rounding of the largest to the dtype
        assert (out - tiles).abs().max() <= 2**-7 * tiles.abs().amax()
    takes = dgemma.quantized._takes_nibble_planes
    row = torch.randn(3, 1024).to(torch.bfloat16)
    assert not takes(row.float(), weight)  # float32: the parity path keeps gguf's order and eager steps
    small = GroupQuantized.from_gguf(raw(qtype, (512, 1024)), qtype, (512, 1024)).to(dtype=torch.bfloat16)
    assert not takes(row, small)  # small matrices: not worth a compile
    q8 = GroupQuantized.quantize(torch.randn(1024, 1024), "Q8_0").to(dtype=torch.bfloat16)
    assert not takes(row, q8)  # one-byte codes have their own compiled pass


@needs_compiling
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q6_K, T.Q5_1], ids=lambda t: t.name)  # zero codes 128, 32, 0 + offsets
def test_a_few_rows_times_a_large_matrix_of_byte_codes_take_one_compiled_pass_as_exact_as_tiles(qtype: T,
                                                                                              monkeypatch) -> None:
    # Inductor's loop, which an AVX2 CPU without AVX-512 leaves for dgemma's kernel (tests/test_avx2_rows.py)
    monkeypatch.setattr(dgemma.quantized, "avx2_rows_available", lambda: False)
    kernel = dgemma.quantized._few_rows_kernel(qtype.name)
    code = kernel._torchdynamo_orig_callable.__code__
    assert code.co_name == f"few_rows_product_{qtype.name}"
    # 2^20 values, the smallest matrix the few-row kernel takes; then rows of two SUM_CHUNKs, summed a chunk at a time
    for graphs, shape in enumerate([(1024, 1024), (128, 2 * SUM_CHUNK)], start=1):
        weight = GroupQuantized.from_gguf(raw(qtype, shape), qtype, shape)
        exact = oracle(qtype, shape)
        for dtype in (torch.bfloat16, torch.float16) if qtype == T.Q8_0 else (torch.bfloat16,):
            typed = weight.to(dtype=dtype)
            for leading in [(1,), (1, 1)]:  # an AR token, as [1, K] and as [B, L, K]
                x = torch.randn(*leading, shape[1], generator=torch.Generator().manual_seed(len(leading))).to(dtype)
                assert dgemma.quantized._takes_few_rows_kernel(x, typed)
                out = F.linear(x, typed)
                assert out.dtype == dtype and out.shape == (*leading, shape[0])
                truth = x.float() @ exact.T
                tiles = F.linear(x, exact.to(dtype)).float()  # what the tiles compute: weights rounded to the dtype
                # float32 sums rounded once to the dtype (2^-8 of a value in bf16, 2^-11 in fp16), against float32
                # sums of the rounded weights: no further from the exact product than the tiles, to one rounding of
                # the largest.
                slack = 2**-8 * truth.abs().amax()
                assert (out.float() - truth).abs().max() <= (tiles - truth).abs().max() + slack
        # one graph for every shape with rows up to SUM_CHUNK long, and one for longer rows
        assert len(torch._dynamo.eval_frame._debug_get_cache_entry_list(code)) == graphs
    with torch.compiler.set_stance("force_eager"), pytest.raises(RuntimeError, match="ran eagerly"):
        F.linear(torch.randn(1, 1024).to(torch.bfloat16), weight.to(dtype=torch.bfloat16))


def test_the_few_row_kernel_takes_only_what_it_computes_faster_and_without_a_backward() -> None:
    takes = dgemma.quantized._takes_few_rows_kernel
    q8 = GroupQuantized.quantize(torch.randn(1024, 1024), "Q8_0").to(dtype=torch.bfloat16)
    row = torch.randn(1, 1024).to(torch.bfloat16)
    assert takes(row, q8) == (os.environ.get("DGEMMA_COMPILE") != "0")
    if not takes(row, q8):
        return
    # past FEW_ROWS the compiled loop's dequantisation, redone per row, costs more than tiles; dgemma's AVX2 kernel
    # dequantises nothing and takes up to AVX2_FEW_ROWS
    few = dgemma.quantized.AVX2_FEW_ROWS if dgemma.quantized.avx2_rows_available() else dgemma.quantized.FEW_ROWS
    assert takes(torch.randn(few, 1024).to(torch.bfloat16), q8)
    assert not takes(torch.randn(few + 1, 1024).to(torch.bfloat16), q8)
    assert not takes(row.float(), q8)  # float32: the exact dequantised tiles (the parity path)
    assert not takes(row.requires_grad_(), q8)  # a gradient to record: tiles, which have a backward
    assert not takes(row[:0], q8)
    small = GroupQuantized.quantize(torch.randn(512, 1024), "Q8_0").to(dtype=torch.bfloat16)
    # small matrices: not worth a compile, but taken by dgemma's AVX2 kernel where it stands for the compiled loop
    assert takes(torch.randn(1, 1024).to(torch.bfloat16), small) == dgemma.quantized.avx2_rows_available()
    q4 = GroupQuantized.quantize(torch.randn(1024, 1024), "Q4_0").to(dtype=torch.bfloat16)
    assert not takes(torch.randn(1, 1024).to(torch.bfloat16), q4)  # nibbles: measured slower than tiles


@pytest.mark.parametrize("fast", ["amx", "avx512", None])
def test_cpu_int4_layout_takes_the_fast_kernel_where_it_applies_and_otherwise_torchs(fast, monkeypatch) -> None:
    def q4(rows: int, dtype: torch.dtype = torch.bfloat16) -> GroupQuantized:
        return GroupQuantized.quantize(torch.randn(rows, 256), "Q4_0").to(dtype=dtype)

    layout = dgemma.quantized.cpu_int4_layout
    expert, linear = "decoder.layers.0.experts.down_proj", "decoder.layers.0.mlp.up_proj.weight"
    monkeypatch.setattr(dgemma.quantized, "fast_int4_layout", lambda: fast)
    # Without a fast kernel, rows in 32s take the AVX2 kernel's layout where it runs
    eager = dgemma.quantized.int4_layout_without_fast_kernel(64)
    assert eager == ("avx2" if dgemma.quantized.avx2_rows_available() else "int4pack")
    # Loaded for diffusion: the other matrices in torch's kernel keep their tiles for many rows (keeps_tiles)
    assert layout(expert, q4(64), "cpu", linear_only=False) == (fast or eager)
    assert layout(linear, q4(64), "cpu", linear_only=True) == (fast or eager)
    for name, linear_only in ((expert, False), (linear, True)):
        assert layout(name, q4(48), "cpu", linear_only=linear_only) == "int4pack"  # rows not in 32s
        assert layout(name, q4(40), "cpu", linear_only=linear_only) is None  # rows not in 16s
    # the embedding (also the head) is read by more than F.linear; fp32 is the parity path: tiles, exact
    assert layout("decoder.embed_tokens.weight", q4(64), "cpu", linear_only=False) is None
    assert layout(expert, q4(64, torch.float32), "cpu", linear_only=False) is None
    # Loaded for one row at a time (autoregressive decoding): experts in torch's kernel on AMX (whose kernel pads a
    # row to two), in the AVX-512 kernel where that is the fast one; the other matrices in the fast kernel (on AMX
    # with a copy for single rows), else in torch's kernel, never tiles.
    assert layout(expert, q4(64), "cpu", linear_only=False, one_row=True) == ("avx512" if fast == "avx512"
                                                                             else eager)
    assert layout(linear, q4(64), "cpu", linear_only=True, one_row=True) == (fast or eager)
    for name, linear_only in ((expert, False), (linear, True)):
        assert layout(name, q4(48), "cpu", linear_only=linear_only, one_row=True) == "int4pack"
        assert layout(name, q4(40), "cpu", linear_only=linear_only, one_row=True) is None  # rows not in 16s
    assert layout("decoder.embed_tokens.weight", q4(64), "cpu", linear_only=False, one_row=True) is None
    assert layout(expert, q4(64, torch.float32), "cpu", linear_only=False, one_row=True) is None

    # Q8_0: experts as two 4-bit halves in the fast kernel, or in torch's kernel when loaded for one row on AMX or
    # without a fast kernel (faster than the one-pass product over its bytes); in torch's kernel at an expert's 16
    # rows, and in a fast kernel at a canvas's 256, tiles are faster, so the other Q8_0 matrices and, without a fast
    # kernel, Q8_0 experts loaded for diffusion stay tiles. Loaded for one row on the AVX-512 kernel, the other Q8_0
    # matrices take it too (a token's row: faster than the one-row pass over the bytes).
    def q8(rows: int) -> GroupQuantized:
        return GroupQuantized.quantize(torch.randn(rows, 256), "Q8_0").to(dtype=torch.bfloat16)

    one_row_halves = "avx512" if fast == "avx512" else eager
    assert layout(expert, q8(64), "cpu", linear_only=False) == fast
    assert layout(expert, q8(64), "cpu", linear_only=False, one_row=True) == one_row_halves
    assert layout(expert, q8(48), "cpu", linear_only=False) is None  # rows not in 32s
    assert layout(expert, q8(48), "cpu", linear_only=False, one_row=True) == "int4pack"
    assert layout(linear, q8(64), "cpu", linear_only=True) is None
    assert layout(linear, q8(64), "cpu", linear_only=True, one_row=True) == ("avx512" if fast == "avx512" else None)
    assert layout(linear, q8(48), "cpu", linear_only=True, one_row=True) is None
    assert layout("decoder.embed_tokens.weight", q8(64), "cpu", linear_only=False, one_row=True) is None
    for one_row in (False, True):
        assert layout(expert, q8(40), "cpu", linear_only=False, one_row=one_row) is None


def test_the_fast_int4_kernel_is_amx_where_there_is_one_then_avx512(monkeypatch) -> None:
    for amx, avx512, fast in ((True, True, "amx"), (True, False, "amx"), (False, True, "avx512"),
                              (False, False, None)):
        monkeypatch.setattr(dgemma.quantized, "amx_int4_available", lambda: amx)
        monkeypatch.setattr(dgemma.quantized, "avx512_int4_available", lambda: avx512)
        assert dgemma.quantized.fast_int4_layout() == fast


def test_cpu_int4_layouts_refuse_what_they_cannot_hold() -> None:
    expert, linear = "decoder.layers.0.experts.down_proj", "decoder.layers.0.mlp.up_proj.weight"
    with pytest.raises(ValueError, match="4- or 8-bit codes in groups of 32, not Q6_K's 6-bit codes in groups of 16"):
        CpuInt4.from_grouped(GroupQuantized.quantize(torch.randn(32, 256), "Q6_K").to(dtype=torch.bfloat16), "amx")
    # The copy for single rows: the matrices on AMX other than experts (the experts, 93 % of a layer, keep one layout)
    assert dgemma.quantized.keeps_one_row_copy(linear, "amx")
    assert not dgemma.quantized.keeps_one_row_copy(expert, "amx")
    assert not dgemma.quantized.keeps_one_row_copy(linear, "int4pack")
    assert not dgemma.quantized.keeps_one_row_copy(linear, "avx512")  # as fast for one row as for many
    assert not dgemma.quantized.keeps_one_row_copy(linear, None)
    # Tiles for many rows: beside torch's layout, for the matrices other than experts loaded for diffusion
    keeps_tiles = dgemma.quantized.keeps_tiles
    assert keeps_tiles(linear, "int4pack", one_row=False) and keeps_tiles(linear, "avx2", one_row=False)
    assert not keeps_tiles(linear, "int4pack", one_row=True)  # loaded for one row at a time
    assert not keeps_tiles(expert, "int4pack", one_row=False)
    assert not keeps_tiles(linear, "amx", one_row=False) and not keeps_tiles(linear, None, one_row=False)
    assert not keeps_tiles(linear, "avx512", one_row=False)
    with pytest.raises(ValueError, match="layout must be one of 'amx', 'avx512', 'int4pack', 'avx2', not 'vnni'"):
        CpuInt4.from_grouped(GroupQuantized.quantize(torch.randn(32, 256), "Q4_0").to(dtype=torch.bfloat16), "vnni")


def test_amx_int4_layout_is_the_one_inductors_template_blocks_its_constant_weights_into() -> None:
    import torch._inductor.lowering  # noqa: F401  (imports the template module in dependency order)
    from torch._inductor.codegen.cpp_gemm_template import CppWoqInt4GemmTemplate

    for n, k in [(32, 64), (128, 256), (96, 512)]:
        codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(n), dtype=torch.int32)
        stock = CppWoqInt4GemmTemplate[32].block_weight(torch._convert_weight_to_int4pack_for_cpu(codes, 1), None, None)
        assert torch.equal(amx_int4.block_codes(codes), stock)


@needs_amx
def test_amx_int4_kernel_compiles_once_per_shape_for_any_rows_and_has_no_backward() -> None:
    assert amx_int4.available()  # its own check against torch's eager kernel passed
    with pytest.raises(ValueError, match="multiples of 32, got a weight of 48 x 256"):
        amx_int4.block_codes(torch.zeros(48, 256, dtype=torch.int32))
    weight = GroupQuantized.quantize(torch.randn(192, 128), "Q4_0").to(dtype=torch.bfloat16)
    kernel, eager = CpuInt4.from_grouped(weight, "amx"), CpuInt4.from_grouped(weight, "int4pack")
    assert F.linear(torch.randn(0, 128).to(torch.bfloat16), kernel).shape == (0, 192)
    for rows in (3, 17, 64, 2, 4, 1):  # every count of rows through one compiled graph, in and out of inference mode
        x = torch.randn(rows, 128).to(torch.bfloat16)
        expected = F.linear(x, eager).float()
        for got in (F.linear(x, kernel), torch.inference_mode()(F.linear)(x, kernel)):
            # the same codes, scales and zeros: the two kernels differ by their fp32 sums' order and one bf16 rounding
            assert ((got.float() - expected).abs() <= 2**-7 * expected.abs().amax()).all()
    compiled = amx_int4._kernels[192, 128]
    code = compiled._torchdynamo_orig_callable.__code__
    assert code.co_name == "amx_int4_matmul_192x128"  # its own code object: dynamo's recompile limit is its own
    assert len(torch._dynamo.eval_frame._debug_get_cache_entry_list(code)) <= 3  # grad modes and inference tensors
    # With gradients recorded: computed (a forward pass outside no_grad works), but no backward, as torch's int4 op
    x = torch.randn(3, 128).to(torch.bfloat16).requires_grad_()
    out = F.linear(x, kernel)
    assert torch.allclose(out.float(), F.linear(x.detach(), kernel).float())
    with pytest.raises(RuntimeError, match="no backward"):
        out.sum().backward()
    with torch.compiler.set_stance("force_eager"), pytest.raises(RuntimeError, match="ran eagerly on blocked codes"):
        F.linear(torch.randn(3, 128).to(torch.bfloat16), kernel)


@needs_amx
def test_a_copy_for_single_rows_gives_one_row_the_eager_kernels_product_and_more_rows_the_amx_kernels() -> None:
    shape = (2, 64, 256)  # two experts' worth, to slice
    weight = GroupQuantized.from_gguf(raw(T.Q4_K, shape), T.Q4_K, shape).to(dtype=torch.bfloat16)
    amx, eager = CpuInt4.from_grouped(weight, "amx"), CpuInt4.from_grouped(weight, "int4pack")
    both = CpuInt4.from_grouped(weight, "amx", one_row_copy=True)
    assert amx.one_row_codes is None and torch.equal(both.one_row_codes, eager.codes)
    assert both.nbytes() == amx.nbytes() + eager.codes.numel()
    for entry in range(shape[0]):
        for rows, same_as in ((1, eager), (5, amx)):
            x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
            # the same kernel on the same codes, scales and zeros: bitwise the same product
            assert torch.equal(F.linear(x, both[entry]), F.linear(x, same_as[entry]))
    with pytest.raises(ValueError, match="beside the amx layout only"):
        CpuInt4.from_grouped(weight, "int4pack", one_row_copy=True)


@pytest.mark.parametrize("layout", ["int4pack", pytest.param("avx2", marks=needs_avx2)])
def test_tiles_kept_beside_torchs_codes_take_more_than_one_row_and_one_row_takes_the_int4_kernel(layout: str) -> None:
    shape = (2, 64, 256)  # two entries' worth, to slice
    weight = GroupQuantized.from_gguf(raw(T.Q4_K, shape), T.Q4_K, shape).to(dtype=torch.bfloat16)
    eager = CpuInt4.from_grouped(weight, layout)
    both = CpuInt4.from_grouped(weight, layout, keep_tiles=True)
    assert eager.tiles is None and both.tiles is weight and torch.equal(both.codes, eager.codes)
    assert both.nbytes() == eager.nbytes() + weight.nbytes()
    for entry in range(shape[0]):
        for leading, same_as in (((1,), eager[entry]), ((1, 1), eager[entry]), ((5,), weight[entry]),
                                 ((2, 3), weight[entry])):
            x = torch.randn(*leading, 256, generator=torch.Generator().manual_seed(len(leading))).to(torch.bfloat16)
            # the same computation on the same codes: bitwise the same product
            assert torch.equal(F.linear(x, both[entry]), F.linear(x, same_as))
    with pytest.raises(ValueError, match="beside 4-bit codes in the int4pack or avx2 layout only"):
        CpuInt4.from_grouped(weight, "amx", keep_tiles=True)
    q8 = GroupQuantized.quantize(torch.randn(64, 256), "Q8_0").to(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="beside 4-bit codes in the int4pack or avx2 layout only"):
        CpuInt4.from_grouped(q8, "int4pack", keep_tiles=True)
    with pytest.raises(ValueError, match="keep no second copy"):
        both.grouped_linear(torch.randn(4, 256).to(torch.bfloat16), [2, 4])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q8_0], ids=lambda t: t.name)
def test_experts_in_a_cpu_int4_layout_multiply_their_groups_in_one_call_as_f_linear_does_each(qtype: T, layout: str,
                                                                                           monkeypatch) -> None:
    from dgemma.model import grouped_linear

    shape = (4, 64, 256)  # four experts
    weight = CpuInt4.from_grouped(GroupQuantized.from_gguf(raw(qtype, shape), qtype, shape).to(dtype=torch.bfloat16),
                                  layout)
    ends = [3, 3, 4, 21]  # 3 rows, none, one (padded to two on amx), 17
    rows = torch.randn(21, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    each = torch.cat([F.linear(rows[begin:end], weight[e]) for e, (begin, end) in enumerate(zip([0, *ends], ends))])
    grouped = weight.grouped_linear(rows, ends)
    assert torch.equal(grouped, each)  # the same kernel calls on the same rows
    # The network's grouped product takes it when no gradient is recorded, and F.linear per expert when one is
    # (whose kernels refuse a backward, as torch's int4 op does).
    calls = []
    original = CpuInt4.grouped_linear
    monkeypatch.setattr(CpuInt4, "grouped_linear", lambda self, *args: calls.append(1) or original(self, *args))
    assert torch.equal(grouped_linear(rows, weight, torch.tensor(ends)), each) and calls == [1]
    x = rows.clone().requires_grad_()
    assert torch.equal(grouped_linear(x, weight, torch.tensor(ends)).detach(), each) and calls == [1]
    with pytest.raises(TypeError, match="bfloat16, not torch.float32"):
        weight.grouped_linear(rows.float(), ends)
    with pytest.raises(RuntimeError, match="records no gradient"):
        original(weight, x, ends)
    if layout == "amx":  # a copy for single rows is for matrices other than experts, which F.linear reaches alone
        copied = CpuInt4.from_grouped(GroupQuantized.from_gguf(raw(qtype, shape), qtype, shape).to(
            dtype=torch.bfloat16), layout, one_row_copy=True)
        with pytest.raises(ValueError, match="keep no copy for single rows"):
            original(copied, rows, ends)


def test_cpu_int4_layout_refuses_what_it_cannot_compute() -> None:
    shape = (32, 512)
    kernel = CpuInt4.from_grouped(GroupQuantized.from_gguf(raw(T.Q4_K, shape), T.Q4_K, shape).to(dtype=torch.bfloat16),
                                  "int4pack")
    with pytest.raises(TypeError, match="bfloat16"):
        F.linear(torch.randn(2, 512), kernel)
    with pytest.raises(TypeError, match="embedding is not defined"):
        F.embedding(torch.tensor([0]), kernel)
