"""dgemma.one_query_attention: a token's attention in dgemma's kernel (dgemma/kernels/one_query_attention.cpp), built
for AVX-512 BF16 or for AVX2."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from dgemma import one_query_attention
from dgemma.model import attend, attend_one_query

# Where the kernel should run: AVX-512 BF16, or AVX2 without AVX-512; compiling allowed, a C++ compiler.
EXPECTED = (one_query_attention.build() is not None and os.environ.get("DGEMMA_COMPILE") != "0"
            and shutil.which(os.environ.get("CXX", "c++")) is not None)
pytestmark = pytest.mark.skipif(not EXPECTED, reason="no attention kernel expected here (neither AVX-512 BF16 nor "
                                                     "AVX2 alone, compiling off, or no C++ compiler)")


def case(batch: int, heads: int, kv_heads: int, keys: int, dim: int, seed: int = 0, capacity: int = 0):
    """bf16 q [B, H, 1, D] and keys and values [B, H_kv, S, D], the latter views of a cache `capacity` long (0: S),
    and a mask [B, 1, 1, S] that hides about a third of the keys."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, dim, generator=generator).to(torch.bfloat16)
    cache = [torch.randn(batch, kv_heads, capacity or keys, dim, generator=generator).to(torch.bfloat16)
             for _ in range(2)]
    mask = torch.rand(batch, 1, 1, keys, generator=generator) > 0.3
    mask[..., 0] = True
    return q, cache[0][:, :, :keys], cache[1][:, :, :keys], mask


def within_bf16_rounding(out: torch.Tensor, truth: torch.Tensor) -> bool:
    """float32 arithmetic rounded once to bf16: within a bf16 unit of the float64 result (doubled), plus 1e-5 for
    outputs near zero (standard-normal queries and keys of 256 give scores in the tens, whose float32 sums carry
    about 1e-6 into them: the eager float32 formula misses a 1e-6 slack by 2e-6 on these cases too)."""
    return bool(((out.double() - truth).abs() <= 2**-8 * truth.abs() + 1e-5).all())


@pytest.mark.parametrize("heads, kv_heads, keys, dim", [(8, 8, 37, 64), (16, 8, 300, 256), (16, 2, 600, 512),
                                                        (4, 1, 256, 32), (16, 1, 1, 16), (6, 2, 259, 48),
                                                        (10, 2, 70, 80)])
def test_the_kernel_is_the_float64_attention_rounded_once(heads: int, kv_heads: int, keys: int, dim: int) -> None:
    """Grouped query heads (1 to 16 a key head: tiles of 4, 3, 2 and 1 heads), several chunks of 256 keys and a
    partial one, key counts that leave some over after the tiles' groups of keys, head sizes that leave vectors over
    after the tiles' groups of vectors, keys read as views of a longer cache."""
    q, k, v, mask = case(2, heads, kv_heads, keys, dim, capacity=keys + 40)
    for m in (mask, None):
        out = one_query_attention.one_query(q, k, v, m)
        assert out.dtype == torch.bfloat16 and out.shape == q.shape
        truth = one_query_attention._exact_attention(q, k, v, torch.ones_like(mask) if m is None else m)
        assert within_bf16_rounding(out, truth)


def test_a_token_s_attention_takes_the_kernel_in_bf16_and_stays_eager_in_float32() -> None:
    q, k, v, mask = case(1, 16, 2, 300, 128)
    assert torch.equal(attend_one_query(q, k, v, mask), one_query_attention.one_query(q, k, v, mask))
    assert torch.equal(attend(q, k, v, mask, exact=False), one_query_attention.one_query(q, k, v, mask))
    assert not one_query_attention.takes(q.float(), k.float(), v.float())
    assert not one_query_attention.takes(q[..., :24], k[..., :24], v[..., :24])  # rows not a multiple of 16


def test_the_bits_do_not_depend_on_the_number_of_threads() -> None:
    q, k, v, mask = case(2, 16, 2, 1000, 64)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(one_query_attention.one_query(q, k, v, mask))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], other) for other in results[1:])


def test_masked_chunks_are_left_out_and_a_query_that_sees_no_key_gets_zeros() -> None:
    q, k, v, mask = case(2, 4, 2, 600, 32)
    mask[0, ..., :512] = False  # the first row's first two chunks entirely hidden
    mask[1] = False  # the second row sees nothing
    out = one_query_attention.one_query(q, k, v, mask)
    truth = one_query_attention._exact_attention(q[:1], k[:1], v[:1], mask[:1])
    assert within_bf16_rounding(out[:1], truth)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    shared = mask[:1]  # one mask for both rows, broadcast
    assert torch.equal(one_query_attention.one_query(q, k, v, shared),
                       one_query_attention.one_query(q, k, v, shared.expand(2, -1, -1, -1).contiguous()))


def test_bad_inputs_are_refused_with_their_shapes_and_backward_raises() -> None:
    q, k, v, mask = case(1, 4, 2, 20, 32)
    with pytest.raises(RuntimeError, match="q must be a bf16 CPU tensor .B, H, 1, D., got Float"):
        one_query_attention.one_query(q.float(), k, v, mask)
    with pytest.raises(RuntimeError, match="keys and values must be bf16 CPU tensors .1, Hkv, S, 32. with contiguous"):
        one_query_attention.one_query(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, mask)
    with pytest.raises(RuntimeError, match="4 query heads over 3 key heads"):
        one_query_attention.one_query(q, torch.cat((k, k[:, :1]), 1), torch.cat((v, v[:, :1]), 1), mask)
    with pytest.raises(RuntimeError, match="mask must be bool .1, 1, 1, 20., got Float"):
        one_query_attention.one_query(q, k, v, mask.float())
    leaf = q.clone().requires_grad_()
    out = one_query_attention.one_query(leaf, k, v, mask)
    with pytest.raises(RuntimeError, match="not implemented"):
        out.float().sum().backward()


def test_the_kernel_is_used_on_every_cpu_with_avx512_bf16_or_avx2_alone() -> None:
    """Where it should run, `available()` says so: a kernel that failed its check would leave tokens on the eager
    attention, silently."""
    assert one_query_attention.available()
