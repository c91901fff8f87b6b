"""dgemma.avx512_int4: the AVX-512 BF16 kernel for 4-bit matrices (built from dgemma/kernels/avx512_int4.cpp)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from dgemma import avx512_int4

# Where the kernel should run: AVX-512 BF16 without AMX, compiling allowed, a C++ compiler.
EXPECTED = (torch.cpu._is_avx512_bf16_supported() and not torch.cpu._is_amx_tile_supported()
            and os.environ.get("DGEMMA_COMPILE") != "0" and shutil.which(os.environ.get("CXX", "c++")) is not None)
pytestmark = pytest.mark.skipif(not EXPECTED, reason="no AVX-512 BF16 kernel expected here (no such CPU, AMX "
                                                     "instead, compiling off, or no C++ compiler)")


def weights(experts: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random codes [E, N, K] (0..15) and bf16 scales and zeros [E, K // 32, N, 2]."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (experts, n, k), generator=generator, dtype=torch.int32)
    scales_and_zeros = (torch.rand(experts, k // 32, n, 2, generator=generator) - 0.5).to(torch.bfloat16)
    return codes, scales_and_zeros


def values(codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The matrices [E, N, K] in float64: (code - 8) * scale + zero, as torch's int4 kernels define them."""
    experts, n, k = codes.shape
    scale, zero = (scales_and_zeros[..., i].double().transpose(1, 2).repeat_interleave(32, -1) for i in (0, 1))
    return (codes.double() - 8) * scale + zero


def packed(codes: torch.Tensor) -> torch.Tensor:
    return torch.stack([avx512_int4.pack(matrix) for matrix in codes])


def test_pack_puts_each_value_where_the_kernel_reads_it() -> None:
    codes = torch.randint(0, 16, (64, 48), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    words = avx512_int4.pack(codes).view(torch.int32).view(2, 6, 32).long() & 0xFFFFFFFF  # [blocks, runs, columns]
    for block, run, column, i in [(0, 0, 0, 0), (1, 5, 31, 3), (0, 2, 17, 1), (1, 3, 4, 2)]:
        word = int(words[block, run, column])
        n, k = 32 * block + column, 8 * run + 2 * i
        assert (word >> 4 * i) & 0xF == codes[n, k] and (word >> 16 + 4 * i) & 0xF == codes[n, k + 1]
    with pytest.raises(ValueError, match="rows in multiples of 32 and columns in multiples of 8, got a weight of 48"):
        avx512_int4.pack(codes[:48])


def test_pack_scales_puts_each_block_s_pairs_together_group_after_group() -> None:
    _, scales_and_zeros = weights(2, 96, 128)
    blocked = avx512_int4.pack_scales(scales_and_zeros)
    assert blocked.shape == (2, 3, 4, 32, 2) and blocked.is_contiguous()
    for expert, block, group, column in [(0, 0, 0, 0), (1, 2, 3, 31), (0, 1, 2, 5)]:
        assert torch.equal(blocked[expert, block, group, column], scales_and_zeros[expert, group, 32 * block + column])
    with pytest.raises(ValueError, match="rows in multiples of 32, got scales and zeros for 48"):
        avx512_int4.pack_scales(scales_and_zeros[:, :, :48])


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 19])  # every row count of a block; blocks of 8 and a tail
def test_products_are_the_exact_values_times_the_rows_to_bf16_rounding(rows: int) -> None:
    codes, scales_and_zeros = weights(1, 96, 256, seed=rows)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    out = avx512_int4.matmul_torch_scales(x, packed(codes)[0], scales_and_zeros[0])
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 96)
    truth = x.double() @ values(codes, scales_and_zeros)[0].T
    # fp32 sums (of exact products) rounded once to bf16: within 2^-8 of the largest a row could sum to.
    bound = 2**-8 * x.double().abs() @ values(codes, scales_and_zeros)[0].abs().T
    assert ((out.double() - truth).abs() <= bound).all()
    eager = torch._weight_int4pack_mm_for_cpu(x, torch._convert_weight_to_int4pack_for_cpu(codes[0], 1), 32,
                                              scales_and_zeros[0])
    assert ((out.double() - eager.double()).abs() <= 2 * bound).all()


def test_a_grouped_call_gives_each_expert_s_rows_what_one_matrix_at_a_time_gives() -> None:
    codes, scales_and_zeros = weights(5, 64, 128)
    ends = [3, 3, 12, 13, 30]  # an expert with no rows, one with one, one with more than a block of 8
    x = torch.randn(30, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    scales = avx512_int4.pack_scales(scales_and_zeros)
    out = avx512_int4.grouped(x, packed(codes), scales, ends)
    begin = 0
    for expert, end in enumerate(ends):
        alone = avx512_int4.matmul(x[begin:end], packed(codes)[expert], scales[expert])
        assert torch.equal(out[begin:end], alone)
        begin = end
    assert avx512_int4.grouped(x[:0], packed(codes), scales, [0] * 5).shape == (0, 64)


def test_the_bits_do_not_depend_on_the_number_of_threads() -> None:
    codes, scales_and_zeros = weights(3, 128, 512)
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(avx512_int4.grouped(x, packed(codes), avx512_int4.pack_scales(scales_and_zeros),
                                               [10, 25, 40]))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], other) for other in results[1:])


def test_bad_inputs_are_refused_with_their_shapes_and_backward_raises() -> None:
    codes, torch_scales = weights(2, 32, 64)
    scales_and_zeros = avx512_int4.pack_scales(torch_scales)
    x = torch.randn(4, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="codes must be contiguous uint8 .E, N, K / 2."):
        avx512_int4.grouped(x[:, :32].contiguous(), packed(codes), scales_and_zeros, [2, 4])
    with pytest.raises(RuntimeError, match="rows must be a contiguous bf16 CPU matrix"):
        avx512_int4.grouped(x.float(), packed(codes), scales_and_zeros, [2, 4])
    with pytest.raises(RuntimeError, match="scales_and_zeros must be contiguous bf16 .2, 1, 2, 32, 2., got .*32, 2."):
        avx512_int4.grouped(x, packed(codes), torch_scales, [2, 4])  # torch's layout, not the kernel's
    with pytest.raises(RuntimeError, match="ends must end at 4"):
        avx512_int4.grouped(x, packed(codes), scales_and_zeros, [2, 3])
    with pytest.raises(RuntimeError, match="ends must rise from 0 to 4"):
        avx512_int4.grouped(x, packed(codes), scales_and_zeros, [3, 2])
    with pytest.raises(RuntimeError, match="1 ends for 2 matrices"):
        avx512_int4.grouped(x, packed(codes), scales_and_zeros, [4])
    leaf = x.clone().requires_grad_()
    out = avx512_int4.grouped(leaf, packed(codes), scales_and_zeros, [2, 4])
    with pytest.raises(RuntimeError, match="not implemented"):
        out.float().sum().backward()


def test_the_kernel_is_used_on_every_cpu_with_avx512_bf16_and_no_amx() -> None:
    """Where it should run, `available()` says so: a kernel that failed its check against torch's would leave the
    models on torch's kernels, silently."""
    assert avx512_int4.available()


def test_the_check_against_torch_refuses_a_kernel_off_by_a_percent() -> None:
    from dgemma.compiling import agrees_with_torch_int4

    def skewed(rows, codes, scales_and_zeros):
        return avx512_int4.matmul_torch_scales(rows, codes, scales_and_zeros) * 1.01

    assert agrees_with_torch_int4(avx512_int4.pack, avx512_int4.matmul_torch_scales, n=64, k=256, counts=(1, 17))
    assert not agrees_with_torch_int4(avx512_int4.pack, skewed, n=64, k=256, counts=(1, 17))
