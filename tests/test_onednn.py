"""bf16 experts in oneDNN's blocked layout (dgemma/onednn.py): held reordered by a model loaded to decode, they compute
what the plain tensors compute, give the tensors back, and leave no second copy resident."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dgemma
import dgemma.model
from dgemma.checkpoints import to_checkpoint_names
from dgemma.model import attached_weights
from dgemma.onednn import ReorderedExperts, available

pytestmark = pytest.mark.skipif(not available(), reason="this CPU's oneDNN does not multiply bf16")

# Reordering changes no product or sum on the machines measured (bitwise equal); asserted machine-independently
# within one bf16 rounding of the result.
BF16 = dict(atol=1e-2, rtol=2**-7)


def bf16(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


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


def test_page_out_gives_back_a_file_mappings_pages_and_keeps_every_tensors_data(tmp_path):
    """A tensor viewing a file mapping, read once and paged out, leaves the resident set (what a checkpoint's expert
    does once reordered); any tensor keeps its values."""
    import mmap

    from dgemma.allocator import page_out
    from dgemma.bench_breakdown import resident_bytes

    size = 64 * 2**20
    path = tmp_path / "weights.bin"
    values = torch.arange(size // 4, dtype=torch.int32)
    path.write_bytes(values.numpy().tobytes())
    with open(path, "rb") as handle:
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    mapped = torch.frombuffer(mapping, dtype=torch.int32)
    assert torch.equal(mapped, values)  # every page read
    before = resident_bytes()
    if not page_out(mapped):
        pytest.skip("this kernel does not take MADV_PAGEOUT")
    assert before - resident_bytes() > size // 2
    assert torch.equal(mapped, values)  # read again from the file
    anonymous = values.clone()
    assert page_out(anonymous) and torch.equal(anonymous, values)
    del mapped


def test_generation_runs_through_reordered_experts_as_through_parameters(random_checkpoint, monkeypatch):
    """A seeded generation (fast sampler, then speculative decoding) on a model holding its experts reordered writes
    the tokens the same model writes with its experts as parameters: nothing in the engine reads the experts but the
    products, and those give the same bits (the same oneDNN kernel)."""
    from dgemma.generation import speculative_steps

    monkeypatch.setattr(dgemma.model, "LARGE_EXPERT", 0)
    path = random_checkpoint("moe_top3_bias")
    models = [dgemma.load(path, dtype=torch.bfloat16, decode=decode) for decode in ("diffusion", None)]
    assert any(attached_weights(models[0], (ReorderedExperts,)))
    prompt = torch.randint(3, models[0].config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(7))
    canvases, spoken = [], []
    for model in models:
        out = model.generate(prompt, max_new_tokens=24, max_denoising_steps=4,
                             generator=torch.Generator().manual_seed(3))
        canvases.append(out.sequences)
        spoken.append(list(speculative_steps(model, prompt, 12, generator=torch.Generator().manual_seed(4),
                                             draft=model.generation_config.updated(max_denoising_steps=4),
                                             draft_generator=torch.Generator().manual_seed(5))))
    assert torch.equal(canvases[0], canvases[1]) and canvases[0].shape[1] > prompt.shape[1]
    assert spoken[0] == spoken[1] and len(spoken[0]) > 0
