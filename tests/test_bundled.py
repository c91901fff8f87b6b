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
from dgemma.checkpoints import bundled_model_dir
from dgemma.cli import main
from dgemma.constraints import FixedTokens, grammar_from
from dgemma.tasks import Hole, generate_structured, layout_infill
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


class RecordingFixedTokens(FixedTokens):
    """Fixed tokens that keep the last denoising step's logits, to score the span the model filled in."""

    def accept(self, canvas_index, canvas, result, bound, logits_at, generator):
        self.last_logits_at = logits_at
        return super().accept(canvas_index, canvas, result, bound, logits_at, generator)


def span_log_likelihoods(model, encoded: list[list[int]], regions: list[list[int]], span: range,
                         truths: list[list[int]], seed: int) -> list[float]:
    """Denoise one canvas per row, all rows in one batch, with `regions`' fixed tokens (-1 free) for 16 steps; for
    each row the mean log-probability the last step gives its true span tokens."""
    control = RecordingFixedTokens(torch.tensor(regions), model.config.canvas_length)
    model.generate(torch.tensor(encoded), max_new_tokens=len(regions[0]), max_denoising_steps=16,
                   stability_threshold=None, eos_token_id=None, pad_token_id=None, control=control,
                   generator=torch.Generator().manual_seed(seed))
    likelihoods = []
    with torch.no_grad():
        for row, truth in enumerate(truths):
            logits = torch.stack([control.last_logits_at(row, position) for position in span])
            scores = torch.log_softmax(logits, -1)[torch.arange(len(truth)), torch.tensor(truth)]
            likelihoods.append(float(scores.mean()))
    return likelihoods


def test_infilling_a_held_out_span_beats_continuing_without_its_suffix(bundled):
    """With the text after a masked span fixed in the canvas, the denoised span's true tokens are more likely than
    when the model only has the text before it (same noise, same steps: the two conditions run as batches of the
    same rows under the same seed). A single pass from pure noise does not show this: with most of a canvas clean
    the model leans towards copying the noise it is given, which self-conditioning over the steps undoes."""
    model, tok = bundled
    length = model.config.canvas_length
    encoded, with_suffix, without_suffix, spans = [], [], [], []
    for sample in SAMPLES:
        ids = tok.encode(sample, add_special_tokens=False)
        for offset in (0, 40):
            # 12 tokens of suffix: with the span's 8 and 12 prefix tokens moved in, exactly one canvas
            prefix = [tok.bos_token_id] + ids[offset:offset + 40]
            span, suffix = ids[offset + 40:offset + 48], ids[offset + 48:offset + 60]
            prompt, region, moved = layout_infill(prefix, [Hole(len(span)), suffix], length)
            assert len(region) == length and moved == 12
            encoded.append(prompt)
            with_suffix.append(region)
            without_suffix.append(region[:moved] + [-1] * (length - moved))
            spans.append(span)
    where = range(12, 12 + 8)  # the span, after the 12 moved prefix tokens
    gains = []
    for seed in range(2):
        gains += [a - b for a, b in zip(span_log_likelihoods(model, encoded, with_suffix, where, spans, seed),
                                        span_log_likelihoods(model, encoded, without_suffix, where, spans, seed))]
    mean_gain = sum(gains) / len(gains)
    assert mean_gain > 0.2, f"infilling should raise the span's log-likelihood (mean gain {mean_gain:.3f} nats)"


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"name": {"enum": ["Elizabeth", "Darcy", "Jane"]}, "age": {"type": "integer",
                                      "minimum": 1, "maximum": 99}}, "required": ["name", "age"]},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3},
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
