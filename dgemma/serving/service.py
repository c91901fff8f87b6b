"""Between HTTP and the engine: prompts to token ids, engine events to OpenAI-shaped text deltas.

Design choices:
- Nothing here touches tensors; the engine owns the model and speaks token ids.
- Text is always re-decoded from all the choice's tokens and only the new suffix is sent, holding back an
  incomplete UTF-8 character and anything that could be the start of a stop string, so streamed deltas
  concatenate to exactly the final text.
- Gemma 4 thinking: the thought channel (`<|channel>thought ... <channel|>`) is split at the token level into
  `reasoning_content`; stop strings apply to the answer only.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import torch

from ..constraints import (FixedTokens, GrammarControl, GrammarError, Hole, grammar_from, grammar_tokenizer,
                           layout_infill, parse_infill_template)
from ..generation import GenerationConfig
from ..tokenizer import THOUGHT_OPEN, Tokenizer
from .engine import Commit, Draft, Engine, Finish, Sequence
from .protocol import ChatRequest, CompletionRequest, DiffusionParameters


class RequestError(ValueError):
    """A request that is well-formed JSON but cannot be served as asked (HTTP 400)."""


@dataclass
class Limits:
    max_prompt_tokens: int = 1536
    max_tokens: int = 512
    request_timeout: float = 300.0


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might begin a stop string (or an unfinished UTF-8 character)."""
    if text.endswith("\ufffd"):
        return 1
    keep = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                keep = max(keep, size)
                break
    return keep


@dataclass
class Prompt:
    ids: list[int]
    region: list[int] | None = None  # infilling: the tokens after the prompt, -1 where a hole is
    moved: int = 0  # infilling: prompt tokens moved into the region (not part of the answer)


@dataclass
class ChoiceText:
    """The text of one choice so far, and what of it has been sent."""

    tokenizer: Tokenizer
    stops: list[str]
    split_thinking: bool
    skip: int = 0  # leading generated tokens that are not part of the answer (infilling's moved prompt)
    ids: list[int] = field(default_factory=list)
    sent_content: int = 0
    sent_reasoning: int = 0
    stopped: bool = False

    def _parts(self) -> tuple[str | None, str]:
        ids = self.ids
        if self.split_thinking:
            opener = self.tokenizer.token_id("<|channel>")
            closer = self.tokenizer.token_id("<channel|>")
            if opener is not None and ids[:1] == [opener]:
                end = ids.index(closer) if closer in ids else len(ids)
                thought = self.tokenizer.decode(ids[1:end])
                label = THOUGHT_OPEN.removeprefix("<|channel>")  # "thought\n", the channel's name
                thought = thought.removeprefix(label) if thought.startswith(label) or not label.startswith(
                    thought) else ""  # while the label itself is still arriving, there is no thought text yet
                return thought, self.tokenizer.decode(ids[end + 1:])
        return None, self.tokenizer.decode(ids)

    def final_parts(self) -> tuple[str | None, str]:
        """(reasoning, content) of the finished choice, content cut at a stop string."""
        reasoning, content = self._parts()
        return reasoning, content[:self.sent_content] if self.stopped else content

    def add(self, tokens: list[int], final: bool) -> tuple[str, str]:
        """Append tokens; return the (reasoning, content) text that can be sent now."""
        dropped = min(self.skip, len(tokens))
        self.skip -= dropped
        self.ids.extend(tokens[dropped:])
        reasoning, content = self._parts()
        reasoning_delta = ""
        if reasoning is not None:
            ready = len(reasoning) if final else len(reasoning) - held_back(reasoning, [])
            reasoning_delta, self.sent_reasoning = reasoning[self.sent_reasoning:ready], max(self.sent_reasoning,
                                                                                           ready)
        for stop in self.stops:
            at = content.find(stop)
            if at >= 0:
                content, final, self.stopped = content[:at], True, True
        ready = len(content) if final else len(content) - held_back(content, self.stops)
        content_delta = content[self.sent_content:ready] if ready > self.sent_content else ""
        self.sent_content = max(self.sent_content, ready)
        return reasoning_delta, content_delta


class Service:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str, limits: Limits):
        self.engine, self.tokenizer, self.model_name, self.limits = engine, tokenizer, model_name, limits
        self.defaults: GenerationConfig = engine.model.generation_config
        self._grammar_tokenizers: dict[tuple[int, int], Any] = {}

    # ---- requests to sequences ------------------------------------------------------------------------------

    def config_for(self, request: DiffusionParameters) -> tuple[GenerationConfig, int]:
        budget = request.token_budget or min(self.defaults.max_new_tokens or self.limits.max_tokens,
                                             self.limits.max_tokens)
        if budget > self.limits.max_tokens:
            raise RequestError(f"`max_tokens` {budget} exceeds this server's limit of {self.limits.max_tokens}")
        try:
            config = self.defaults.updated(max_new_tokens=budget,
                                           **request.generation_overrides(self.defaults.t_min, self.defaults.t_max))
        except ValueError as err:
            raise RequestError(str(err)) from err
        return config, budget

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise RequestError("the prompt is empty")
        if len(ids) > self.limits.max_prompt_tokens:
            raise RequestError(f"the prompt has {len(ids)} tokens; this server accepts at most "
                               f"{self.limits.max_prompt_tokens}")
        vocab = self.engine.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise RequestError(f"the prompt holds token ids outside the vocabulary [0, {vocab})")

    def completion_prompts(self, request: CompletionRequest) -> list[Prompt]:
        prompt = request.prompt
        if request.infill:
            if not isinstance(prompt, str):
                raise RequestError("`infill` needs `prompt` to be one string with {{N}} holes")
            return [self._infill_prompt(prompt)]
        if isinstance(prompt, str):
            prompts = [self.tokenizer.encode(prompt)]
        elif all(isinstance(p, str) for p in prompt):
            prompts = [self.tokenizer.encode(p) for p in prompt]
        else:
            prompts = [list(prompt)]
        for ids in prompts:
            self._check_prompt(ids)
        return [Prompt(ids) for ids in prompts]

    def _infill_prompt(self, template: str) -> Prompt:
        try:
            parts = parse_infill_template(template)
        except ValueError as err:
            raise RequestError(str(err)) from err
        prefix = parts.pop(0) if isinstance(parts[0], str) else ""
        token_parts = [p if isinstance(p, Hole) else self.tokenizer.encode(p, add_special_tokens=False)
                       for p in parts]
        ids, region, moved = layout_infill(self.tokenizer.encode(prefix), token_parts, self.engine.config.canvas_length)
        self._check_prompt(ids)
        return Prompt(ids, region, moved)

    def grammar(self, request: DiffusionParameters) -> str | None:
        fmt = request.response_format
        if fmt is None or fmt.type == "text":
            return None
        try:
            if fmt.type == "json_object":
                return grammar_from(json_object=True)
            return grammar_from(json_schema=fmt.json_schema.schema_)
        except GrammarError as err:
            raise RequestError(f"response_format: {err}") from err

    def chat_prompt(self, request: ChatRequest) -> Prompt:
        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        for message in messages:
            if message["role"] == "developer":
                message["role"] = "system"
        try:
            ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True,
                                             **(request.chat_template_kwargs or {}))
        except ValueError as err:
            raise RequestError(str(err)) from err
        self._check_prompt(ids)
        return Prompt(ids)

    def start(self, request: DiffusionParameters, prompts: list[Prompt]) -> "Generation":
        """Submit n sequences per prompt (raises QueueFull, with nothing left queued, if they do not fit)."""
        config, budget = self.config_for(request)
        grammar = self.grammar(request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        base_seed = request.seed if request.seed is not None else random.getrandbits(62)
        deadline = time.monotonic() + self.limits.request_timeout
        canvas, vocab = self.engine.config.canvas_length, self.engine.config.vocab_size
        sequences = []
        for prompt in prompts:
            for j in range(request.n):
                index = len(sequences)
                choice_config, choice_budget, control = config, budget, None
                if prompt.region is not None:
                    # EOS must not cut off the fixed text after a hole.
                    control = FixedTokens(torch.tensor([prompt.region]), canvas)
                    choice_config = config.updated(eos_token_id=None, pad_token_id=None)
                    choice_budget = len(prompt.region)
                elif grammar is not None:
                    eos = (config.eos_token_ids or self.engine.config.eos_token_ids or [None])[0]
                    if eos is None:
                        raise RequestError("response_format needs the model to have an EOS token")
                    control = GrammarControl(grammar, self._grammar_tokenizer(vocab, eos), vocab, eos, 1, canvas)
                # Choice j of a seeded request uses seed + j, so choices differ and each is reproducible.
                sequences.append(Sequence(
                    prompt=prompt.ids, config=choice_config, generator=torch.Generator().manual_seed(base_seed + j),
                    max_new_tokens=choice_budget, want_drafts=request.wants_drafts, deadline=deadline,
                    control=control,
                    on_event=lambda event, i=index: loop.call_soon_threadsafe(queue.put_nowait, (i, event))))
        generation = Generation(self.engine, sequences, queue)
        try:
            for sequence in sequences:
                self.engine.submit(sequence)
        except BaseException:
            generation.cancel()
            raise
        return generation

    # ---- responses ------------------------------------------------------------------------------------------

    def _grammar_tokenizer(self, vocab: int, eos: int):
        key = (vocab, eos)
        if key not in self._grammar_tokenizers:
            self._grammar_tokenizers[key] = grammar_tokenizer(self.tokenizer, vocab, eos)
        return self._grammar_tokenizers[key]

    def envelope(self, kind: str, created: int, request_id: str) -> dict[str, Any]:
        return {"id": request_id, "object": kind, "created": created, "model": self.model_name}

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:24]}"

    def finish_reason(self, event: Finish, text: ChoiceText) -> str:
        if text.stopped:
            return "stop"
        return {"stop": "stop", "length": "length"}.get(event.reason, event.reason)

    def draft_payload(self, event: Draft) -> dict[str, Any]:
        return {"canvas": event.canvas_index, "step": event.step, "tokens": event.argmax,
                "text": self.tokenizer.decode(event.argmax), "accepted": event.accepted,
                "pieces": [self.tokenizer.decode([t]) for t in event.argmax],
                "entropy": [round(e, 4) for e in event.entropy]}


def completion_tokens(event: Finish, eos_ids: list[int]) -> int:
    return sum(1 for t in event.generated if t not in eos_ids)




@dataclass
class Generation:
    """The sequences of one request and the queue their events arrive on."""

    engine: Engine
    sequences: list[Sequence]
    queue: asyncio.Queue

    async def events(self) -> AsyncIterator[tuple[int, Sequence, Commit | Draft | Finish]]:
        """(choice index, its sequence, event) until every choice has finished; cancels what is left on exit."""
        remaining = len(self.sequences)
        try:
            while remaining:
                index, event = await self.queue.get()
                remaining -= isinstance(event, Finish)
                yield index, self.sequences[index], event
        finally:
            self.cancel()

    def cancel(self) -> None:
        for sequence in self.sequences:
            self.engine.cancel(sequence)
