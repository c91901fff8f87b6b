"""dgemma.fused_ops: a layer's small operations in one C++ pass each (dgemma/kernels/fused_ops.cpp): RMS norms with the
residual, the layer's scalar or RoPE that follow them, the router's choice, the experts' weighted sum; forwards off
the reference path take them on a CPU."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import dgemma
import dgemma.model
from dgemma import fused_ops
from dgemma.cache import KVCache
from conftest import counted_calls

# Where the kernel should run: AVX2, compiling allowed, a C++ compiler.
EXPECTED = (torch.cpu._is_avx2_supported() and os.environ.get("DGEMMA_COMPILE") != "0"
            and shutil.which(os.environ.get("CXX", "c++")) is not None)
pytestmark = pytest.mark.skipif(not EXPECTED, reason="no fused norms expected here (no AVX2, compiling off, or no "
                                                     "C++ compiler)")

# Half a unit in the last place, relative, of each dtype's normal numbers, and half the spacing of its smallest ones:
# float32 arithmetic rounded once lands within it of the float64 result (plus float32's own error).
HALF_UNIT = {torch.bfloat16: (2**-8, 2**-134), torch.float16: (2**-11, 2**-25), torch.float32: (2**-24, 2**-150)}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normed(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The reference's norm in float64."""
    h = x.double()
    h = h * (h.pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt()
    return h if weight is None else h * weight.double()


def rounded_once(got: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor) -> bool:
    """got is exact rounded once to got's dtype: within half a unit of it, plus float32's error on terms of
    `magnitude`."""
    relative, smallest = HALF_UNIT[got.dtype]
    error = (got.double() - exact).abs()
    return bool((error <= relative * exact.abs() + smallest + 2**-20 * magnitude).all())


def test_the_kernel_is_there_where_expected():
    assert fused_ops.available()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("width", [7, 40, 2816])  # the vector part of the sums, their tail, and both
def test_rms_norm_with_residual_and_multiplier_is_the_float64_result_rounded_once(dtype, width):
    generator = seeded(width)
    x = (torch.randn(3, 5, width, generator=generator) * 30).to(dtype)
    residual = torch.randn(3, 5, width, generator=generator).to(dtype)
    weight = torch.randn(width, generator=generator).to(dtype)
    multiplier = torch.tensor([0.7], dtype=dtype)
    for w, r, m in ((weight, None, None), (None, None, None), (weight, residual, None), (weight, residual, multiplier),
                    (None, residual, multiplier)):
        got = fused_ops.rms_norm(x, w, 1e-6, r, m)
        assert got.dtype == dtype and got.shape == x.shape
        n = normed(x, w)
        total = n if r is None else r.double() + n
        scale = 1.0 if m is None else m.double()
        magnitude = (n.abs() + (0 if r is None else r.double().abs())) * abs(float(scale))
        assert rounded_once(got, total * scale, magnitude), (w is None, r is None, m is None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("width", [16, 256, 512])
def test_rms_norm_rope_is_the_float64_rotation_rounded_once(dtype, width):
    """Each head's row normed, then rotated with its own token's cos and sin (per row, or one table for every row)."""
    generator = seeded(width + 1)
    x = torch.randn(2, 3, 4, width, generator=generator).to(dtype)  # [B, T, H, D]
    weight = torch.randn(width, generator=generator).to(dtype)
    for rows in (2, 1):
        cos, sin = (torch.randn(rows, 1, 3, width, generator=generator).to(dtype) for _ in range(2))
        for w in (weight, None):
            got = fused_ops.rms_norm_rope(x, w, cos, sin, 1e-6)
            assert got.dtype == dtype and got.shape == x.shape
            n = normed(x, w)
            half = width // 2
            turned = torch.cat((-n[..., half:], n[..., :half]), dim=-1)
            c, s = (table.double().transpose(1, 2) for table in (cos, sin))  # [B, T, 1, D] over the heads
            exact = n * c + turned * s
            assert rounded_once(got, exact, (n * c).abs() + (turned * s).abs())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_route_is_the_float64_softmax_top_k_renormalised_and_scaled(dtype):
    """The k most probable experts in descending order (of two equal logits the lower index first), their float64
    probabilities renormalised and scaled to float32 rounding."""
    generator = seeded(12)
    logits = (torch.randn(6, 128, generator=generator) * 3).to(dtype)
    logits[2, 17] = logits[2, 90] = logits[2].max() + 1  # a tie for the first place
    scale = (torch.rand(128, generator=generator) + 0.5).to(dtype)
    weights, index = fused_ops.route(logits, 8, scale)
    assert weights.dtype == torch.float32 and index.dtype == torch.int64 and weights.shape == index.shape == (6, 8)
    probabilities = logits.double().softmax(-1)
    expected_index = torch.stack([torch.tensor(sorted(range(128), key=lambda e: (-float(row[e]), e))[:8])
                                  for row in probabilities])
    assert torch.equal(index, expected_index) and index[2, :2].tolist() == [17, 90]
    chosen = probabilities.gather(-1, index)
    expected = chosen / chosen.sum(-1, keepdim=True) * scale.double()[index]
    assert ((weights.double() - expected).abs() <= 2**-20 * expected.abs()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_weighted_sum_is_the_float64_sum_rounded_once(dtype):
    generator = seeded(13)
    rows = torch.randn(5 * 8, 2816, generator=generator).to(dtype)
    weights = torch.rand(5, 8, generator=generator)
    got = fused_ops.weighted_sum(rows, weights)
    assert got.dtype == dtype and got.shape == (5, 2816)
    terms = rows.double().view(5, 8, 2816) * weights.double()[..., None]
    assert rounded_once(got, terms.sum(1), terms.abs().sum(1))


def test_the_same_bits_with_any_number_of_threads_and_for_a_row_alone():
    generator = seeded(3)
    x = torch.randn(64, 2816, generator=generator).to(torch.bfloat16)  # enough rows to share among threads
    residual = torch.randn(64, 2816, generator=generator).to(torch.bfloat16)
    weight = torch.randn(2816, generator=generator).to(torch.bfloat16)
    heads = x.view(4, 16, 11, 256)
    cos, sin = (torch.randn(4, 1, 16, 256, generator=generator).to(torch.bfloat16) for _ in range(2))
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append((fused_ops.rms_norm(x, weight, 1e-6, residual),
                            fused_ops.rms_norm_rope(heads, weight[:256], cos, sin, 1e-6),
                            fused_ops.weighted_sum(x, torch.rand(8, 8, generator=seeded(4)))))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for result in results for a, b in zip(result, results[0]))
    assert torch.equal(fused_ops.rms_norm(x[5:6], weight, 1e-6, residual[5:6]), results[0][0][5:6])


def test_bad_inputs_are_refused_by_name():
    x = torch.ones(2, 8)
    with pytest.raises(RuntimeError, match="weight must be \\[8\\] for x \\[2, 8\\], got \\[4\\]"):
        fused_ops.rms_norm(x, torch.ones(4), 1e-6)
    with pytest.raises(RuntimeError, match="weight must be a contiguous CPU tensor of Float, got BFloat16"):
        fused_ops.rms_norm(x, torch.ones(8, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(RuntimeError, match="residual must be \\[2, 8\\], got \\[1, 8\\]"):
        fused_ops.rms_norm(x, None, 1e-6, torch.ones(1, 8))
    with pytest.raises(RuntimeError, match="multiplier must be one CPU value"):
        fused_ops.rms_norm(x, None, 1e-6, None, torch.ones(2))
    with pytest.raises(RuntimeError, match="x must be a contiguous bf16, fp16 or float32 CPU tensor, got Double"):
        fused_ops.rms_norm(x.double(), None, 1e-6)
    with pytest.raises(RuntimeError, match="x must be \\[B, T, H, D\\] with D even"):
        fused_ops.rms_norm_rope(torch.ones(1, 1, 2, 7), None, torch.ones(1, 1, 1, 7), torch.ones(1, 1, 1, 7), 1e-6)
    with pytest.raises(RuntimeError, match="cos must be \\[2, 8\\] for x \\[1, 2, 3, 8\\], got \\[2, 4\\]"):
        fused_ops.rms_norm_rope(torch.ones(1, 2, 3, 8), None, torch.ones(1, 1, 2, 4).expand(1, 1, 2, 4),
                                  torch.ones(1, 1, 2, 8), 1e-6)
    with pytest.raises(RuntimeError, match="route: logits must be \\[N, E\\] with k = 9 of E experts, got \\[2, 8\\]"):
        fused_ops.route(x, 9, torch.ones(8))
    with pytest.raises(RuntimeError, match="route: per_expert_scale must be \\[8\\] for logits \\[2, 8\\], got \\[7\\]"):
        fused_ops.route(x, 2, torch.ones(7))
    with pytest.raises(RuntimeError, match="weighted_sum: rows must be \\[6, H\\] for weights \\[2, 3\\], got \\[2, 8\\]"):
        fused_ops.weighted_sum(x, torch.ones(2, 3))
    with pytest.raises(RuntimeError, match="weighted_sum: weights must be a contiguous float32 CPU matrix"):
        fused_ops.weighted_sum(x, torch.ones(2, 1, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError):  # no derivative
        fused_ops.rms_norm(x.requires_grad_(), None, 1e-6).sum().backward()


def forwards(path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A prompt, then a token, then a canvas's decoder pass, each with exact=False: their hidden states in float32."""
    model = dgemma.load(path, dtype=dtype)
    prompt, token, canvas = torch.tensor([[2, 9, 14, 33, 5]]), torch.tensor([[21]]), torch.tensor([[4, 8, 15, 16]])
    cache = KVCache(model.config, 1, model.dtype, capacity=16)
    out = {}
    with torch.no_grad():
        for name, ids in (("prompt", prompt), ("token", token)):
            valid = torch.ones_like(ids, dtype=torch.bool)
            out[name] = model.encode(ids, cache.encoder_plan(model.rope, valid), exact=False).float()
            cache.commit(valid)
        plan = cache.decoder_plan(model.rope, 1, canvas.shape[1])
        out["canvas"] = model.decode(canvas, plan, exact=False).float()
    return out


def test_a_forward_off_the_reference_path_takes_the_fused_ops_within_its_dtypes_rounding(random_checkpoint,
                                                                                         monkeypatch):
    """A tiny MoE model's prompt, token and canvas with exact=False: every norm in the kernel (a layer's seven, its
    router's and its v-norm; q's and k's with their RoPE; the stack's final norm), the router's choice and the
    experts' sum, none with exact=True; in float32 the hidden states are those of torch's operations to 1e-5 of their scale,
    and in bf16 within twice as far from the float32 model's as torch's operations are: rounding once instead of
    after each operation moves a random network's bf16 states about as much as it brings them closer (measured here,
    the largest differences from float32 0.098, 0.166, 0.077 against 0.061, 0.118, 0.071 for the prompt, the token
    and the canvas; on three other seeds the mean differences 0.81 to 1.08 times torch's)."""
    path = random_checkpoint("moe")
    # The Python forward's choices (a token's layer in one C++ object makes the same: tests/test_token_layer.py)
    monkeypatch.setattr(dgemma.model, "token_layer_for", lambda block, x: None)
    calls = counted_calls(monkeypatch, dgemma.model,
                          ["fused_rms_norm", "fused_rms_norm_rope", "fused_route", "fused_weighted_sum"])
    results = {dtype: forwards(path, dtype) for dtype in (torch.float32, torch.bfloat16)}
    config = dgemma.load(path).config
    layers, experts = len(config.layers), config.has_experts
    per_layer = 5 + (4 if experts else 0)  # input, post-attention, pre-MLP, post-MLP, v; router, experts' three
    moe_layers = layers if experts else 0
    assert calls == {"fused_rms_norm": 2 * 3 * (per_layer * layers + 1), "fused_rms_norm_rope": 2 * 3 * 2 * layers,
                     "fused_route": 2 * 3 * moe_layers, "fused_weighted_sum": 2 * 3 * moe_layers}
    monkeypatch.setattr(dgemma.model, "fused_ops_take", lambda *tensors: False)
    torch_ops = {dtype: forwards(path, dtype) for dtype in (torch.float32, torch.bfloat16)}
    assert calls["fused_rms_norm"] == 2 * 3 * (per_layer * layers + 1)  # not called again
    model = dgemma.load(path, dtype=torch.bfloat16)
    monkeypatch.undo()  # the kernel available again: the reference path never calls it
    reference_calls = []
    for name in calls:
        monkeypatch.setattr(dgemma.model, name, lambda *args: reference_calls.append(args))
    cache, prompt = KVCache(model.config, 1, model.dtype, capacity=8), torch.tensor([[2, 9, 14]])
    with torch.no_grad():
        model.encode(prompt, cache.encoder_plan(model.rope, torch.ones_like(prompt, dtype=torch.bool)))
    assert reference_calls == []
    for name, fused in results[torch.float32].items():
        reference = torch_ops[torch.float32][name]
        assert (fused - reference).abs().max() <= 1e-5 * reference.abs().max(), name
        fused_error = (results[torch.bfloat16][name] - fused).abs().max()
        torch_error = (torch_ops[torch.bfloat16][name] - reference).abs().max()
        assert fused_error <= 2 * torch_error, name
