"""The KV cache and masks on their own, and the server's slot cache against one cache per sequence."""

from __future__ import annotations

import pytest
import torch

import dgemma
from dgemma.cache import KVCache, attention_masks
from dgemma.config import FULL, SLIDING


def small_config(window: int = 4) -> dgemma.ModelConfig:
    return dgemma.ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": 4, "text_config": dict(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, layer_types=[SLIDING, FULL], sliding_window=window,
        per_layer_config={"1": {"head_dim": 8, "num_key_value_heads": 1}})})


def test_encoder_masks_are_causal_windowed_and_skip_padding():
    config = small_config(window=3)
    pos = torch.arange(6)[None]
    ok = torch.tensor([[False, True, True, True, True, True]])  # slot 0 is left padding
    masks = attention_masks(config, pos, pos, ok, encoder=True)
    full, sliding = masks[FULL][0, 0], masks[SLIDING][0, 0]
    assert full[5].tolist() == [False, True, True, True, True, True]
    assert sliding[5].tolist() == [False, False, False, True, True, True]  # itself and the two before
    assert full[0].tolist() == [True, False, False, False, False, False]  # a padding query sees only itself
    assert not bool(full.triu(1).any())


def test_decoder_masks_see_the_last_window_minus_one_prefix_positions_and_the_whole_canvas():
    config = small_config(window=3)
    query = torch.arange(6, 10)[None]  # a canvas of 4 after a prefix of 6
    keys = torch.arange(10)[None]
    masks = attention_masks(config, query, keys, torch.ones(1, 10, dtype=torch.bool), encoder=False)
    assert masks[FULL] is None  # every query sees every key
    assert masks[SLIDING][0, 0, 0].tolist() == [False] * 4 + [True] * 6  # prefix positions 4 and 5, and canvas


def identity_rope(positions):
    return {}


def test_cache_grows_keeping_its_contents_and_commits_validity():
    config = small_config()
    cache = KVCache(config, 1, torch.float32, capacity=2)
    plan = cache.encoder_plan(identity_rope, torch.ones(1, 2, dtype=torch.bool))
    keys, _ = plan.join(0, torch.ones(1, 1, 2, 8), torch.ones(1, 1, 2, 8))
    cache.commit(torch.ones(1, 2, dtype=torch.bool))
    assert cache.length == 2 and keys.shape[2] == 2
    cache.reserve(10)
    assert cache.capacity >= 10 and bool((cache.keys[0][:, :, :2] == 1).all())
    fixed = KVCache(config, 1, torch.float32, capacity=3, growable=False)
    with pytest.raises(ValueError, match="holds 3"):
        fixed.reserve(5)


def random_model(config, seed: int = 0):
    model = dgemma.DiffusionGemma(config)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def alone(model, prompt, canvas):
    """One sequence through its own cache: the encoder's output and the decoder's logits on `canvas`."""
    single = KVCache(model.config, 1, torch.float32)
    valid = torch.ones_like(prompt, dtype=torch.bool)
    hidden = model.encode(prompt, single.encoder_plan(model.rope, valid))
    single.commit(valid)
    return hidden, model.logits(model.decode(canvas, single.decoder_plan(model.rope, 1, canvas.shape[1])))


@torch.no_grad()
def test_rows_of_different_lengths_encode_and_decode_together_as_they_would_alone():
    """The server's batched prefill (ragged prompts in one encoder forward) and batched denoising (canvases after
    prefixes of different lengths): every row's results equal those of its sequence run alone."""
    config = small_config(window=3)
    model = random_model(config)
    prompts = [torch.randint(0, 50, (1, n), generator=torch.Generator().manual_seed(n)) for n in (7, 2, 5)]
    canvases = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(9))
    expected = [alone(model, p, canvases[i:i + 1]) for i, p in enumerate(prompts)]
    cache = KVCache(config, 3, torch.float32, capacity=16, growable=False)
    width = max(p.shape[1] for p in prompts)
    ids = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in prompts])
    counts = [p.shape[1] for p in prompts]
    valid = torch.arange(width)[None] < torch.tensor(counts)[:, None]
    rows = [2, 0, 1]  # any rows, in any order
    hidden = model.encode(ids, cache.encoder_plan(model.rope, valid, rows, counts))
    cache.commit(valid, rows, counts)
    assert [cache.lengths[r] for r in rows] == counts
    for i, count in enumerate(counts):
        torch.testing.assert_close(hidden[i:i + 1, :count], expected[i][0], atol=1e-5, rtol=1e-5)
    order = [rows.index(r) for r in range(3)]  # sequence held by cache row 0, 1, 2
    batched = model.logits(model.decode(canvases[order], cache.decoder_plan(model.rope, 3, 4)))
    for row, sequence in enumerate(order):
        torch.testing.assert_close(batched[row:row + 1], expected[sequence][1], atol=1e-5, rtol=1e-5)
    cache.move(2, 1)  # the sequence in row 1 finished: row 2's takes its place
    assert cache.lengths[2] == 0 and cache.lengths[1] == counts[order[2]]
    moved = model.logits(model.decode(canvases[[order[0], order[2]]], cache.decoder_plan(model.rope, 2, 4)))
    torch.testing.assert_close(moved[1:2], expected[order[2]][1], atol=1e-5, rtol=1e-5)
