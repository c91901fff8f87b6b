"""`dgemma.one_row`: a single row times large bf16/fp16 matrices in compiled float32 reductions, which a lone token's
forward takes off the reference path (`exact=False`) and never on it."""

from __future__ import annotations

import os

import pytest
import torch

import dgemma
from dgemma import avx2_rows, one_row
from dgemma.cache import KVCache
from dgemma.generation import autoregressive_steps
from conftest import counted_calls

needs_compiling = pytest.mark.skipif(os.environ.get("DGEMMA_COMPILE") == "0", reason="compiling turned off")


def within_one_rounding(out: torch.Tensor, rows: torch.Tensor, matrices: torch.Tensor) -> None:
    """out [R, N] is each row's exact product with its matrix [R, N, K], summed in float32 and rounded once to out's
    dtype: within half a unit in the last place of the dtype (2^-9 of a bf16 value, 2^-12 of an fp16 one), doubled
    for slack, plus float32's summation error bound (K * 2^-24 times the sum of the terms' magnitudes)."""
    products = matrices.double() * rows.double().unsqueeze(1)
    truth, magnitude = products.sum(-1), products.abs().sum(-1)
    ulp = 2**-8 if out.dtype == torch.bfloat16 else 2**-11
    bound = ulp * truth.abs() + 2 * rows.shape[-1] * 2**-24 * magnitude
    assert ((out.double() - truth).abs() <= bound).all()


@needs_compiling
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_row_times_a_matrix_is_its_float32_sum_rounded_once_in_a_graph_for_short_rows_and_one_for_long(dtype,
                                                                                                          monkeypatch):
    monkeypatch.setattr(one_row, "avx2_rows_available", lambda: False)  # its own tests: tests/test_avx2_rows.py
    generator = torch.Generator().manual_seed(0)
    # MIN_VALUES and more: two shapes with rows up to SUM_CHUNK long, two with rows of several chunks
    for n, k in [(4096, 1024), (2048, 2560), (512, 8192), (384, 12288)]:
        weight = torch.randn(n, k, generator=generator).to(dtype)
        for leading in [(1,), (1, 1), ()]:  # as a [1, K] row, a [B, L, K] token and the 1-D row of `logits`
            x = torch.randn(*leading, k, generator=generator).to(dtype)
            assert one_row.takes_row(x, weight)
            out = one_row.row_product(x, weight)
            assert out.shape == (*leading, n) and out.dtype == dtype
            within_one_rounding(out.reshape(1, n), x.reshape(1, k), weight.unsqueeze(0))
    code = one_row._kernel(one_row._product, dtype)._torchdynamo_orig_callable.__code__
    assert code.co_name == f"one_row_product_{str(dtype).removeprefix('torch.')}"
    assert len(torch._dynamo.eval_frame._debug_get_cache_entry_list(code)) == 2


@needs_compiling
@pytest.mark.parametrize("kernel", ["inductor", "avx2"])
def test_a_tokens_experts_are_read_in_place_by_their_indices(kernel, monkeypatch):
    if kernel == "inductor":
        monkeypatch.setattr(one_row, "avx2_rows_available", lambda: False)
    elif not avx2_rows.available():
        pytest.skip("no AVX2 kernel here")
    generator = torch.Generator().manual_seed(1)
    experts, n, k, top_k = 6, 1024, 1024, 4  # top_k matrices of n x k: MIN_VALUES
    weight = torch.randn(experts, n, k, generator=generator).to(torch.bfloat16)
    x = torch.randn(1, k, generator=generator).to(torch.bfloat16)
    assert one_row.takes_experts(x, weight, top_k)
    index = torch.tensor([4, 0, 5, 2])
    rows = torch.randn(top_k, k, generator=generator).to(torch.bfloat16)
    out = one_row.expert_products(rows, weight, index)
    assert out.shape == (top_k, n)
    within_one_rounding(out, rows, weight[index])
    shared = one_row.expert_products(x.expand(top_k, -1), weight, index)  # one token's row for every expert
    within_one_rounding(shared, x.expand(top_k, -1), weight[index])


def test_the_one_row_kernels_take_only_large_low_precision_matrices_and_no_gradient(monkeypatch):
    weight = torch.zeros(2048, 2048, dtype=torch.bfloat16)
    row = torch.zeros(1, 2048, dtype=torch.bfloat16)
    monkeypatch.setenv("DGEMMA_COMPILE", "1")
    assert one_row.takes_row(row, weight)
    assert not one_row.takes_row(torch.zeros(2, 2048, dtype=torch.bfloat16), weight)  # a batch: GEMM
    assert not one_row.takes_row(row.float(), weight.float())  # float32 keeps the eager kernels
    assert not one_row.takes_row(row, weight[:1024])  # small: not worth a compile
    long = torch.zeros(1024, 5000, dtype=torch.bfloat16)
    assert not one_row.takes_row(torch.zeros(1, 5000, dtype=torch.bfloat16), long)  # neither one chunk nor several
    assert not one_row.takes_row(row.requires_grad_(), weight)  # no backward
    assert not one_row.takes_row(torch.zeros(1, 2048, dtype=torch.bfloat16), weight.requires_grad_())
    quantized = dgemma.quantized.GroupQuantized.quantize(torch.zeros(2048, 2048), "Q8_0")
    assert not one_row.takes_row(row.detach(), quantized)  # a quantised weight has its own kernels
    experts = torch.zeros(4, 1024, 1024, dtype=torch.bfloat16)
    assert one_row.takes_experts(row[:, :1024].detach(), experts, 4)
    assert not one_row.takes_experts(row[:, :1024].detach(), experts, 2)  # two matrices read: small
    assert not one_row.takes_experts(torch.zeros(2, 1024, dtype=torch.bfloat16), experts, 4)  # two tokens
    monkeypatch.setenv("DGEMMA_COMPILE", "0")
    assert not one_row.takes_row(torch.zeros(1, 2048, dtype=torch.bfloat16), weight.detach())


@needs_compiling
def test_a_lone_token_takes_the_one_row_kernels_off_the_reference_path_only(random_checkpoint, monkeypatch):
    """A tiny bf16 MoE model with the size threshold lifted: a token encoded with exact=False runs its projections,
    experts and head in the one-row kernels (and its attention in `attend_one_query`), and its hidden states and
    logits are as close to the float32 model's as the reference path's bf16 ones are; exact=True, a prompt of several
    tokens and autoregressive decoding with exact=True never take them."""
    path = random_checkpoint("moe")
    model = dgemma.load(path, dtype=torch.bfloat16)
    monkeypatch.setattr(one_row, "MIN_VALUES", 0)
    # The Python forward's choices (a token's layer in one C++ object makes the same: tests/test_token_layer.py)
    monkeypatch.setattr(dgemma.model, "token_layer_for", lambda block, x: None)
    calls = counted_calls(monkeypatch, dgemma.model, ["row_product", "expert_products"])
    prompt = torch.tensor([[2, 9, 14, 33, 5]])
    valid = torch.ones_like(prompt, dtype=torch.bool)
    token = torch.tensor([[21]])
    one = torch.ones_like(token, dtype=torch.bool)
    hidden, logits = {}, {}
    with torch.no_grad():
        for run, exact in (("float32", True), ("exact", True), ("fast", False)):
            network = dgemma.load(path, dtype=torch.float32) if run == "float32" else model
            cache = KVCache(network.config, 1, network.dtype, capacity=8)
            network.encode(prompt, cache.encoder_plan(network.rope, valid), exact=exact)
            cache.commit(valid)
            assert calls == {"row_product": 0, "expert_products": 0}  # five tokens: never the one-row kernels
            hidden[run] = network.encode(token, cache.encoder_plan(network.rope, one), exact=exact).float()
            logits[run] = network.logits(hidden[run][0, -1].to(network.dtype), exact=exact)
    layers = len(model.config.layers)
    assert calls["expert_products"] == 2 * layers  # gate/up and down, every layer
    assert calls["row_product"] >= 6 * layers + 1  # q, k, v (where a layer has one), o, the dense MLP's three; the head
    for of in (hidden, logits):
        fast, exact = ((of[run] - of["float32"]).abs().max() for run in ("fast", "exact"))
        # bf16's roundings, no more (measured: hidden states 0.126 from float32's against the reference path's 0.133,
        # logits 0.149 against 0.172)
        assert fast <= 1.25 * exact
    before = dict(calls)
    list(autoregressive_steps(model, prompt, 3, temperature=0, exact=True))
    assert calls == before
    list(autoregressive_steps(model, prompt, 3, temperature=0))
    assert calls["row_product"] > before["row_product"] and calls["expert_products"] > before["expert_products"]
