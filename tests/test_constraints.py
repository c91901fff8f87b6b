"""Infilling and structured output on the canvas: fixed tokens stay fixed, finished JSON is always valid."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

import dgemma
from dgemma.constraints import FixedTokens, GrammarError, grammar_from
from dgemma.tasks import Hole, generate_structured, infill, infill_text, layout_infill, parse_infill_template
from dgemma.generation import DraftStep, generate_steps
from dgemma.tokenizer import Tokenizer

# 24 schemas: nested objects, arrays, enums, numbers, strings with patterns, required and optional fields.
SCHEMAS = json.loads((Path(__file__).parent / "data" / "schemas.json").read_text())


@pytest.fixture(scope="module")
def model_and_tokenizer(text_model_dir):
    return dgemma.load(text_model_dir), Tokenizer.from_directory(text_model_dir)


def test_layout_moves_prompt_tokens_so_the_region_ends_on_a_canvas_boundary():
    encoded, region, moved = layout_infill([2, 10, 11, 12, 13], [[20, 21], Hole(3), [30]], canvas_length=8)
    assert moved == 2 and encoded == [2, 10, 11] and region == [12, 13, 20, 21, -1, -1, -1, 30]
    encoded, region, moved = layout_infill([2], [Hole(3), [30]], canvas_length=8)
    assert moved == 0 and region == [-1, -1, -1, 30]  # a too-short prompt cannot fill the canvas
    with pytest.raises(ValueError, match="at least one hole"):
        layout_infill([2], [[5]], 8)
    assert parse_infill_template("The {{8}} sat on {{2}}.") == ["The ", Hole(8), " sat on ", Hole(2), "."]


def test_fixed_tokens_never_change_at_any_step(model_and_tokenizer):
    model, _ = model_and_tokenizer
    region = torch.tensor([[7, -1, -1, 9, -1, 11, -1, -1, 12, 13, -1, -1, -1, -1, 14, -1]])
    control = FixedTokens(region, model.config.canvas_length)
    config = model.generation_config.updated(max_new_tokens=16, max_denoising_steps=5, stability_threshold=None,
                                             eos_token_id=None)
    drafts = 0
    for event in generate_steps(model, torch.tensor([[2, 40, 41]]), config, control=control,
                                generator=torch.Generator().manual_seed(0)):
        if isinstance(event, DraftStep):
            part = region[:, event.canvas_index * 8:(event.canvas_index + 1) * 8]
            fixed = part >= 0
            assert torch.equal(event.argmax[fixed], part[fixed]) and bool(event.accepted[fixed].all())
            drafts += 1
        elif hasattr(event, "sequences"):
            out = event.sequences[0, 3:]
    assert drafts == 10
    assert torch.equal(out[region[0] >= 0], region[0][region[0] >= 0])


def test_infill_text_keeps_the_template_and_fills_every_hole(model_and_tokenizer):
    model, tok = model_and_tokenizer
    text, holes = infill_text(model, tok, "It is a truth {{4}} acknowledged, that a {{3}} man",
                              generator=torch.Generator().manual_seed(1), max_denoising_steps=4)
    assert text.startswith("It is a truth ") and " acknowledged, that a " in text and text.endswith(" man")
    assert len(holes) == 2 and all(isinstance(h, str) for h in holes)
    with pytest.raises(ValueError, match="no hole"):
        infill_text(model, tok, "nothing to fill")


def test_infill_fills_holes_of_the_exact_sizes(model_and_tokenizer):
    model, _ = model_and_tokenizer
    result = infill(model, [2, 40], [[50, 51], Hole(5), [60], Hole(11)], max_denoising_steps=3)
    assert [len(h) for h in result.holes] == [5, 11]
    assert result.tokens[:2] == [50, 51] and result.tokens[7] == 60 and len(result.tokens) == 19


FINISHED: dict[int, int] = {}


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_every_finished_completion_is_valid_json_for_its_schema(model_and_tokenizer, index):
    """A random model is as weak as a model gets: the grammar alone must keep every finished output valid."""
    model, tok = model_and_tokenizer
    schema = SCHEMAS[index]
    grammar = grammar_from(json_schema=schema)
    prompt = tok.encode("Answer in JSON: ")
    FINISHED[index] = 0
    for seed in range(2):
        out = generate_structured(model, tok, prompt, grammar, generator=torch.Generator().manual_seed(seed),
                                  max_new_tokens=64, max_denoising_steps=8)
        new = out.sequences[0, len(prompt):].tolist()
        if 1 not in new:
            # Not finished within the budget: what was committed is still a valid prefix of the grammar.
            from llguidance import LLMatcher, LLTokenizer
            matcher = LLMatcher(LLTokenizer(tok.backend.to_str(), n_vocab=model.config.vocab_size, eos_token=1),
                                grammar, log_level=0)
            assert matcher.validate_tokens(new) == len(new)
            continue
        FINISHED[index] += 1
        value = json.loads(tok.decode(new[:new.index(1)]))
        jsonschema.validate(value, schema)


def test_most_schemas_finish_within_the_budget_even_with_a_random_model():
    assert len(FINISHED) == len(SCHEMAS), "runs after the per-schema test"
    finished_schemas = sum(1 for count in FINISHED.values() if count)
    assert finished_schemas >= len(SCHEMAS) // 2, FINISHED


def test_regex_and_grammar_errors(model_and_tokenizer):
    model, tok = model_and_tokenizer
    grammar = grammar_from(regex="(yes|no), [0-9]{3}")
    prompt = tok.encode("Q: ")
    out = generate_structured(model, tok, prompt, grammar, generator=torch.Generator().manual_seed(0),
                              max_new_tokens=16, max_denoising_steps=4)
    new = out.sequences[0, len(prompt):].tolist()
    import re
    assert re.fullmatch("(yes|no), [0-9]{3}", tok.decode(new[:new.index(1)]))
    with pytest.raises(GrammarError, match="exactly one"):
        grammar_from(json_schema={"type": "object"}, regex="x")
    with pytest.raises(GrammarError):
        grammar_from(lark="start: ???")
    with pytest.raises(ValueError, match="sampling='fast'"):
        model.generate(torch.tensor([prompt]), sampling="reference",
                       control=FixedTokens(torch.tensor([[5]]), model.config.canvas_length))


def test_strict_schema_closes_objects_that_do_not_say_otherwise():
    from dgemma.constraints import strict_schema
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}},
                                               "c": {"type": "object", "additionalProperties": True,
                                                     "properties": {"d": {}}},
                                               "e": {"type": "object"}}}
    strict = strict_schema(schema)
    assert strict["additionalProperties"] is False
    assert strict["properties"]["a"]["additionalProperties"] is False
    assert strict["properties"]["c"]["additionalProperties"] is True  # said otherwise
    assert "additionalProperties" not in strict["properties"]["e"]  # no listed properties: stays open
    assert "additionalProperties" not in schema  # the caller's schema is not modified
