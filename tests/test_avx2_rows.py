"""dgemma.avx2_rows: a token's rows times bf16 / fp16 matrices, one-byte codes and torch's packed 4-bit codes on AVX2
CPUs without AVX-512 (built from dgemma/kernels/avx2_rows.cpp), which a token's products take there."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T

import dgemma.model
import dgemma.one_row
import dgemma.quantized
from dgemma import avx2_rows
from dgemma.quantized import CpuInt4, GroupQuantized
from conftest import text_values
from test_quantized import oracle, raw

# Where the kernels should run: AVX2 without AVX-512, compiling allowed, a C++ compiler.
EXPECTED = (torch.cpu._is_avx2_supported() and not torch.cpu._is_avx512_supported()
            and os.environ.get("DGEMMA_COMPILE") != "0" and shutil.which(os.environ.get("CXX", "c++")) is not None)
pytestmark = pytest.mark.skipif(not EXPECTED, reason="no AVX2 kernel expected here (AVX-512 instead, no AVX2, "
                                                     "compiling off, or no C++ compiler)")


def within_bound(got: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, coded: torch.Tensor,
                 group: int | None) -> None:
    """got is the float64 product within the kernels' stated error (`avx2_rows.error_bound`)."""
    error = (got.double() - rows.double() @ values.t()).abs()
    assert (error <= avx2_rows.error_bound(rows, values, coded, group)).all(), error.max()


def test_the_kernels_are_there_where_expected():
    assert avx2_rows.available()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_rows_are_the_float64_products_summed_in_float32(dtype):
    generator = seeded(1)
    weight = torch.randn(3, 70, 203, generator=generator).to(dtype)  # K not a multiple of 8: the tail too
    rows = torch.randn(4, 203, generator=generator).to(dtype).float()
    index = torch.tensor([2, 0, 2, 1])
    got = avx2_rows.half_rows(rows, weight, index)
    assert got.shape == (4, 70) and got.dtype == torch.float32
    for m in range(4):
        matrix = weight[index[m]].double()
        within_bound(got[m:m + 1], rows[m:m + 1], matrix, matrix, None)
        # a row alone: the same bits as in the batch
        assert torch.equal(avx2_rows.half_rows(rows[m:m + 1], weight, index[m:m + 1]), got[m:m + 1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_block_of_rows_times_one_matrix_is_the_float64_products_summed_in_float32(dtype):
    generator = seeded(12)
    weight = torch.randn(70, 603, generator=generator).to(dtype)  # N not a multiple of 4, K of 8, K past two chunks
    rows = torch.randn(7, 603, generator=generator).to(dtype).float()  # two blocks of three rows and one alone
    got = avx2_rows.half_block(rows, weight)
    assert got.shape == (7, 70) and got.dtype == torch.float32
    within_bound(got, rows, weight.double(), weight.double(), None)
    for m in range(7):  # a row alone, or in another block: the same bits
        assert torch.equal(avx2_rows.half_block(rows[m:m + 1], weight), got[m:m + 1])
    assert torch.equal(avx2_rows.half_block(rows[2:6], weight), got[2:6])
    half = rows.to(dtype)
    rounded = avx2_rows.half_block(half, weight)  # rows of the dtype in: the sums rounded once to it
    assert rounded.dtype == dtype and torch.equal(rounded, avx2_rows.half_block(half.float(), weight).to(dtype))


def test_an_experts_few_rows_in_a_step_take_the_block_kernel(monkeypatch):
    rows = torch.randn(40, 256, generator=seeded(13)).to(torch.bfloat16)
    weight = torch.randn(3, 96, 256, generator=seeded(14)).to(torch.bfloat16)
    ends = torch.tensor([5, 5, 40])  # 5 rows, none, 35 rows: past BLOCK_ROWS, widened instead
    calls = []
    original = dgemma.one_row.avx2_half_block
    monkeypatch.setattr(dgemma.one_row, "avx2_half_block", lambda *args: calls.append(args) or original(*args))
    out = dgemma.model.grouped_linear(rows, weight, ends, per_expert=True)
    assert [call[0].shape[0] for call in calls] == [5]
    truth = torch.cat([rows[:5].double() @ weight[0].double().t(), rows[5:].double() @ weight[2].double().t()])
    assert out.dtype == torch.bfloat16 and ((out.double() - truth).abs() <= 2**-8 * truth.abs() + 1e-5).all()
    assert not dgemma.one_row.takes_rows_block(rows[:5].float(), weight[0].float())  # float32: torch's matmul
    assert not dgemma.one_row.takes_rows_block(rows[:5], weight[0].half())
    assert not dgemma.one_row.takes_rows_block(rows[:5].requires_grad_(), weight[0])


@pytest.mark.parametrize("group, zero_code, with_offset", [(32, 128, False), (16, 32, False), (32, 0, True)],
                         ids=["Q8_0", "Q6_K", "Q5_1"])
def test_byte_codes_rows_are_the_float64_products_within_the_stated_bound(group, zero_code, with_offset):
    generator = seeded(group + zero_code)
    n, k = 70, 11 * group  # rows not a multiple of the threads' grain; groups not a multiple of anything
    codes = torch.randint(0, 256 if zero_code == 128 else 64, (n, k), generator=generator, dtype=torch.uint8)
    scale = torch.rand(n, k // group, generator=generator) * 10.0 ** torch.randint(-3, 2, (n, 1), generator=generator)
    offset = -torch.rand(n, k // group, generator=generator) if with_offset else None
    for count in (1, 2, 5):
        # values spread over many magnitudes, so that some lie far below their group's largest
        rows = (torch.randn(count, k, generator=generator) * 4.0 ** torch.randint(-6, 3, (count, k),
                                                                                  generator=generator))
        rows = rows.to(torch.bfloat16).float()
        got = avx2_rows.byte_codes_rows(rows, codes, scale, offset, zero_code)
        assert got.shape == (count, n) and got.dtype == torch.float32
        within_bound(got, rows, *avx2_rows.byte_code_values(codes, scale, offset, zero_code), group)
        # the same rows one at a time: the same bits
        assert torch.equal(torch.cat([avx2_rows.byte_codes_rows(rows[i:i + 1], codes, scale, offset, zero_code)
                                      for i in range(count)]), got)


@pytest.mark.parametrize("group, zero_code", [(32, 128), (16, 32), (32, 255)], ids=["Q8_0", "Q6_K", "largest"])
def test_codes_at_their_zero_code_give_exactly_the_offsets_part(group, zero_code):
    """The codes' sums are taken with the zero code left in and its part (zero x the row's integer sum) subtracted
    after, in int32: codes at the zero code, whose sums with it are the largest there are, must still give 0 exactly
    (and with offsets exactly the offsets' float32 part), over whole blocks of eight groups and the last few."""
    generator = seeded(group + zero_code + 1)
    n, k = 37, 19 * group  # two blocks of eight groups and three more
    codes = torch.full((n, k), zero_code, dtype=torch.uint8)
    scale = torch.rand(n, k // group, generator=generator) + 1
    rows = torch.full((2, k), -1.0)
    rows[1] = torch.randn(k, generator=generator)
    assert torch.equal(avx2_rows.byte_codes_rows(rows, codes, scale, None, zero_code), torch.zeros(2, n))
    offset = torch.ones(n, k // group)
    sums = rows.view(2, -1, group).sum(-1)  # the kernel's float32 group sums, in the same order
    got = avx2_rows.byte_codes_rows(rows, codes, scale, offset, zero_code)
    bound = k * 2**-23 * rows.abs().sum(-1, keepdim=True)  # float32 sums of the groups' float32 sums
    assert ((got.double() - sums.double().sum(-1, keepdim=True)).abs() <= bound).all()


def test_sixteen_bit_rows_are_exact_within_2_to_the_7_of_their_groups_largest():
    """A bf16 row whose every group spans less than 2^7 in magnitude: the 16-bit row is the row itself, so the products
    are the float64 ones to float32's sums alone."""
    generator = seeded(5)
    codes = torch.randint(0, 256, (40, 256), generator=generator, dtype=torch.uint8)
    scale = torch.rand(40, 8, generator=generator) + 0.5
    signs = torch.randint(0, 2, (1, 256), generator=generator) * 2 - 1
    magnitudes = (1 + torch.rand(1, 256, generator=generator)) * 2.0 ** torch.randint(-7, 0, (1, 256),
                                                                                        generator=generator)
    rows = (signs * magnitudes).to(torch.bfloat16).float()  # 2^-7 .. 1, full bf16 mantissas
    values, _ = avx2_rows.byte_code_values(codes, scale, None, 128)
    got = avx2_rows.byte_codes_rows(rows, codes, scale, None, 128)
    within_bound(got, rows, values, values, None)  # no allowance for the row's rounding


def packed_int4(generator: torch.Generator, experts: int, n: int, k: int) -> tuple[torch.Tensor, ...]:
    codes = torch.randint(0, 16, (experts, n, k), generator=generator, dtype=torch.int32)
    pairs = (torch.rand(experts, k // 32, n, 2, generator=generator) - 0.5).to(torch.bfloat16)
    packed = torch.stack([avx2_rows.pack(matrix) for matrix in codes])
    return codes, pairs, packed, avx2_rows.block_pairs(pairs)  # pairs in torch's layout and as the kernel takes them


def test_the_avx2_int4_layout_puts_each_code_where_the_kernel_reads_it():
    """`pack`'s bytes, read back as the kernel's comment describes them: blocks of 32 columns, 32 bytes a pair of
    depths (k, k + 1), 16-bit lane 2i + s holding depth k + s of columns i, 8 + i, 16 + i, 24 + i, lowest nibble
    first."""
    codes = torch.randint(0, 16, (64, 6), generator=seeded(13), dtype=torch.int32)
    lanes = avx2_rows.pack(codes).view(2, 3, 32).to(torch.int32)  # [block, pair of depths, byte]
    lanes = lanes[..., 0::2] | lanes[..., 1::2] << 8  # [block, pair, lane]: little-endian 16-bit words
    for block in range(2):
        for pair in range(3):
            for lane in range(16):
                i, s = divmod(lane, 2)
                for nibble in range(4):
                    column, depth = 32 * block + 8 * nibble + i, 2 * pair + s
                    assert (lanes[block, pair, lane] >> 4 * nibble) & 0xF == codes[column, depth]
    with pytest.raises(ValueError, match="rows in multiples of 32 and an even number of columns, got a weight of 48"):
        avx2_rows.pack(codes[:48])


def test_int4_rows_are_the_float64_products_of_their_codes_within_the_stated_bound_as_torchs_kernel_gives():
    generator = seeded(6)
    codes, pairs, packed, blocked = packed_int4(generator, 3, 96, 7 * 32)
    rows = torch.randn(5, 7 * 32, generator=generator).to(torch.bfloat16).float()
    index = torch.tensor([1, 1, 0, 2, 1])
    got = avx2_rows.int4_rows(rows, packed, blocked, index)
    assert got.shape == (5, 96) and got.dtype == torch.float32
    for m in range(5):
        within_bound(got[m:m + 1], rows[m:m + 1], *avx2_rows.int4_values(codes[index[m]], pairs[index[m]]), 32)
    # torch's own kernel on the same codes (in its layout), to bf16 rounding of its output
    for m in range(5):
        torchs = torch._convert_weight_to_int4pack_for_cpu(codes[index[m]], 1)
        eager = torch._weight_int4pack_mm_for_cpu(rows[m:m + 1].bfloat16(), torchs, 32, pairs[index[m]])
        assert ((got[m:m + 1] - eager.float()).abs() <= 2**-7 * eager.float().abs() + 1e-3).all()


def test_int4_rows_reading_one_matrix_two_at_a_time_give_each_rows_own_bits():
    """Consecutive rows of one matrix share the unpacking of its codes, two at a time (a step's rows of an expert):
    every row's result is the one it gets alone, bit for bit, in runs of one, two and three rows."""
    generator = seeded(12)
    codes, pairs, packed, blocked = packed_int4(generator, 3, 64, 5 * 32)
    rows = torch.randn(7, 5 * 32, generator=generator).to(torch.bfloat16).float()
    index = torch.tensor([2, 2, 2, 0, 1, 1, 2])
    together = avx2_rows.int4_rows(rows, packed, blocked, index)
    alone = torch.cat([avx2_rows.int4_rows(rows[m:m + 1], packed, blocked, index[m:m + 1]) for m in range(7)])
    assert torch.equal(together, alone)
    for m in range(7):
        within_bound(together[m:m + 1], rows[m:m + 1], *avx2_rows.int4_values(codes[index[m]], pairs[index[m]]), 32)


def test_the_same_bits_with_any_number_of_threads():
    generator = seeded(3)
    codes = torch.randint(0, 256, (333, 512), generator=generator, dtype=torch.uint8)
    scale = torch.rand(333, 16, generator=generator)
    _, _, packed, pairs = packed_int4(generator, 2, 320, 512)
    weight = torch.randn(2, 333, 512, generator=generator).to(torch.bfloat16)
    rows = torch.randn(2, 512, generator=generator)
    index = torch.tensor([1, 0])
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append((avx2_rows.byte_codes_rows(rows, codes, scale, None, 128),
                            avx2_rows.int4_rows(rows, packed, pairs, index), avx2_rows.half_rows(rows, weight, index),
                            avx2_rows.half_block(rows, weight[0]),
                            avx2_rows.int4_rows(rows, packed, pairs, torch.tensor([1, 1]))))  # a pair of rows
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for result in results for a, b in zip(result, results[0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_rows_give_their_float32_rows_sums_rounded_once(dtype):
    """Rows in bf16 or fp16 in, the rows' dtype out: the float32 rows' sums rounded once, bit for bit, by every op; the
    4-bit op the same whether its rows read distinct matrices (streamed past the caches) or share one."""
    generator = seeded(11)
    rows = torch.randn(3, 512, generator=generator).to(dtype)
    codes = torch.randint(0, 256, (96, 512), generator=generator, dtype=torch.uint8)
    scale = torch.rand(96, 16, generator=generator) / 64
    _, _, packed, pairs = packed_int4(generator, 3, 96, 512)
    weight = torch.randn(3, 96, 512, generator=generator).to(torch.bfloat16)
    for index in (torch.tensor([2, 0, 1]), torch.tensor([1, 1, 0])):
        for op, arguments in ((avx2_rows.byte_codes_rows, (codes, scale, None, 128)),
                              (avx2_rows.int4_rows, (packed, pairs, index)), (avx2_rows.half_rows, (weight, index))):
            got = op(rows, *arguments)
            assert got.dtype == dtype and torch.equal(got, op(rows.float(), *arguments).to(dtype))


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q6_K, T.Q5_1], ids=lambda t: t.name)
def test_a_tokens_row_times_a_byte_code_matrix_takes_the_kernel(qtype, monkeypatch):
    shape = (1024, 1024)  # the smallest matrix the few-row product takes
    weight = GroupQuantized.from_gguf(raw(qtype, shape), qtype, shape).to(dtype=torch.bfloat16)
    x = torch.randn(1, shape[1], generator=seeded(4)).to(torch.bfloat16)
    assert dgemma.quantized._takes_few_rows_kernel(x, weight)
    calls = []
    original = dgemma.quantized.avx2_byte_codes_rows
    monkeypatch.setattr(dgemma.quantized, "avx2_byte_codes_rows", lambda *args: calls.append(args) or original(*args))
    out = F.linear(x, weight)
    assert len(calls) == 1 and out.dtype == torch.bfloat16 and out.shape == (1, shape[0])
    truth = x.float() @ oracle(qtype, shape).T
    # rounded once to bf16: within 2^-8 of a value, plus the kernel's own bound (far smaller) as slack
    assert ((out.float() - truth).abs() <= 2**-8 * truth.abs() + 2**-8 * 2**-8 * truth.abs().amax()).all()


def test_an_experts_few_rows_in_a_step_take_the_byte_code_kernel_and_more_take_tiles(monkeypatch):
    # Q8_0 experts as a denoising step multiplies them (dgemma.model.grouped_linear: one product an expert)
    shape = (3, 96, 256)
    weight = GroupQuantized.from_gguf(raw(T.Q8_0, shape), T.Q8_0, shape).to(dtype=torch.bfloat16)
    few = dgemma.quantized.AVX2_FEW_ROWS
    ends = torch.tensor([5, 5 + few + 1, 5 + 2 * few + 1])  # 5 rows, one past AVX2_FEW_ROWS, AVX2_FEW_ROWS
    rows = torch.randn(int(ends[-1]), shape[2], generator=seeded(15)).to(torch.bfloat16)
    calls = []
    original = dgemma.quantized.avx2_byte_codes_rows
    monkeypatch.setattr(dgemma.quantized, "avx2_byte_codes_rows", lambda *args: calls.append(args) or original(*args))
    out = dgemma.model.grouped_linear(rows, weight, ends, per_expert=True)
    assert [call[0].shape[0] for call in calls] == [5, few]
    values = oracle(T.Q8_0, shape).double()
    starts = [0, *ends[:-1].tolist()]
    truth = torch.cat([rows[a:b].double() @ values[e].t() for e, (a, b) in enumerate(zip(starts, ends.tolist()))])
    # the kernel's float32 sums and the tiles' (widened to float32 here), each rounded once to bf16: within 2^-8 of
    # a value, plus the kernel's own bound (far smaller) as slack
    error = (out.double() - truth).abs()
    assert out.dtype == torch.bfloat16 and (error <= 2**-8 * truth.abs() + 2**-8 * 2**-8 * truth.abs().amax()).all()
    # each row's product is its own: the same bits as the row alone in the kernel
    alone = F.linear(rows[:1], weight[0])
    assert torch.equal(out[:1], alone)


@pytest.mark.parametrize("rows", [1, 3])
def test_a_4bit_matrix_in_the_avx2_layout_and_its_experts_take_the_kernel(rows, monkeypatch):
    """F.linear on a matrix and grouped_linear on experts in the avx2 layout (the kernel's codes, the pairs in
    blocks): dgemma's kernel, once a call, with what torch's eager kernel gives on the same codes to bf16 rounding."""
    experts = GroupQuantized.from_gguf(raw(T.Q4_K, (4, 64, 256)), T.Q4_K, (4, 64, 256)).to(dtype=torch.bfloat16)
    layout_of = dgemma.quantized.int4_layout_without_fast_kernel
    assert layout_of(64) == "avx2" and layout_of(48) == "int4pack"
    weight, torchs = CpuInt4.from_grouped(experts, "avx2"), CpuInt4.from_grouped(experts, "int4pack")
    assert weight.takes_avx2_rows and not torchs.takes_avx2_rows
    assert torch.equal(weight.scales_and_zeros, avx2_rows.block_pairs(torchs.scales_and_zeros))
    calls = []
    original = dgemma.quantized.avx2_int4_rows
    monkeypatch.setattr(dgemma.quantized, "avx2_int4_rows", lambda *args: calls.append(args) or original(*args))
    x = torch.randn(2 * rows, 256, generator=seeded(7)).to(torch.bfloat16)
    single = F.linear(x[:rows], weight[2])
    grouped = weight.grouped_linear(x, [0, rows, rows, 2 * rows])  # expert 1 and expert 3, rows each
    assert len(calls) == 2 and single.dtype == grouped.dtype == torch.bfloat16
    for out, pick, matrix in ((single, x[:rows], 2), (grouped[:rows], x[:rows], 1), (grouped[rows:], x[rows:], 3)):
        eager = torch._weight_int4pack_mm_for_cpu(pick, torchs.codes[matrix], 32, torchs.scales_and_zeros[matrix])
        assert ((out.float() - eager.float()).abs() <= 2**-7 * eager.float().abs().amax()).all()


def test_a_tokens_4bit_experts_are_read_by_index_with_the_bits_of_the_grouped_path(monkeypatch):
    """One token's experts in the avx2 int4 layout skip the sort into groups by expert: gate/up and down in one kernel
    call each, by the token's expert indices; each row's result is independent of the others, so the same bits."""
    values, _ = text_values("moe")
    values.update(hidden_size=64, moe_intermediate_size=32, num_experts=6)  # rows of a multiple of 32 for int4
    experts = dgemma.model.Experts(dgemma.ModelConfig.from_dict({"model_type": "diffusion_gemma",
                                                                   "text_config": values}))
    generator = seeded(10)
    for name in ("gate_up_proj", "down_proj"):
        stack = torch.randn(getattr(experts, name).shape, generator=generator)
        grouped = GroupQuantized.quantize(stack, "Q4_0").to(dtype=torch.bfloat16)
        dgemma.model.attach(experts, name, CpuInt4.from_grouped(grouped, "avx2"))
    assert experts.gate_up_proj.reads_by_index and experts.down_proj.reads_by_index
    x = torch.randn(1, 64, generator=generator).to(torch.bfloat16)
    index, weights = torch.tensor([[4, 1]]), torch.tensor([[0.7, 0.3]])
    calls = []
    original = CpuInt4.grouped_linear
    monkeypatch.setattr(CpuInt4, "grouped_linear", lambda self, *args: calls.append(args) or original(self, *args))
    by_index = experts(x, index, weights, exact=False)
    assert not calls
    monkeypatch.setattr(dgemma.model.Experts, "_read_by_index", lambda self, x, top_k: False)
    grouped = experts(x, index, weights, exact=False)
    assert len(calls) == 2 and torch.equal(by_index, grouped)


def test_a_tokens_row_times_a_large_bf16_matrix_takes_the_kernel(monkeypatch):
    weight = torch.randn(1024, 4096, generator=seeded(8)).to(torch.bfloat16)  # dgemma.one_row's smallest
    x = torch.randn(1, 4096, generator=seeded(9)).to(torch.bfloat16)
    assert dgemma.one_row.takes_row(x, weight)
    calls = []
    original = dgemma.one_row.avx2_half_rows
    monkeypatch.setattr(dgemma.one_row, "avx2_half_rows", lambda *args: calls.append(args) or original(*args))
    out = dgemma.one_row.row_product(x, weight)
    assert len(calls) == 1 and out.dtype == torch.bfloat16 and out.shape == (1, 1024)
    truth = x.double() @ weight.double().t()
    assert ((out.double() - truth).abs() <= 2**-8 * truth.abs() + 1e-4 * truth.abs().amax()).all()


def test_bad_inputs_are_refused_by_name():
    codes = torch.zeros(4, 64, dtype=torch.uint8)
    scale = torch.ones(4, 2)
    rows = torch.ones(1, 64)
    with pytest.raises(RuntimeError, match="rows must be a contiguous float32, bf16 or fp16 CPU matrix"):
        avx2_rows.byte_codes_rows(rows.double(), codes, scale, None, 128)
    with pytest.raises(RuntimeError, match="codes must be contiguous uint8"):
        avx2_rows.byte_codes_rows(rows, codes[:, :32], scale, None, 128)
    with pytest.raises(RuntimeError, match="scale must be contiguous float32"):
        avx2_rows.byte_codes_rows(rows, codes, scale[:3], None, 128)
    with pytest.raises(RuntimeError, match="groups of 16 or 32 values, got 64"):
        avx2_rows.byte_codes_rows(rows, codes, scale[:, :1].contiguous(), None, 128)
    with pytest.raises(RuntimeError, match="offset must be contiguous float32"):
        avx2_rows.byte_codes_rows(rows, codes, scale, torch.ones(4, 3), 128)
    with pytest.raises(RuntimeError, match="zero_code must be a byte"):
        avx2_rows.byte_codes_rows(rows, codes, scale, None, 256)
    with pytest.raises(RuntimeError):  # no derivative
        avx2_rows.byte_codes_rows(rows.requires_grad_(), codes, scale, None, 128).sum().backward()
    rows = torch.ones(1, 64)
    weight = torch.zeros(2, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="weight must be a contiguous bf16 or fp16 CPU stack"):
        avx2_rows.half_rows(rows, weight.float(), torch.zeros(1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="index 2 out of range for 2 matrices"):
        avx2_rows.half_rows(rows, weight, torch.tensor([2]))
    with pytest.raises(RuntimeError, match="index must be a contiguous int64"):
        avx2_rows.half_rows(rows, weight, torch.zeros(2, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"weight must be a contiguous bf16 or fp16 CPU matrix \[N, K\] with K = 64"):
        avx2_rows.half_block(rows, weight)
    with pytest.raises(RuntimeError, match="with K = 64, got BFloat16 \\[8, 32\\]"):
        avx2_rows.half_block(rows, weight[0, :, :32].contiguous())
    with pytest.raises(RuntimeError):  # no derivative
        avx2_rows.half_block(torch.ones(1, 64).requires_grad_(), weight[0]).sum().backward()
    packed = torch.zeros(2, 32, 32, dtype=torch.uint8)
    pairs = torch.zeros(2, 1, 2, 32, 2, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="N a multiple of 32"):
        avx2_rows.int4_rows(rows, packed[:, :16].contiguous(), pairs, torch.zeros(1, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"scales_and_zeros must be contiguous bf16 \[2, 1, 2, 32, 2\]"):
        avx2_rows.int4_rows(rows, packed, pairs.float(), torch.zeros(1, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"got BFloat16 \[2, 2, 32, 2\]"):  # torch's layout, not blocked
        avx2_rows.int4_rows(rows, packed, pairs[:, 0].contiguous(), torch.zeros(1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="index -1 out of range"):
        avx2_rows.int4_rows(rows, packed, pairs, torch.tensor([-1]))
    with pytest.raises(RuntimeError):  # no derivative
        avx2_rows.int4_rows(rows.requires_grad_(), packed, pairs, torch.zeros(1, dtype=torch.long)).sum().backward()
