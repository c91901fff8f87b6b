"""Between HTTP and the engine: requests to token ids and sequence requests, engine events to text deltas.

Design choices:
- Nothing here touches tensors: the scheduler owns the model and speaks token ids and plain settings.
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
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from ..constraints import GrammarError, grammar_from
from ..generation_config import GenerationConfig
from ..tasks import Hole, layout_infill, parse_infill_template
from ..tokenizer import THOUGHT_OPEN, Tokenizer
from .protocol import ChatRequest, CompletionRequest, DiffusionParameters
from .scheduler import Commit, Draft, Finish, Scheduler, SequenceRequest
from .settings import ServerSettings


class RequestError(ValueError):
    """A request that is well-formed JSON but cannot be served as asked (HTTP 400)."""


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
    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer, settings: ServerSettings,
                 defaults: GenerationConfig):
        self.scheduler, self.tokenizer, self.settings, self.defaults = scheduler, tokenizer, settings, defaults
        self.model_config = scheduler.model.config

    # ---- requests to sequences ------------------------------------------------------------------------------

    def config_for(self, request: DiffusionParameters, budget: int | None = None) -> GenerationConfig:
        """The request's generation settings; `budget` (new tokens) defaults to what the request asks for."""
        limit = self.settings.max_tokens
        budget = budget or request.token_budget or min(self.defaults.max_new_tokens or limit, limit)
        if budget > limit:
            raise RequestError(f"`max_tokens` {budget} exceeds this server's limit of {limit}")
        try:
            return self.defaults.updated(max_new_tokens=budget,
                                         **request.generation_overrides(self.defaults.t_min, self.defaults.t_max))
        except ValueError as err:
            raise RequestError(str(err)) from err

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise RequestError("the prompt is empty")
        if len(ids) > self.settings.max_prompt_tokens:
            raise RequestError(f"the prompt has {len(ids)} tokens; this server accepts at most "
                               f"{self.settings.max_prompt_tokens}")
        vocab = self.model_config.vocab_size
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
        ids, region, moved = layout_infill(self.tokenizer.encode(prefix), token_parts,
                                           self.model_config.canvas_length)
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
        """Submit n sequences per prompt, all or none (QueueFull)."""
        config = self.config_for(request)
        grammar = self.grammar(request)
        if grammar is not None and not (config.eos_token_ids or self.model_config.eos_token_ids):
            raise RequestError("response_format needs the model to have an EOS token")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        base_seed = request.seed if request.seed is not None else random.getrandbits(62)
        deadline = time.monotonic() + self.settings.timeout
        sequences = []
        for prompt in prompts:
            if prompt.region is not None:
                # The region is the whole budget, and EOS must not cut off the fixed text after a hole.
                choice_config = self.config_for(request, budget=len(prompt.region)).updated(eos_token_id=None,
                                                                                          pad_token_id=None)
            elif grammar is not None and not config.eos_token_ids:
                choice_config = config.updated(eos_token_id=self.model_config.eos_token_ids)
            else:
                choice_config = config
            for j in range(request.n):
                index = len(sequences)
                # Choice j of a seeded request uses seed + j, so choices differ and each is reproducible.
                sequences.append(SequenceRequest(
                    prompt=prompt.ids, config=choice_config, seed=base_seed + j, drafts=request.wants_drafts,
                    region=prompt.region, grammar=grammar if prompt.region is None else None, deadline=deadline,
                    on_event=lambda event, i=index: loop.call_soon_threadsafe(queue.put_nowait, (i, event))))
        self.scheduler.submit(sequences)
        return Generation(self.scheduler, sequences, queue)


def completion_tokens(event: Finish, eos_ids: list[int]) -> int:
    return sum(1 for t in event.generated if t not in eos_ids)


@dataclass
class Generation:
    """The sequences of one request and the queue their events arrive on."""

    scheduler: Scheduler
    sequences: list[SequenceRequest]
    queue: asyncio.Queue

    async def events(self) -> AsyncIterator[tuple[int, Commit | Draft | Finish]]:
        """(choice index, event) until every choice has finished; cancels what is left on exit."""
        remaining = len(self.sequences)
        try:
            while remaining:
                index, event = await self.queue.get()
                remaining -= isinstance(event, Finish)
                yield index, event
        finally:
            self.cancel()

    def cancel_choice(self, index: int) -> None:
        """End one choice early (a stop string ended it): its rows are freed at the next step."""
        self.scheduler.cancel(self.sequences[index])

    def cancel(self) -> None:
        for sequence in self.sequences:
            self.scheduler.cancel(sequence)
