"""dgemma.avx2_byte_codes: a few rows times a matrix of one-byte codes on AVX2 CPUs without AVX-512 (built from
dgemma/kernels/avx2_byte_codes.cpp), which a token's products with 8-, 6- and 5-bit matrices take there."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T

import dgemma.quantized
from dgemma import avx2_byte_codes
from dgemma.quantized import GroupQuantized
from test_quantized import oracle, raw

# Where the kernel should run: AVX2 without AVX-512, compiling allowed, a C++ compiler.
EXPECTED = (torch.cpu._is_avx2_supported() and not torch.cpu._is_avx512_supported()
            and os.environ.get("DGEMMA_COMPILE") != "0" and shutil.which(os.environ.get("CXX", "c++")) is not None)
pytestmark = pytest.mark.skipif(not EXPECTED, reason="no AVX2 kernel expected here (AVX-512 instead, no AVX2, "
                                                     "compiling off, or no C++ compiler)")


def within_float32_sums(got: torch.Tensor, rows: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                        offset: torch.Tensor | None, zero_code: int) -> None:
    """got is the float64 product summed in float32: within K x 2^-24 of the sum of the magnitudes of its terms (the
    code's and the offset's parts separately, as the kernel sums them), doubled."""
    expected = avx2_byte_codes.exact_product(rows, codes, scale, offset, zero_code)
    terms = avx2_byte_codes.exact_product(rows.abs(), codes, scale.abs(), None, 0)
    terms = terms + avx2_byte_codes.exact_product(rows.abs(), torch.zeros_like(codes), scale.abs() * zero_code,
                                                  None if offset is None else offset.abs(), 0)
    assert ((got.double() - expected).abs() <= 2 * rows.shape[1] * 2**-24 * terms).all()


def test_the_kernel_is_there_where_expected():
    assert avx2_byte_codes.available()


@pytest.mark.parametrize("group, zero_code, with_offset", [(32, 128, False), (16, 32, False), (32, 0, True)],
                         ids=["Q8_0", "Q6_K", "Q5_1"])
def test_rows_times_codes_is_the_float64_product_summed_in_float32(group, zero_code, with_offset):
    generator = torch.Generator().manual_seed(group + zero_code)
    n, k = 70, 11 * group  # rows not a multiple of the threads' grain; groups not a multiple of anything
    codes = torch.randint(0, 256 if zero_code == 128 else 64, (n, k), generator=generator, dtype=torch.uint8)
    scale = torch.rand(n, k // group, generator=generator) * 10.0 ** torch.randint(-3, 2, (n, 1), generator=generator)
    offset = -torch.rand(n, k // group, generator=generator) if with_offset else None
    for count in (1, 2, 5):
        rows = torch.randn(count, k, generator=generator).to(torch.bfloat16).float()
        got = avx2_byte_codes.rows_times_codes(rows, codes, scale, offset, zero_code)
        assert got.shape == (count, n) and got.dtype == torch.float32
        within_float32_sums(got, rows, codes, scale, offset, zero_code)
        # the same rows one at a time: the same bits
        assert torch.equal(torch.cat([avx2_byte_codes.rows_times_codes(rows[i:i + 1], codes, scale, offset,
                                                                        zero_code) for i in range(count)]), got)


def test_the_same_bits_with_any_number_of_threads():
    generator = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 256, (333, 512), generator=generator, dtype=torch.uint8)
    scale = torch.rand(333, 16, generator=generator)
    rows = torch.randn(2, 512, generator=generator)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(avx2_byte_codes.rows_times_codes(rows, codes, scale, None, 128))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(result, results[0]) for result in results)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q6_K, T.Q5_1], ids=lambda t: t.name)
def test_a_tokens_row_times_a_byte_code_matrix_takes_the_kernel_as_exact_as_the_compiled_loop(qtype, monkeypatch):
    shape = (1024, 1024)  # the smallest matrix the few-row product takes
    weight = GroupQuantized.from_gguf(raw(qtype, shape), qtype, shape).to(dtype=torch.bfloat16)
    x = torch.randn(1, shape[1], generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    assert dgemma.quantized._takes_few_rows_kernel(x, weight)
    calls = []
    original = dgemma.quantized.avx2_rows_times_codes
    monkeypatch.setattr(dgemma.quantized, "avx2_rows_times_codes",
                        lambda *args: calls.append(args) or original(*args))
    out = F.linear(x, weight)
    assert len(calls) == 1 and out.dtype == torch.bfloat16 and out.shape == (1, shape[0])
    truth = x.float() @ oracle(qtype, shape).T
    # float32 sums rounded once to bf16: within 2^-8 of a value, plus float32's sums (far smaller) for slack
    assert ((out.float() - truth).abs() <= 2**-8 * truth.abs() + 2**-8 * 2**-8 * truth.abs().amax()).all()


def test_bad_inputs_are_refused_by_name():
    codes = torch.zeros(4, 64, dtype=torch.uint8)
    scale = torch.ones(4, 2)
    rows = torch.ones(1, 64)
    with pytest.raises(RuntimeError, match="rows must be a contiguous float32"):
        avx2_byte_codes.rows_times_codes(rows.to(torch.bfloat16), codes, scale, None, 128)
    with pytest.raises(RuntimeError, match="codes must be contiguous uint8"):
        avx2_byte_codes.rows_times_codes(rows, codes[:, :32], scale, None, 128)
    with pytest.raises(RuntimeError, match="scale must be contiguous float32"):
        avx2_byte_codes.rows_times_codes(rows, codes, scale[:3], None, 128)
    with pytest.raises(RuntimeError, match="groups of 16 or 32 values, got 64"):
        avx2_byte_codes.rows_times_codes(rows, codes, scale[:, :1].contiguous(), None, 128)
    with pytest.raises(RuntimeError, match="offset must be contiguous float32"):
        avx2_byte_codes.rows_times_codes(rows, codes, scale, torch.ones(4, 3), 128)
    with pytest.raises(RuntimeError):  # no derivative
        avx2_byte_codes.rows_times_codes(rows.requires_grad_(), codes, scale, None, 128).sum().backward()
