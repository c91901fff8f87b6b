"""Task-level calls on the canvas: infilling between fixed text, and generation under a grammar.

They lay out the request as token ids and run `generate` with a canvas control from constraints.py.
`layout_infill` and `parse_infill_template` are pure (lists and strings), so the server uses them too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from .constraints import FixedTokens, GrammarControl, GrammarError, grammar_tokenizer
from .generation import GenerationOutput, generate


@dataclass
class Hole:
    """A gap of exactly `size` tokens for the model to fill."""

    size: int

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size <= 0:
            raise ValueError(f"a hole needs a positive token count, got {self.size!r}")


def layout_infill(prompt: list[int], parts: list[list[int] | Hole], canvas_length: int
                  ) -> tuple[list[int], list[int], int]:
    """(prompt to encode, region with -1 at free positions, how many prompt tokens moved into the region).

    Trailing prompt tokens move into the first canvas as fixed tokens so that the region ends on a canvas
    boundary: text after a hole then lands in the hole's canvas whenever it fits, where the decoder sees it
    (a canvas never sees later canvases). At least one prompt token stays to be encoded."""
    if not prompt:
        raise ValueError("infilling needs a non-empty prompt (at least BOS)")
    region: list[int] = []
    for part in parts:
        region += [-1] * part.size if isinstance(part, Hole) else list(part)
    if not any(isinstance(p, Hole) for p in parts):
        raise ValueError("infilling needs at least one hole")
    moved = min((-len(region)) % canvas_length, len(prompt) - 1)
    return prompt[:len(prompt) - moved], prompt[len(prompt) - moved:] + region, moved


@dataclass
class InfillResult:
    tokens: list[int]  # the region after the prompt, fixed parts and filled holes
    holes: list[list[int]]  # what each hole was filled with


def infill(model, prompt: list[int], parts: list[list[int] | Hole], generator: torch.Generator | None = None,
           **overrides: Any) -> InfillResult:
    """Fill the holes between fixed segments after `prompt`. Overrides are generation settings."""
    encoded, region, moved = layout_infill(prompt, parts, model.config.canvas_length)
    control = FixedTokens(torch.tensor([region]), model.config.canvas_length)
    # No EOS handling: an EOS the model puts in a hole must not cut off the fixed text after it.
    out = generate(model, torch.tensor([encoded]), generator=generator, control=control,
                   **{"eos_token_id": None, "pad_token_id": None, **overrides, "max_new_tokens": len(region)})
    filled = out.sequences[0, len(encoded) + moved:].tolist()
    holes, cursor = [], 0
    for part in parts:
        size = part.size if isinstance(part, Hole) else len(part)
        if isinstance(part, Hole):
            holes.append(filled[cursor:cursor + size])
        cursor += size
    return InfillResult(tokens=filled, holes=holes)


def parse_infill_template(text: str) -> list[str | Hole]:
    """'The {{8}} sat on the {{4}}.' -> ['The ', Hole(8), ' sat on the ', Hole(4), '.']; write '{{{{' for '{{'."""
    parts: list[str | Hole] = []
    cursor = 0
    for match in re.finditer(r"\{\{(\d+)\}\}", text):
        parts.append(text[cursor:match.start()])
        parts.append(Hole(int(match.group(1))))
        cursor = match.end()
    parts.append(text[cursor:])
    if not any(isinstance(p, Hole) for p in parts):
        raise ValueError("the infill template has no hole; mark one with {{N}} (N tokens)")
    return [p for p in parts if p != ""]


def infill_text(model, tokenizer, template: str, generator: torch.Generator | None = None,
                **overrides: Any) -> tuple[str, list[str]]:
    """Fill a '{{N}}' template; the text before the first hole is the prompt. Returns (full text, hole texts)."""
    parts = parse_infill_template(template)
    prompt_text = parts.pop(0) if isinstance(parts[0], str) else ""
    prompt = tokenizer.encode(prompt_text)
    token_parts = [p if isinstance(p, Hole) else tokenizer.encode(p, add_special_tokens=False) for p in parts]
    result = infill(model, prompt, token_parts, generator=generator, **overrides)
    holes = [tokenizer.decode(h) for h in result.holes]
    return prompt_text + tokenizer.decode(result.tokens), holes


def generate_structured(model, tokenizer, prompt: list[int], grammar: str, generator: torch.Generator | None = None,
                        force_frontier: bool = True, **overrides: Any) -> GenerationOutput:
    """Generate after `prompt` under an llguidance grammar (see `grammar_from`); returns the GenerationOutput."""
    config = model.generation_config.updated(**overrides)
    eos = (config.eos_token_ids or model.config.eos_token_ids or [None])[0]
    if eos is None:
        raise GrammarError("structured output needs an EOS token id to end the completion")
    control = GrammarControl(grammar, grammar_tokenizer(tokenizer, model.config.vocab_size, eos),
                             model.config.vocab_size, eos, 1, model.config.canvas_length, force_frontier,
                             greedy=not config.do_sample)
    return generate(model, torch.tensor([prompt]), generation_config=config, generator=generator, control=control)
