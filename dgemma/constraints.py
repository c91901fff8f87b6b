"""Control over what a canvas may hold: fixed tokens (infilling) and grammars (structured output).

A `CanvasControl` takes over the acceptance rule of the fast sampler for one generation:
- `begin(canvas_index, canvas)` writes what is fixed into a fresh canvas;
- `accept(...)` turns a step's proposals into the accepted positions (and says which rows are ready to stop);
- `complete(...)` finishes a canvas the step budget left unfinished;
- `commit(canvas_index, tokens)` records the committed canvas.

Design choices:
- Infilling (`FixedTokens`): fixed positions are written once, never sampled, never renoised; they count as
  accepted with zero entropy, so they use none of the entropy bound and do not make a canvas look unsure. Every
  other position denoises around them with full bidirectional attention (the decoder sees them as canvas
  tokens). The model has no mask token, so holes have exact lengths.
- Grammars (`GrammarControl`, with llguidance): the canvas is frozen from the left. Each step extends the frozen
  prefix with the longest run of accepted proposals the grammar allows, then samples the first position past it
  from the model's distribution masked by the grammar (so every step gains at least one token), and keeps
  extending while the following accepted proposals stay valid. Everything past the prefix is renoised. A
  canvas is ready when its prefix fills it or the grammar is complete (the rest is EOS). Committed text is
  therefore always a valid prefix of the grammar's language, and a finished completion is valid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from .sampling import StepResult, entropy_bound_acceptance


class CanvasControl(Protocol):
    def begin(self, canvas_index: int, canvas: torch.Tensor) -> torch.Tensor: ...

    def accept(self, canvas_index: int, canvas: torch.Tensor, result: StepResult, bound: float,
               logits_at: "LogitsAt", generator: torch.Generator | None
               ) -> tuple[StepResult, torch.Tensor, torch.Tensor]: ...

    def complete(self, canvas_index: int, argmax: torch.Tensor, logits_at: "LogitsAt") -> torch.Tensor: ...

    def commit(self, canvas_index: int, tokens: torch.Tensor) -> None: ...


class LogitsAt(Protocol):
    def __call__(self, row: int, position: int) -> torch.Tensor:
        """Processed (soft-capped, tempered) fp32 logits [V] of one canvas position at the current step."""


# ---- infilling ------------------------------------------------------------------------------------------------

@dataclass
class FixedTokens:
    """Tokens fixed at given positions of the generated region: `values` [B, N] with -1 where free."""

    values: torch.Tensor
    canvas_length: int
    current: torch.Tensor | None = field(default=None, init=False)  # the canvas being denoised, set by `begin`

    def begin(self, canvas_index: int, canvas: torch.Tensor) -> torch.Tensor:
        start = canvas_index * self.canvas_length
        fixed = self.values[:, start:start + self.canvas_length]
        if fixed.shape[1] < self.canvas_length:  # past the fixed region everything is free
            fixed = F.pad(fixed, (0, self.canvas_length - fixed.shape[1]), value=-1)
        self.current = fixed.to(canvas.device)
        return torch.where(self.current >= 0, self.current, canvas)

    def accept(self, canvas_index, canvas, result, bound, logits_at, generator):
        fixed = self.current
        is_fixed = fixed >= 0
        result = replace(result, sampled=torch.where(is_fixed, fixed, result.sampled),
                         argmax=torch.where(is_fixed, fixed, result.argmax),
                         entropy=torch.where(is_fixed, torch.zeros_like(result.entropy), result.entropy))
        accepted = entropy_bound_acceptance(result.entropy, bound) | is_fixed
        return result, accepted, torch.ones(canvas.shape[0], dtype=torch.bool, device=canvas.device)

    def complete(self, canvas_index, argmax, logits_at):
        return torch.where(self.current >= 0, self.current, argmax)

    def commit(self, canvas_index, tokens):
        pass


# ---- grammars -------------------------------------------------------------------------------------------------

class GrammarError(ValueError):
    """A grammar, schema or regex that cannot be compiled."""


def strict_schema(schema: Any) -> Any:
    """A copy of a JSON schema where objects that do not say otherwise allow no properties beyond those listed,
    as OpenAI's strict structured outputs do. Every document it accepts is valid for the original schema; it
    stops a model from wandering off into invented keys (objects with no listed properties stay open)."""
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict_schema(value) for key, value in schema.items()}
    if isinstance(out.get("properties"), dict) and out["properties"] and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def grammar_from(json_schema: dict | str | None = None, regex: str | None = None, lark: str | None = None,
                 json_object: bool = False, strict: bool = True) -> str:
    """An llguidance grammar from exactly one of: a JSON schema (made strict, see `strict_schema`, unless
    `strict=False`), a regex, a Lark grammar, or any JSON object."""
    from llguidance import LLMatcher

    given = [x for x in (json_schema, regex, lark) if x is not None] + ([True] if json_object else [])
    if len(given) != 1:
        raise GrammarError("give exactly one of json_schema, regex, lark or json_object")
    if json_object:
        json_schema = {"type": "object"}
    if json_schema is not None:
        try:
            schema = json.loads(json_schema) if isinstance(json_schema, str) else json_schema
            schema = strict_schema(schema) if strict else schema
            grammar = LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except (ValueError, TypeError) as err:
            raise GrammarError(f"invalid JSON schema: {err}") from err
    elif regex is not None:
        grammar = LLMatcher.grammar_from_regex(regex)
    else:
        grammar = LLMatcher.grammar_from_lark(lark)
    problem = LLMatcher.validate_grammar(grammar)
    if problem and not problem.startswith("WARNING"):
        raise GrammarError(f"invalid grammar: {problem}")
    return grammar


class GrammarControl:
    """Keeps every committed token inside a grammar's language, one matcher per row."""

    def __init__(self, grammar: str, grammar_tokenizer: Any, vocab_size: int, eos_token_id: int, batch: int,
                 canvas_length: int, force_frontier: bool = True):
        from llguidance import LLMatcher

        self.matchers = [LLMatcher(grammar_tokenizer, grammar, log_level=0) for _ in range(batch)]
        for matcher in self.matchers:
            if matcher.is_error():
                raise GrammarError(f"invalid grammar: {matcher.get_error()}")
        self.eos, self.vocab, self.length = eos_token_id, vocab_size, canvas_length
        # Ablation switch: without the frontier sample a step only keeps what the model proposed (no progress
        # guarantee, so `complete` does more of the work).
        self.force_frontier = force_frontier
        self.frozen: list[list[int]] = [[] for _ in range(batch)]
        self.canvas_matchers: list[Any] = []

    def begin(self, canvas_index: int, canvas: torch.Tensor) -> torch.Tensor:
        self.frozen = [[] for _ in self.matchers]
        self.canvas_matchers = [m.deep_copy() for m in self.matchers]
        return canvas

    def _masked_sample(self, row: int, logits: torch.Tensor, generator: torch.Generator | None,
                       greedy: bool) -> int:
        matcher = self.canvas_matchers[row]
        if matcher.is_stopped() or matcher.is_error():
            return self.eos
        allowed = torch.frombuffer(bytearray(matcher.compute_logit_bias()), dtype=torch.uint8)[:self.vocab] > 0
        if not bool(allowed.any()):
            return self.eos
        masked = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
        if greedy:
            return int(masked.argmax())
        return int(torch.multinomial(torch.softmax(masked, dim=-1), 1, generator=generator))

    def _extend(self, row: int, tokens: list[int]) -> int:
        """Freeze the longest valid prefix of `tokens`; return how many were taken."""
        matcher = self.canvas_matchers[row]
        count = matcher.validate_tokens(tokens) if tokens else 0
        if count:
            matcher.consume_tokens(tokens[:count])
            self.frozen[row].extend(tokens[:count])
        return count

    def _fill_after_completion(self, row: int) -> bool:
        """Once the grammar is complete, the rest of the canvas is EOS. Returns whether the canvas is full."""
        matcher = self.canvas_matchers[row]
        if matcher.is_stopped() or (self.frozen[row] and self.frozen[row][-1] == self.eos):
            self.frozen[row].extend([self.eos] * (self.length - len(self.frozen[row])))
        return len(self.frozen[row]) >= self.length

    def accept(self, canvas_index, canvas, result, bound, logits_at, generator):
        accepted = entropy_bound_acceptance(result.entropy, bound)
        rows = canvas.shape[0]
        sampled, argmax = result.sampled.clone(), result.argmax.clone()
        entropy = result.entropy.clone()
        keep = torch.zeros_like(accepted)
        ready = torch.zeros(rows, dtype=torch.bool, device=canvas.device)
        for row in range(rows):
            proposals, taken = sampled[row].tolist(), accepted[row].tolist()
            for attempt in range(2):  # proposals up to the frontier, one masked sample, proposals after it
                if self._fill_after_completion(row):
                    break
                position = len(self.frozen[row])
                run = []
                while position + len(run) < self.length and taken[position + len(run)]:
                    run.append(proposals[position + len(run)])
                self._extend(row, run)
                if self._fill_after_completion(row) or attempt == 1 or not self.force_frontier:
                    break
                frontier = len(self.frozen[row])
                token = self._masked_sample(row, logits_at(row, frontier), generator, greedy=False)
                self._extend(row, [token])
                if token == self.eos:
                    self._fill_after_completion(row)
            prefix = torch.tensor(self.frozen[row], dtype=torch.long, device=canvas.device)
            n = prefix.numel()
            sampled[row, :n], argmax[row, :n], entropy[row, :n] = prefix, prefix, 0.0
            keep[row, :n] = True
            ready[row] = n >= self.length
        return replace(result, sampled=sampled, argmax=argmax, entropy=entropy), keep, ready

    def complete(self, canvas_index, argmax, logits_at):
        """Fill what the step budget left open, greedily under the grammar, from the last step's logits."""
        out = argmax.clone()
        for row in range(argmax.shape[0]):
            while not self._fill_after_completion(row):
                token = self._masked_sample(row, logits_at(row, len(self.frozen[row])), None, greedy=True)
                if not self._extend(row, [token]):
                    raise GrammarError(f"the grammar engine refused token {token}, which its own mask allowed")
            out[row] = torch.tensor(self.frozen[row][:self.length], dtype=torch.long)
        return out

    def commit(self, canvas_index, tokens):
        self.matchers = self.canvas_matchers


# ---- the high-level calls ---------------------------------------------------------------------------------------

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
    from .generation import generate

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
    import re

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


def grammar_tokenizer(tokenizer, vocab_size: int, eos_token_id: int):
    """llguidance's view of a tokenizer (building it takes up to a second for a large vocabulary: keep it)."""
    from llguidance import LLTokenizer

    return LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=eos_token_id)


def generate_structured(model, tokenizer, prompt: list[int], grammar: str, generator: torch.Generator | None = None,
                        force_frontier: bool = True, **overrides: Any):
    """Generate after `prompt` under an llguidance grammar (see `grammar_from`); returns the GenerationOutput."""
    from .generation import generate

    config = model.generation_config.updated(**overrides)
    eos = (config.eos_token_ids or model.config.eos_token_ids or [None])[0]
    if eos is None:
        raise GrammarError("structured output needs an EOS token id to end the completion")
    control = GrammarControl(grammar, grammar_tokenizer(tokenizer, model.config.vocab_size, eos),
                             model.config.vocab_size, eos, 1, model.config.canvas_length, force_frontier)
    return generate(model, torch.tensor([prompt]), generation_config=config, generator=generator, control=control)
