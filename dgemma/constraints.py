"""Control over what a canvas may hold: fixed tokens (infilling) and grammars (structured output).

A `CanvasControl` takes over the acceptance rule of the fast sampler for one group of the engine (engine.py):
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
                 canvas_length: int, force_frontier: bool = True, greedy: bool = False):
        from llguidance import LLMatcher

        self.matchers = [LLMatcher(grammar_tokenizer, grammar, log_level=0) for _ in range(batch)]
        for matcher in self.matchers:
            if matcher.is_error():
                raise GrammarError(f"invalid grammar: {matcher.get_error()}")
        self.eos, self.vocab, self.length = eos_token_id, vocab_size, canvas_length
        # Ablation switch: without the frontier sample a step only keeps what the model proposed (no progress
        # guarantee, so `complete` does more of the work).
        self.force_frontier = force_frontier
        self.greedy = greedy  # the frontier takes the grammar's most likely token instead of a sample
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
                token = self._masked_sample(row, logits_at(row, frontier), generator, greedy=self.greedy)
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


def grammar_tokenizer(tokenizer, vocab_size: int, eos_token_id: int):
    """llguidance's view of a tokenizer (building it takes up to a second for a large vocabulary: keep it)."""
    from llguidance import LLTokenizer

    return LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=eos_token_id)
