"""`dgemma.widening`: bf16 and fp16 products computed in float32 on CPUs without native half-precision matmuls, which
the fast path takes there (a canvas's projections, experts, attention and the sampler's vocabulary products) and the
reference path never does. Every test forces the CPU's answer both ways, so all of them run on any CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dgemma
from dgemma import widening
from dgemma.cache import KVCache
from dgemma.quantized import GroupQuantized
from dgemma.sampling import draw_uniforms, fast_step
from conftest import text_values


def within_one_rounding(out: torch.Tensor, truth: torch.Tensor, magnitude: torch.Tensor, terms: int) -> None:
    """out is the float64 `truth` summed in float32 and rounded once to out's dtype: within half a unit in its last
    place (2^-9 of a bf16 value, 2^-12 of an fp16 one), doubled for slack, plus float32's summation error bound
    (terms x 2^-24 of the sum of the terms' magnitudes)."""
    ulp = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-23}[out.dtype]
    bound = ulp * truth.abs() + 2 * terms * 2**-24 * magnitude
    assert ((out.double() - truth).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_widened_product_is_the_float32_sum_rounded_once_across_tiles(dtype, monkeypatch):
    monkeypatch.setattr(widening, "TILE_VALUES", 96 * 7)  # tiles of 7 weight rows: 50 rows in 8 tiles, the last short
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 96, generator=generator).to(dtype)
    weight = torch.randn(50, 96, generator=generator).to(dtype)
    bias = torch.randn(50, generator=generator).to(dtype)
    out = widening.linear(x, weight, bias)
    assert out.shape == (3, 5, 50) and out.dtype == dtype
    products = x.double().unsqueeze(-2) * weight.double()
    truth = products.sum(-1) + bias.double()
    within_one_rounding(out, truth, products.abs().sum(-1) + bias.double().abs(), 97)
    into = torch.empty(3, 5, 50, dtype=dtype)
    assert widening.linear(x, weight, bias, out=into) is into and torch.equal(into, out)


def test_a_widened_mix_and_batch_are_float32_sums(monkeypatch):
    monkeypatch.setattr(widening, "TILE_VALUES", 24 * 10)  # the mix's vocabulary of 100 in 10 tiles; bmm 2 experts a time
    generator = torch.Generator().manual_seed(1)
    weights = torch.rand(6, 100, generator=generator).to(torch.bfloat16)
    matrix = torch.randn(100, 24, generator=generator).to(torch.bfloat16)
    mixed = widening.mix(weights, matrix)
    assert mixed.dtype == torch.float32 and mixed.shape == (6, 24)
    products = weights.double().unsqueeze(-1) * matrix.double()
    within_one_rounding(mixed, products.sum(1), products.abs().sum(1), 100)
    batch = torch.randn(5, 4, 12, generator=generator).to(torch.bfloat16)
    experts = torch.randn(5, 10, 12, generator=generator).to(torch.bfloat16)
    out = widening.bmm(batch, experts)
    assert out.shape == (5, 4, 10) and out.dtype == torch.bfloat16
    products = batch.double().unsqueeze(-2) * experts.double().unsqueeze(1)
    within_one_rounding(out, products.sum(-1), products.abs().sum(-1), 12)


def test_only_half_precision_rows_on_a_cpu_without_native_half_matmuls_widen(monkeypatch):
    rows, weight = torch.randn(4, 8).to(torch.bfloat16), torch.randn(6, 8).to(torch.bfloat16)
    monkeypatch.setattr(widening, "native_half_matmuls", lambda: True)
    assert not widening.widens(rows, weight)
    monkeypatch.setattr(widening, "native_half_matmuls", lambda: False)
    assert widening.widens(rows, weight) and widening.widens(rows.half(), weight.half())
    assert not widening.widens(rows[:1], weight)  # a single row: torch's kernel (or the one-row kernels) read it once
    assert not widening.widens(rows.float(), weight.float())
    assert not widening.widens(rows, weight.half())
    assert not widening.widens(rows, GroupQuantized.quantize(torch.randn(6, 32), "Q8_0"))  # tiles widen themselves
    needing = weight.clone().requires_grad_()
    assert not widening.widens(rows, needing)
    with torch.no_grad():
        assert widening.widens(rows, needing)


def test_native_half_matmuls_means_avx512_bf16():
    assert widening.native_half_matmuls() == torch.cpu._is_avx512_bf16_supported()


def canvas_pass(model: dgemma.DiffusionGemma, exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A 5-token prompt encoded and a canvas decoded: the canvas's final hidden states and their logits, float32."""
    prompt = torch.tensor([[2, 9, 14, 33, 5]])
    valid = torch.ones_like(prompt, dtype=torch.bool)
    cache = KVCache(model.config, 1, model.dtype, capacity=5 + model.config.canvas_length)
    with torch.no_grad():
        model.encode(prompt, cache.encoder_plan(model.rope, valid), exact=exact)
        cache.commit(valid)
        canvas = torch.randint(3, model.config.vocab_size, (1, model.config.canvas_length),
                               generator=torch.Generator().manual_seed(3))
        hidden = model.decode(canvas, cache.decoder_plan(model.rope, 1, model.config.canvas_length), exact=exact)
        return hidden.float(), model.logits(hidden, exact=exact)


def count_widened_calls(monkeypatch) -> dict[str, int]:
    calls = {"widened_linear": 0, "widened_bmm": 0}
    for function in calls:
        original = getattr(dgemma.model, function)

        def counted(*args, _name=function, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(dgemma.model, function, counted)
    return calls


def test_the_fast_path_widens_a_canvas_and_a_prompt_and_the_reference_path_never(random_checkpoint, monkeypatch):
    """A tiny bf16 MoE model on a CPU taken to have no native half-precision matmuls: with exact=False its projections,
    the experts' batch and the head run widened (attention too: `attend` is checked below), with exact=True none."""
    model = dgemma.load(random_checkpoint("moe"), dtype=torch.bfloat16)
    calls = count_widened_calls(monkeypatch)
    monkeypatch.setattr(widening, "native_half_matmuls", lambda: True)
    canvas_pass(model, exact=False)
    assert calls == {"widened_linear": 0, "widened_bmm": 0}
    monkeypatch.setattr(widening, "native_half_matmuls", lambda: False)
    canvas_pass(model, exact=True)
    assert calls == {"widened_linear": 0, "widened_bmm": 0}
    canvas_pass(model, exact=False)
    layers = len(model.config.layers)
    # q, k, v (where a layer has one), o and the dense MLP's three, for the prompt and the canvas, and the head
    assert calls["widened_linear"] >= 2 * 6 * layers + 1
    assert calls["widened_bmm"] == 2 * 2 * layers  # gate/up and down, prompt and canvas


def test_a_widened_canvas_pass_is_as_close_to_float32_as_the_native_one():
    """A tiny dense bf16 model (no router, whose near-ties a rounding flips in either path, moving every later value of
    a canvas that attends both ways): hidden states and logits through the widened fast path within 1.25 times the
    error of the native fast path and of the reference path, against the float32 model."""
    values, tie = text_values("untied")
    config = dgemma.ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": 16,
                                           "tie_word_embeddings": tie,
                                           "text_config": dict(values, num_experts=None, top_k_experts=None)})
    assert not config.has_experts
    model = dgemma.DiffusionGemmaForBlockDiffusion(config)
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 1.0 / param.shape[-1] ** 0.5, generator=generator)
    reference = canvas_pass(model.eval(), exact=True)
    model = model.to(torch.bfloat16)
    errors = {}
    with pytest.MonkeyPatch.context() as patch:
        for native in (True, False):
            patch.setattr(widening, "native_half_matmuls", lambda native=native: native)
            errors[native] = [(run - truth).abs().max() for run, truth in zip(canvas_pass(model, False), reference)]
        exact = [(run - truth).abs().max() for run, truth in zip(canvas_pass(model, True), reference)]
    for widened, native, exact_error in zip(errors[False], errors[True], exact):
        assert widened <= 1.25 * max(native, exact_error)


def test_attention_widens_to_float32_and_rounds_once(monkeypatch):
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 16, 8, generator=generator).to(torch.bfloat16)
    keys, values = (torch.randn(1, 2, 21, 8, generator=generator).to(torch.bfloat16) for _ in range(2))
    mask = torch.rand(1, 1, 16, 21, generator=generator) > 0.3
    mask[0, 0, 3] = False  # a query that sees no key gets zeros
    truth = F.scaled_dot_product_attention(q.double(), keys.double(), values.double(), attn_mask=mask, scale=1.0,
                                           enable_gqa=True).nan_to_num(0.0)
    monkeypatch.setattr(widening, "native_half_matmuls", lambda: False)
    out = dgemma.model.attend(q, keys, values, mask, exact=False)
    assert out.dtype == torch.bfloat16
    # float32's attention rounded once: within half a bf16 unit of the result (doubled), plus float32's few ulps
    assert ((out.double() - truth).abs() <= 2**-8 * truth.abs() + 1e-6).all()
    assert torch.equal(out[0, :, 3], torch.zeros_like(out[0, :, 3]))


def test_the_sampler_widened_samples_what_it_samples_natively(monkeypatch):
    """The fast sampler with the vocabulary products widened: the same argmax wherever the bf16 logits' top two
    differ by more than their rounding, entropies and self-conditioning within bf16's roundings."""
    generator = torch.Generator().manual_seed(4)
    vocab, width, length = 4096, 64, 32
    head = (torch.randn(vocab, width, generator=generator) / 4).to(torch.bfloat16)
    hidden = torch.randn(1, length, width, generator=generator).to(torch.bfloat16)
    scale = torch.tensor(8.0, dtype=torch.bfloat16)
    results = {}
    for native in (True, False):
        monkeypatch.setattr(widening, "native_half_matmuls", lambda native=native: native)
        uniforms = draw_uniforms(length, torch.Generator().manual_seed(5))
        results[native] = fast_step(hidden, head, head, scale, 30.0, torch.tensor(0.8), uniforms,
                                    digest_elements=vocab * 8)
    native, widened = results[True], results[False]
    logits = (hidden.double() @ head.double().t()).squeeze(0)
    top = logits.topk(2, dim=-1).values
    clear = (top[:, 0] - top[:, 1]) > 2**-7 * top[:, 0].abs() * 2
    assert clear.sum() >= length // 2
    assert torch.equal(widened.argmax[0][clear], native.argmax[0][clear])
    assert torch.equal(widened.argmax[0][clear], logits.argmax(-1)[clear])
    torch.testing.assert_close(widened.entropy, native.entropy, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(widened.self_conditioning.float(), native.self_conditioning.float(), rtol=3e-2,
                               atol=3e-2)


def test_quantised_tiles_widen_to_float32_and_land_closer_to_the_exact_product(monkeypatch):
    generator = torch.Generator().manual_seed(6)
    weight = GroupQuantized.quantize(torch.randn(40, 64, generator=generator), "Q8_0")
    x = torch.randn(9, 64, generator=generator).to(torch.bfloat16)
    bias = torch.zeros(40, dtype=torch.bfloat16)  # taken in the tiles' dtype (attention biases)
    truth = x.double() @ weight.dequantize().double().t()
    errors = {}
    for native in (True, False):
        monkeypatch.setattr(widening, "native_half_matmuls", lambda native=native: native)
        out = F.linear(x, weight, bias)
        assert out.dtype == torch.bfloat16 and out.shape == (9, 40)
        errors[native] = (out.double() - truth).abs().max()
    # native: the tile rounded to bf16 before its product; widened: the tile's float32 values, the sum rounded once
    assert errors[False] <= errors[True]
    products = x.double().unsqueeze(1) * weight.dequantize().double()
    monkeypatch.setattr(widening, "native_half_matmuls", lambda: False)
    within_one_rounding(F.linear(x, weight), truth, products.abs().sum(-1), 64)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q6_K", "Q5_1"])  # zero code 128; 4 bits, offsets; zero code 32
def test_quantised_tiles_widen_a_tile_of_widenings_size_at_a_time_into_one_reused_buffer(qtype, monkeypatch):
    monkeypatch.setattr(widening, "native_half_matmuls", lambda: False)
    monkeypatch.setattr(widening, "TILE_VALUES", 256 * 7)  # tiles of 7 weight rows: 40 rows in 6 tiles, the last short
    generator = torch.Generator().manual_seed(7)
    weight = GroupQuantized.quantize(torch.randn(40, 256, generator=generator), qtype)
    exact = weight.dequantize().double()
    tiles = []
    dequantize = GroupQuantized.dequantize

    def recorded(self, index=None, dtype=torch.float32, out=None):
        assert out is not None, "a quantised tile dequantised outside widening's buffer"
        tiles.append((out.untyped_storage().data_ptr(), out.shape[0], out.dtype))
        return dequantize(self, index, dtype, out)
    monkeypatch.setattr(GroupQuantized, "dequantize", recorded)
    # more rows than dgemma's AVX2 kernel for one-byte codes takes (AVX2_FEW_ROWS), which builds no tiles
    x = torch.randn(dgemma.quantized.AVX2_FEW_ROWS + 1, 256, generator=generator).to(torch.bfloat16)
    bias = torch.randn(40, generator=generator).to(torch.bfloat16)
    out = F.linear(x, weight, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (x.shape[0], 40)
    assert [rows for _, rows, _ in tiles] == [7, 7, 7, 7, 7, 5]
    assert len({(storage, dtype) for storage, _, dtype in tiles}) == 1 and tiles[0][2] == torch.float32
    products = x.double().unsqueeze(1) * exact
    within_one_rounding(out, products.sum(-1) + bias.double(), products.abs().sum(-1) + bias.double().abs(), 257)
    tiles.clear()
    weights = torch.rand(5, 40, generator=generator).to(torch.bfloat16)  # the sampler's self-conditioning mix
    mixed = weights @ weight
    assert mixed.dtype == torch.bfloat16 and mixed.shape == (5, 256)
    assert [rows for _, rows, _ in tiles] == [7, 7, 7, 7, 7, 5] and len({storage for storage, _, _ in tiles}) == 1
    products = weights.double().unsqueeze(-1) * exact
    within_one_rounding(mixed, products.sum(1), products.abs().sum(1), 40)
