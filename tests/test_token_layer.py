"""dgemma.token_layer: one token's layer in one C++ object (dgemma/kernels/token_layer.cpp) computes what the layer's
Python forward (exact=False) computes, bit for bit, in every weight form, and the forward takes it only for one row
with no gradient to record."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import dgemma
import dgemma.model
from dgemma import one_row, token_layer
from dgemma.cache import KVCache
from dgemma.model import Block
from dgemma.quantized import GroupQuantized

EXPECTED = (torch.cpu._is_avx2_supported() and os.environ.get("DGEMMA_COMPILE") != "0"
            and shutil.which(os.environ.get("CXX", "c++")) is not None)
pytestmark = pytest.mark.skipif(not EXPECTED, reason="no token layer expected here (no AVX2, compiling off, or no C++ "
                                                     "compiler)")
# dgemma's AVX2 products (and so the object for bf16 and quantised layers) run on CPUs with AVX2 and no AVX-512.
AVX2_PRODUCTS = EXPECTED and not torch.cpu._is_avx512_supported()

S, F = "sliding_attention", "full_attention"
# Matrices the kernels take (rows multiples of 32, most of Q4_K's 256; the experts' down projection not, so that
# q4_k_m gives it Q8_0, as the released model's 704; 32 experts, so that the router's matrix takes the kernels too):
# sliding layers with v_proj and full ones without.
CONFIG = {"model_type": "diffusion_gemma", "canvas_length": 16, "tie_word_embeddings": True,
          "text_config": dict(vocab_size=512, hidden_size=256, intermediate_size=256, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=64, global_head_dim=128, num_global_key_value_heads=1,
                              sliding_window=8, num_hidden_layers=2, layer_types=[S, F], num_experts=32,
                              top_k_experts=2, moe_intermediate_size=96, pad_token_id=0, eos_token_id=1,
                              bos_token_id=2)}


def checkpoint(directory, **text) -> str:
    config = dgemma.ModelConfig.from_dict(dict(CONFIG, text_config=dict(CONFIG["text_config"], **text)))
    model = dgemma.DiffusionGemmaForBlockDiffusion(config)
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for name, param in model.named_parameters():
            # matrices large enough that predictions are peaked; norm weights, scales and biases off their defaults
            scale = 1.0 / param.shape[-1] ** 0.5 if param.dim() >= 2 else 0.2
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    path = directory / "model"
    dgemma.save(model, path)
    return str(path)


@pytest.fixture(scope="module")
def random_path(tmp_path_factory) -> str:
    return checkpoint(tmp_path_factory.mktemp("token-layer"))


@pytest.fixture(scope="module")
def dense_path(tmp_path_factory) -> str:
    """The same model without experts (a layer's other path)."""
    return checkpoint(tmp_path_factory.mktemp("token-layer-dense"), num_experts=None, top_k_experts=None,
                      moe_intermediate_size=None)


def tokens_hidden(model, steps: int = 6) -> torch.Tensor:
    """A prompt, then `steps` tokens one at a time with exact=False: the tokens' hidden states."""
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, model.config.vocab_size, (1, 11), generator=generator)
    cache = KVCache(model.config, 1, model.dtype, capacity=32)
    valid = torch.ones_like(prompt, dtype=torch.bool)
    outs = []
    with torch.no_grad():
        model.encode(prompt, cache.encoder_plan(model.rope, valid), exact=False)
        cache.commit(valid)
        one = torch.ones(1, 1, dtype=torch.bool)
        for _ in range(steps):
            token = torch.randint(3, model.config.vocab_size, (1, 1), generator=generator)
            outs.append(model.encode(token, cache.encoder_plan(model.rope, one), exact=False))
            cache.commit(one)
    return torch.cat(outs, dim=1)


def layers_in_object(monkeypatch) -> list[bool]:
    """For every layer pass from now on, whether the forward ran it in the object."""
    taken = []

    def recorded(block, x):
        layer = token_layer.for_token(block, x)
        taken.append(layer is not None)
        return layer
    monkeypatch.setattr(dgemma.model, "token_layer_for", recorded)
    return taken


def in_python(monkeypatch) -> None:
    monkeypatch.setattr(dgemma.model, "token_layer_for", lambda block, x: None)


# (dtype, quantisation scheme, the one-row products' size threshold lifted, experts)
FORMS = [("float32", None, False, False), ("float32", None, False, True), ("bfloat16", None, True, True),
         ("bfloat16", None, False, True), ("bfloat16", "int8", True, True), ("bfloat16", "int4", True, True),
         ("bfloat16", "q4_k_m", True, True), ("bfloat16", "int4_experts", True, True)]
# The kinds of product each form's layers take ("linear" in bf16: the router's, an exact product)
KINDS = {("float32", False): {"linear"}, ("float32", True): {"linear", "grouped"},
         ("bfloat16", True): {"half_rows", "linear"}, ("bfloat16", False): {"linear", "grouped"},
         ("int8", True): {"int4_rows", "byte_codes"}, ("int4", True): {"int4_rows", "byte_codes"},
         ("q4_k_m", True): {"int4_rows", "byte_codes"}, ("int4_experts", True): {"int4_rows", "half_rows", "linear"}}


@pytest.mark.parametrize("dtype, scheme, lifted, experts", FORMS,
                         ids=["float32-dense", "float32", "bf16", "bf16-grouped-experts", "int8", "int4", "q4_k_m",
                              "int4_experts"])
def test_a_tokens_layers_in_the_object_are_the_python_forward_bit_for_bit(random_path, dense_path, monkeypatch, dtype,
                                                                          scheme, lifted, experts):
    """Each form's tokens, loaded for autoregressive decoding, through the object and through the Python forward:
    identical hidden states, and every layer of every token ran in the object (bf16 and quantised weights where the
    AVX2 products run; float32 ones on any CPU with AVX2). With the one-row products' size threshold lifted the bf16
    matrices take them at these sizes; kept, bf16 and float32 experts take the forward's grouped path: every kind of
    product the object knows is exercised across the forms."""
    if dtype == "bfloat16" and not AVX2_PRODUCTS:
        pytest.skip("dgemma's AVX2 products run on CPUs with AVX2 and no AVX-512")
    if lifted:
        monkeypatch.setattr(one_row, "MIN_VALUES", 0)
    path = random_path if experts else dense_path
    kinds = []

    def recorded(choose):
        def chosen(*args, **kwargs):
            products = choose(*args, **kwargs)
            for product in products if isinstance(products, tuple) else (products,):
                kinds.append((product.kind, product.twice))
            return products
        return chosen

    for name in ("_product", "_by_index", "_expert_products"):
        monkeypatch.setattr(token_layer, name, recorded(getattr(token_layer, name)))
    model = dgemma.load(path, dtype=getattr(torch, dtype), quantize=scheme, decode="autoregressive")
    taken = layers_in_object(monkeypatch)
    fast = tokens_hidden(model)
    assert sum(taken) == 6 * len(model.config.layers)  # every token's every layer (the prompt's none)
    in_python(monkeypatch)
    assert torch.equal(fast, tokens_hidden(model))
    assert {kind for kind, _ in kinds} == KINDS[scheme or dtype, lifted if dtype == "bfloat16" else experts]
    # 8-bit codes as two 4-bit halves: int8's matrices, q4_k_m's experts' down projection (Q8_0)
    assert any(twice for _, twice in kinds) == (scheme in ("int8", "q4_k_m"))

def test_attention_biases_are_added_as_the_python_forward_adds_them(tmp_path, monkeypatch):
    monkeypatch.setattr(one_row, "MIN_VALUES", 0)
    paths = {torch.float32: checkpoint(tmp_path / "dense", attention_bias=True, num_experts=None, top_k_experts=None,
                                       moe_intermediate_size=None)}
    if AVX2_PRODUCTS:
        paths[torch.bfloat16] = checkpoint(tmp_path / "experts", attention_bias=True)
    models = {dtype: dgemma.load(path, dtype=dtype, decode="autoregressive") for dtype, path in paths.items()}
    taken = layers_in_object(monkeypatch)
    fast = {dtype: tokens_hidden(model) for dtype, model in models.items()}
    assert sum(taken) == 12 * len(models)
    in_python(monkeypatch)
    for dtype, model in models.items():
        assert torch.equal(fast[dtype], tokens_hidden(model))


def test_experts_grouped_mm_cannot_take_get_one_product_per_expert_as_in_the_forward(tmp_path, monkeypatch):
    """Rows of 250 float32 values (1,000 bytes, no multiple of the 16 grouped_mm needs): the forward multiplies each
    expert's group on its own, and so does the object."""
    model = dgemma.load(checkpoint(tmp_path, hidden_size=250), dtype=torch.float32, decode="autoregressive")
    taken = layers_in_object(monkeypatch)
    fast = tokens_hidden(model)
    assert sum(taken) == 12
    in_python(monkeypatch)
    assert torch.equal(fast, tokens_hidden(model))


def test_the_forward_takes_the_object_only_for_one_row_with_no_gradient_to_record(dense_path):
    model = dgemma.load(dense_path, dtype=torch.float32)
    block: Block = model.encoder.layers[0]
    x = torch.zeros(1, 1, model.config.hidden_size)
    with torch.no_grad():
        assert token_layer.for_token(block, x) is not None
        assert token_layer.for_token(block, torch.zeros(1, 2, model.config.hidden_size)) is None  # two positions
        assert token_layer.for_token(block, torch.zeros(2, 1, model.config.hidden_size)) is None  # two rows
    assert token_layer.for_token(block, x) is None  # gradients recorded: the Python forward, which records them


def test_a_replaced_weight_builds_the_object_again(dense_path, monkeypatch):
    """The object holds the weights it was built from; a weight replaced on the module (a load, a cast, a
    quantisation all replace them) is seen at the next token, and its result is the Python forward's again."""
    model = dgemma.load(dense_path, dtype=torch.float32)
    block: Block = model.encoder.layers[1]
    x = torch.zeros(1, 1, model.config.hidden_size)
    with torch.no_grad():
        first = token_layer.for_token(block, x)
        assert token_layer.for_token(block, x) is first  # kept while nothing changes
        gate = block.mlp.gate_proj
        gate.weight = torch.nn.Parameter(2 * gate.weight)
        assert token_layer.for_token(block, x) is not first
    taken = layers_in_object(monkeypatch)
    fast = tokens_hidden(model)
    assert sum(taken) == 12
    in_python(monkeypatch)
    assert torch.equal(fast, tokens_hidden(model))
    with torch.no_grad():
        assert token_layer.for_token(block, x) is not None
    model.double()  # a cast: every layer's object is dropped at once, not held until its next token
    assert block not in token_layer._BUILT


def test_a_layer_with_quantised_experts_not_read_by_index_stays_in_python(random_path):
    """4-bit experts in groups the AVX2 kernel does not read by index (a GroupQuantized weight: the forward
    dequantises the chosen experts' tiles) have no product in the object: those layers stay in Python."""
    model = dgemma.load(random_path, dtype=torch.float32)
    experts = model.encoder.layers[0].experts
    dgemma.model.attach(experts, "down_proj", GroupQuantized.quantize(experts.down_proj.detach(), "Q4_0"))
    x = torch.zeros(1, 1, model.config.hidden_size)
    with torch.no_grad():
        assert token_layer.for_token(model.encoder.layers[0], x) is None
        assert token_layer.for_token(model.encoder.layers[1], x) is not None
