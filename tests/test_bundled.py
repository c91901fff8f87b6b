"""The model that ships with dgemma: it loads offline, writes English, infills better than it continues, and its
structured output is valid."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch

import dgemma
from dgemma.cache import KVCache
from dgemma.cli import bundled_model_dir, main
from dgemma.constraints import FixedTokens, generate_structured, grammar_from, layout_infill, Hole
from dgemma.tokenizer import Tokenizer

BUNDLED = bundled_model_dir()
SAMPLES = (Path(__file__).parent / "data" / "heldout_sample.txt").read_text().split("\n\n")
pytestmark = pytest.mark.skipif(not (BUNDLED / "config.json").is_file(), reason="no bundled model in this checkout")


@pytest.fixture(scope="module")
def bundled():
    return dgemma.load(BUNDLED), Tokenizer.from_directory(BUNDLED)


def test_generate_without_model_uses_the_bundled_model(capsys):
    assert main(["generate", "It is a truth universally acknowledged", "--seed", "0", "--max-new-tokens", "48"]) == 0
    text = capsys.readouterr().out
    words = re.findall(r"[A-Za-z]+", text)
    assert text.startswith("It is a truth universally acknowledged") and len(words) > 12
    common = {"the", "and", "of", "to", "a", "in", "that", "i", "it", "he", "she", "was", "is", "her", "his", "not",
              "be", "with", "you", "my", "for", "as", "but", "had", "have"}
    assert sum(w.lower() in common for w in words) >= 3, "the continuation should be made of English words"


@torch.no_grad()
def span_log_likelihood(model, prompt: list[int], canvas: torch.Tensor, span: slice, truth: list[int]) -> float:
    """Mean log-probability of the true span tokens in one decoder pass over `canvas` after `prompt`."""
    cache = KVCache(model.config, 1, model.dtype)
    ids = torch.tensor([prompt])
    valid = torch.ones_like(ids, dtype=torch.bool)
    model.encode(ids, cache.plan(model.rope(torch.arange(len(prompt))[None]), valid, encoder=True))
    cache.commit(valid)
    length = model.config.canvas_length
    plan = cache.plan(model.rope(torch.arange(len(prompt), len(prompt) + length)[None]),
                      torch.ones(1, length, dtype=torch.bool), encoder=False)
    logits = model.logits(model.decode(canvas, plan))[0, span]
    return float(torch.log_softmax(logits, -1)[torch.arange(len(truth)), torch.tensor(truth)].mean())


def test_infilling_a_held_out_span_beats_continuing_without_its_suffix(bundled):
    """With the text after a masked span fixed in the canvas, the model gives the true span a higher likelihood
    than when it only has the text before it (same noise, same positions)."""
    model, tok = bundled
    length = model.config.canvas_length
    gains = []
    for i, sample in enumerate(SAMPLES):
        ids = tok.encode(sample, add_special_tokens=False)
        prefix, span, suffix = [tok.bos_token_id] + ids[:40], ids[40:48], ids[48:48 + length]
        encoded, region, moved = layout_infill(prefix, [Hole(len(span)), suffix], length)
        region = region[:length]
        start = moved  # the span's first position in the canvas
        for draw in range(3):
            noise = torch.randint(0, model.config.vocab_size, (1, length),
                                  generator=torch.Generator().manual_seed(100 * i + draw))
            with_suffix = FixedTokens(torch.tensor([region]), length).begin(0, noise)
            without = with_suffix.clone()
            without[0, start + len(span):] = noise[0, start + len(span):]  # only the text before the span
            where = slice(start, start + len(span))
            gains.append(span_log_likelihood(model, encoded, with_suffix, where, span)
                         - span_log_likelihood(model, encoded, without, where, span))
    mean_gain = sum(gains) / len(gains)
    assert mean_gain > 0.1, f"infilling should raise the span's log-likelihood (mean gain {mean_gain:.3f} nats)"
    assert sum(g > 0 for g in gains) > len(gains) / 2


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
     "required": ["name", "age"]},
    {"type": "array", "items": {"enum": ["Elizabeth", "Darcy", "Jane"]}, "minItems": 1, "maxItems": 3},
])
def test_structured_output_of_the_bundled_model_is_valid(bundled, schema):
    model, tok = bundled
    prompt = tok.encode("The answer, as JSON:\n")
    out = generate_structured(model, tok, prompt, grammar_from(json_schema=schema),
                              generator=torch.Generator().manual_seed(0), max_new_tokens=64)
    new = out.sequences[0, len(prompt):].tolist()
    eos = set(model.generation_config.eos_token_ids)
    end = next(i for i, t in enumerate(new) if t in eos)
    jsonschema.validate(json.loads(tok.decode(new[:end])), schema)
