"""The KV cache and masks on their own, and the server's slot cache against one cache per sequence."""

from __future__ import annotations

import torch

import dgemma
from dgemma.cache import KVCache, SlotCache, attention_masks
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


def test_cache_grows_keeping_its_contents_and_commits_validity():
    config = small_config()
    cache = KVCache(config, 1, torch.float32, capacity=2)
    plan = cache.plan({}, torch.ones(1, 2, dtype=torch.bool), encoder=True)
    keys, _ = plan.join(0, torch.ones(1, 1, 2, 8), torch.ones(1, 1, 2, 8))
    cache.commit(torch.ones(1, 2, dtype=torch.bool))
    assert cache.length == 2 and keys.shape[2] == 2
    cache.reserve(10)
    assert cache.capacity >= 10 and bool((cache.keys[0][:, :, :2] == 1).all())
    view = KVCache.over(config, [k[:, :, :3] for k in cache.keys], [v[:, :, :3] for v in cache.values],
                        cache.valid[:, :3], 2)
    try:
        view.reserve(5)
        raise AssertionError("a view over fixed storage must refuse to grow")
    except ValueError as err:
        assert "holds 3" in str(err)


def test_slot_cache_decodes_rows_of_different_lengths_like_separate_caches():
    """The server batches canvases of sequences with different prefixes: each row's logits equal those of the
    same sequence decoded alone."""
    config = small_config(window=3)
    model = dgemma.DiffusionGemma(config)
    model.init_weights(torch.Generator().manual_seed(0))
    prompts = [torch.randint(0, 50, (1, n), generator=torch.Generator().manual_seed(n)) for n in (7, 2, 5)]
    canvases = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(9))
    slots = SlotCache(config, rows=3, capacity=16, dtype=torch.float32)
    alone = []
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            valid = torch.ones_like(prompt, dtype=torch.bool)
            positions = torch.arange(prompt.shape[1])[None]
            view = slots.row(row)
            model.encode(prompt, view.plan(model.rope(positions), valid, encoder=True))
            view.commit(valid)
            slots.sync(row, view)
            single = KVCache(config, 1, torch.float32)
            model.encode(prompt, single.plan(model.rope(positions), valid, encoder=True))
            single.commit(valid)
            canvas_pos = torch.arange(prompt.shape[1], prompt.shape[1] + 4)[None]
            plan = single.plan(model.rope(canvas_pos), torch.ones(1, 4, dtype=torch.bool), encoder=False)
            alone.append(model.logits(model.decode(canvases[row:row + 1], plan)))
        lengths = torch.tensor(slots.lengths)[:, None]
        plan = slots.decoder_plan(model.rope(lengths + torch.arange(4)), 3, 4)
        batched = model.logits(model.decode(canvases, plan))
        for row in range(3):
            torch.testing.assert_close(batched[row:row + 1], alone[row], atol=1e-5, rtol=1e-5)
        slots.move(2, 1)  # row 1 finished: row 2 takes its place
        assert slots.lengths[:2] == [7, 5] and slots.lengths[2] == 0
        plan = slots.decoder_plan(model.rope(torch.tensor(slots.lengths[:2])[:, None] + torch.arange(4)), 2, 4)
        moved = model.logits(model.decode(canvases[[0, 2]], plan))
        torch.testing.assert_close(moved[1:2], alone[2], atol=1e-5, rtol=1e-5)
