"""bf16 matrices in oneDNN's blocked layout (dgemma/onednn.py): the sampler's reordered vocabulary matrix and experts
held reordered by a model loaded to decode compute what the plain tensors compute, and give the tensors back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dgemma
import dgemma.model
from dgemma.checkpoints import to_checkpoint_names
from dgemma.model import attached_weights
from dgemma.onednn import LARGE_MATRIX, ReorderedExperts, available, reordered_transpose
from dgemma.sampling import draw_uniforms, fast_step

pytestmark = pytest.mark.skipif(not available(), reason="this CPU's oneDNN does not multiply bf16")

# Reordering changes no product or sum on the machines measured (bitwise equal); asserted machine-independently
# within one bf16 rounding of the result.
BF16 = dict(atol=1e-2, rtol=2**-7)


def bf16(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@torch.no_grad()
def test_the_vocabulary_matrix_reordered_once_gives_the_plain_product_and_follows_changes():
    vocab, width = LARGE_MATRIX // 256, 256
    embedding, weights = bf16(vocab, width, seed=0), bf16(32, vocab, seed=1).abs()
    reordered = reordered_transpose(embedding, 32)
    assert reordered is not None and reordered_transpose(embedding, 32) is reordered  # made once, then reused
    torch.testing.assert_close(dgemma.onednn.product(weights, reordered).float(), (weights @ embedding).float(), **BF16)
    embedding.mul_(-1)  # changed in place: the copy is made again
    again = reordered_transpose(embedding, 32)
    assert again is not reordered
    torch.testing.assert_close(dgemma.onednn.product(weights, again).float(), (weights @ embedding).float(), **BF16)


def test_only_large_bf16_matrices_without_gradients_are_reordered():
    with torch.no_grad():
        assert reordered_transpose(bf16(LARGE_MATRIX // 256 - 1, 256, seed=0), 16) is None  # small
        assert reordered_transpose(torch.randn(LARGE_MATRIX // 256, 256), 16) is None  # fp32
    assert reordered_transpose(bf16(LARGE_MATRIX // 256, 256, seed=0), 16) is None  # gradients recorded


@torch.no_grad()
def test_the_fast_step_with_a_reordered_vocabulary_matrix_computes_the_plain_step():
    """fast_step reorders a large bf16 vocabulary matrix for its self-conditioning product; with the threshold
    raised it takes the plain product: the same draws, argmax and entropy, and the same embeddings."""
    vocab, width = LARGE_MATRIX // 256, 256
    head, hidden = bf16(vocab, width, seed=2) * 0.1, bf16(1, 24, width, seed=3)
    args = (hidden, head, head, torch.tensor(1.0), 30.0, torch.tensor(0.8), draw_uniforms(24, torch.Generator()))
    reordered = fast_step(*args)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dgemma.onednn, "LARGE_MATRIX", 1 << 62)
        plain = fast_step(*args)
    for name in ("sampled", "argmax", "entropy"):
        assert torch.equal(getattr(reordered, name), getattr(plain, name)), name
    torch.testing.assert_close(reordered.self_conditioning.float(), plain.self_conditioning.float(), **BF16)


@torch.no_grad()
def test_reordered_experts_give_each_experts_product_and_their_tensor_back():
    weight = bf16(4, 48, 64, seed=4)
    held = ReorderedExperts.from_tensor(weight, 8)
    assert torch.equal(held.dense(), weight) and held.shape == (4, 48, 64)
    rows, ends = bf16(11, 64, seed=5), [3, 3, 9, 11]  # expert 1 has no rows
    out = held.grouped_linear(rows, ends)
    for expert, (begin, end) in enumerate(zip([0, *ends[:-1]], ends)):
        torch.testing.assert_close(out[begin:end].float(), F.linear(rows[begin:end], weight[expert]).float(), **BF16)
    with pytest.raises(TypeError, match="compute in torch.bfloat16, not torch.float32"):
        held.grouped_linear(rows.float(), ends)
    with pytest.raises(TypeError, match="add is not defined on experts held in oneDNN's layout"):
        torch.add(held, 1)


def test_a_model_loaded_to_decode_holds_large_bf16_experts_reordered(random_checkpoint, monkeypatch):
    """Loaded for canvases, the (here lowered) large experts are held in oneDNN's layout, the encoder's tied weights
    the same objects; the decoder computes what the plain parameters compute, exact and fast; the checkpoint's
    tensors come back bit for bit; a cast makes them parameters again; decode=None and "autoregressive" keep
    parameters."""
    monkeypatch.setattr(dgemma.model, "LARGE_EXPERT", 0)
    path = random_checkpoint("moe_top3_bias")
    model = dgemma.load(path, dtype=torch.bfloat16)
    plain = dgemma.load(path, dtype=torch.bfloat16, decode=None)
    held = dict(attached_weights(model, (ReorderedExperts,)))
    layers = model.config.num_hidden_layers
    assert sorted(held) == sorted(f"decoder.layers.{i}.experts.{name}" for i in range(layers)
                                  for name in ("gate_up_proj", "down_proj"))
    assert model.encoder.layers[0].experts.down_proj is model.decoder.layers[0].experts.down_proj
    assert not any(attached_weights(plain, (ReorderedExperts,)))
    assert not any(attached_weights(dgemma.load(path, dtype=torch.bfloat16, decode="autoregressive"),
                                    (ReorderedExperts,)))
    experts = model.decoder.layers[0].experts
    x = bf16(40, model.config.hidden_size, seed=6)
    with torch.no_grad():
        weights, index = model.decoder.layers[0].router(x)
        for exact in (True, False):
            torch.testing.assert_close(experts(x, index, weights, exact=exact).float(),
                                       plain.decoder.layers[0].experts(x, index, weights, exact=exact).float(), **BF16)
    saved, expected = to_checkpoint_names(model), to_checkpoint_names(plain)
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    model.float()
    gate_up = model.decoder.layers[0].experts.gate_up_proj
    assert isinstance(gate_up, torch.nn.Parameter) and gate_up.dtype == torch.float32
    assert model.encoder.layers[0].experts.gate_up_proj is gate_up
    assert torch.equal(gate_up, plain.decoder.layers[0].experts.gate_up_proj.float())
