"""`TokenBatch`: sequences decoded token by token with the encoder, side by side in one cache, each getting the
tokens it gets alone, in shared forwards."""

from __future__ import annotations

import pytest
import torch

import dgemma
from dgemma.generation import TokenBatch, autoregressive_steps


@pytest.fixture(scope="module")
def model(text_model_dir):
    return dgemma.load(text_model_dir)


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 300, (1, length), generator=torch.Generator().manual_seed(seed))


def test_sequences_joining_and_leaving_a_batch_get_the_tokens_each_gets_alone_in_shared_forwards(model):
    """Greedy (fp32: a batch's logits differ from a lone row's by rounding only, far below the top-2 gaps of this
    model), prompts of different lengths past the sliding window, sequences joining mid-way, one leaving and its
    row taken by the next."""
    plans = {"a": (prompt(5, 0), 3), "b": (prompt(19, 1), 12), "c": (prompt(2, 2), 9), "d": (prompt(11, 3), 6)}
    alone = {name: list(autoregressive_steps(model, ids, budget, None, 0.0)) for name, (ids, budget) in plans.items()}
    forwards = 0
    encode = model.encode

    def counted(*args, **kwargs):
        nonlocal forwards
        forwards += 1
        return encode(*args, **kwargs)

    model.encode = counted
    try:
        batch = TokenBatch(model, rows=3)
        names, got = {}, {name: [] for name in plans}
        for name in ("a", "b"):
            names[id(batch.add(plans[name][0], plans[name][1], None, 0.0))] = name
        for step in range(12):
            if step == 2:
                names[id(batch.add(plans["c"][0], plans["c"][1], None, 0.0))] = "c"
            for sequence, token in batch.step():
                got[names[id(sequence)]].append(token)
                if sequence.finished:
                    batch.remove(sequence)
                    if names[id(sequence)] == "a":  # its row goes to the next sequence
                        d = batch.add(plans["d"][0], plans["d"][1], None, 0.0)
                        assert d.row == sequence.row
                        names[id(d)] = "d"
    finally:
        model.encode = encode
    assert got == alone
    assert not batch.sequences  # every sequence finished within its budget and left
    assert forwards < sum(len(tokens) for tokens in got.values()) - 8  # tokens of concurrent sequences share forwards


def test_a_full_batch_refuses_another_sequence_by_name(model):
    batch = TokenBatch(model, rows=1)
    batch.add(prompt(3, 0), 4)
    with pytest.raises(ValueError, match="all 1 rows of the batch are taken"):
        batch.add(prompt(3, 1), 4)
