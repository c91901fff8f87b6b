"""Between HTTP and the engine: requests to token ids and sequence requests, engine events to text deltas.

Design choices:
- Nothing here touches tensors: the scheduler owns the model and speaks token ids and plain settings.
- Text is always re-decoded from all the choice's tokens and only the new suffix is sent, holding back an
  incomplete UTF-8 character and anything that could be the start of a stop string, so streamed deltas
  concatenate to exactly the final text.
- Gemma 4 thinking: the thought channel (`<|channel>thought ... <channel|>`) is split at the token level into
  `reasoning_content`; stop strings apply to the answer only.
- Sizes before work: `check` (on the event loop, cheap) measures what a request asks for (sequences against the
  queue, prompt bytes, token-id prompt lengths, max_tokens) before anything is tokenised or laid out; `plan`
  (tokenising, chat templates, infill layout, grammars) then runs in a small thread pool, off the event loop,
  with hole sizes checked before a region is built.
- Every budget applies to every route: an infill region (holes, the fixed text between them, and the prompt
  tokens moved onto the canvas) must fit the request's max_tokens and the server's.
- `temperature: 0` takes the argmax at every position (do_sample=False); without a `seed` it also uses seed 0, so
  that the answer is reproducible (the initial canvas and renoising still draw random tokens).
- Log-probabilities ride along with the tokens: a choice keeps one entry per token it holds (`ChoiceText.entries`),
  and `TokenPieces` gives each token's text and bytes as OpenAI spells them (a token that is part of a UTF-8
  character is `bytes:\\xe2\\x80`, its `bytes` exact). The entries of a choice's content are those of its content
  tokens (not the thought channel, not EOS or other special tokens), cut where a stop string cut the text.
- A prompt past the server's context (tokens, messages or bytes) is a 400 with `code: context_length_exceeded`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator

from ..constraints import GrammarError, grammar_from
from ..generation_config import GenerationConfig
from ..tasks import Hole, layout_infill, parse_infill_template
from ..tokenizer import THOUGHT_OPEN, Tokenizer
from .protocol import ChatMessage, ChatRequest, CompletionRequest, DiffusionParameters
from .scheduler import Commit, Draft, Finish, Scheduler, SequenceRequest
from .settings import ServerSettings

logger = logging.getLogger(__name__)

SEED_MODULUS = 1 << 64  # choice j of a request seeded s uses (s + j) mod 2**64, as a torch generator reads s


CONTEXT = "context_length_exceeded"  # OpenAI's code for a prompt past the context


class RequestError(ValueError):
    """A request that is well-formed JSON but cannot be served as asked (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def named_field(message: str) -> str | None:
    """The field an error names, for `param`: the first `name` in backquotes, else the place it starts with
    ("prompt.1: ..." names `prompt`), else None."""
    found = re.search(r"`(\w+)`", message) or re.match(r"([A-Za-z_]\w*)[.:]", message)
    return found.group(1) if found else None


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a byte-level BPE piece uses for each byte."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
        range(ord("\xae"), ord("\xff") + 1))
    codes, extra = list(kept), 0
    for byte in range(256):
        if byte not in kept:
            kept.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(kept, codes)}


class TokenPieces:
    """Each token's bytes and its text as OpenAI's logprobs spell it, computed once per token id."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        decoder = (json.loads(tokenizer.backend.to_str()).get("decoder") or {})
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders") or []}
        self.byte_level = "ByteLevel" in kinds
        self.bytes_of = _byte_decoder() if self.byte_level else {}
        self.special = {int(i) for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        if token not in self._cache:
            self._cache[token] = self._piece(token)
        return self._cache[token]

    def _piece(self, token: int) -> tuple[str, list[int]]:
        piece = self.tokenizer.backend.id_to_token(token) or ""
        fallback = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if token in self.special:
            raw = piece.encode()
        elif fallback:
            raw = bytes([int(fallback.group(1), 16)])
        elif self.byte_level and all(c in self.bytes_of for c in piece):
            raw = bytes(self.bytes_of[c] for c in piece)
        else:
            raw = piece.replace("\u2581", " ").encode()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # part of a character
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text, list(raw)

    def counts(self, token: int) -> bool:
        """Whether a token belongs in a choice's logprobs (not a special token: EOS, control tokens)."""
        return token not in self.special


def finite(logprob: float) -> float:
    """A log-probability JSON can carry: -inf (outside a top_k/top_p truncation) as -9999.0, as vLLM does."""
    return logprob if math.isfinite(logprob) else -9999.0


@dataclass
class Entry:
    """One token's log-probability and the most likely tokens at its position."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


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
    entries: list[Entry] = field(default_factory=list)  # with logprobs: one per token of `ids`
    sent_content: int = 0
    sent_reasoning: int = 0
    sent_entries: int = 0  # content entries already streamed
    stopped: bool = False

    def _thought_end(self) -> int | None:
        """Where the thought channel ends in `ids` (its closing token, or the end so far), if the choice opens one."""
        if self.split_thinking:
            opener = self.tokenizer.token_id("<|channel>")
            closer = self.tokenizer.token_id("<channel|>")
            if opener is not None and self.ids[:1] == [opener]:
                return self.ids.index(closer) if closer in self.ids else len(self.ids)
        return None

    def _content_start(self) -> int:
        """Where the content's tokens start in `ids` (after a thought channel, when there is one)."""
        end = self._thought_end()
        return 0 if end is None else end + 1

    def _parts(self) -> tuple[str | None, str]:
        ids, end = self.ids, self._thought_end()
        if end is not None:
            thought = self.tokenizer.decode(ids[1:end])
            label = THOUGHT_OPEN.removeprefix("<|channel>")  # "thought\n", the channel's name
            thought = thought.removeprefix(label) if thought.startswith(label) or not label.startswith(
                thought) else ""  # while the label itself is still arriving, there is no thought text yet
            return thought, self.tokenizer.decode(ids[end + 1:])
        return None, self.tokenizer.decode(ids)

    def reasoning_tokens(self) -> int:
        """Tokens of the thought channel (its markers included)."""
        end = self._thought_end()
        return 0 if end is None else min(end + 1, len(self.ids))

    def content_entries(self, pieces: TokenPieces) -> list[Entry]:
        """The log-probability entries of the content's tokens, cut where a stop string cut the text."""
        entries = [e for e in self.entries[self._content_start():] if pieces.counts(e.token)]
        if not self.stopped:
            return entries
        limit, offset, kept = len(self.final_parts()[1].encode()), 0, []
        for entry in entries:
            if offset >= limit:
                break
            kept.append(entry)
            offset += len(pieces(entry.token)[1])
        return kept

    def new_entries(self, pieces: TokenPieces) -> list[Entry]:
        """The content entries not streamed yet (all of them once the choice has ended)."""
        entries = self.content_entries(pieces)
        fresh, self.sent_entries = entries[self.sent_entries:], len(entries)
        return fresh

    def final_parts(self) -> tuple[str | None, str]:
        """(reasoning, content) of the finished choice, content cut at a stop string."""
        reasoning, content = self._parts()
        return reasoning, content[:self.sent_content] if self.stopped else content

    def add(self, tokens: list[int], final: bool, logprobs: list[float] | None = None,
            top: list[list[tuple[int, float]]] | None = None) -> tuple[str, str]:
        """Append tokens (with their log-probabilities, if any); return the (reasoning, content) text that can be
        sent now."""
        dropped = min(self.skip, len(tokens))
        self.skip -= dropped
        self.ids.extend(tokens[dropped:])
        if logprobs is not None:
            self.entries.extend(Entry(token, value, alternatives) for token, value, alternatives in zip(
                tokens[dropped:], logprobs[dropped:], (top or [])[dropped:]))
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


@dataclass
class Plan:
    """A request made ready to queue: its prompts and the settings of each (built off the event loop)."""

    prompts: list[Prompt]
    configs: list[GenerationConfig]  # one per prompt
    grammar: str | None


def utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def message_bytes(message: ChatMessage) -> int:
    parts = [message.content] if isinstance(message.content, str) else [p["text"] for p in message.content or []]
    return sum(utf8_size(t) for t in parts + [message.name or "", message.reasoning_content or ""])


# Settings only a canvas has: refused with `decode: autoregressive`.
DIFFUSION_ONLY = ("max_denoising_steps", "entropy_bound", "t_min", "t_max", "confidence_threshold",
                  "stability_threshold", "infill", "response_format")


class Service:
    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer, settings: ServerSettings,
                 defaults: GenerationConfig, workers: int = 2):
        self.scheduler, self.tokenizer, self.settings, self.defaults = scheduler, tokenizer, settings, defaults
        self.model_config = scheduler.model.config
        self.pieces = TokenPieces(tokenizer)
        # Tokenising, chat templates, infill layout and grammars run here, never on the event loop.
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dgemma-prepare")

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ---- sizes first (event loop, cheap) ---------------------------------------------------------------------

    def budget(self, request: DiffusionParameters) -> int:
        """The request's new-token budget, within the server's limit."""
        limit = self.settings.max_tokens
        asked = request.token_budget
        if asked is not None and asked > limit:
            raise RequestError(f"`max_tokens` {asked} exceeds this server's limit of {limit}", "max_tokens")
        return asked or min(self.defaults.max_new_tokens or limit, limit)

    def _check_bytes(self, size: int, what: str, param: str) -> None:
        if size > self.settings.max_prompt_bytes:
            raise RequestError(f"{what} has {size} bytes; this server accepts at most {self.settings.max_prompt_bytes} "
                               "(--max-prompt-bytes)", param, CONTEXT)

    def check(self, request: CompletionRequest | ChatRequest) -> int:
        """Refuse what cannot be served from its sizes alone, before any work: RequestError (400), NeverFits
        (400), QueueFull (429). Returns the number of sequences the request makes."""
        self.budget(request)
        if request.decode == "autoregressive":
            canvas_only = [name for name in DIFFUSION_ONLY if getattr(request, name, None) not in (None, False)]
            canvas_only += ["stream_options.include_drafts"] if request.wants_drafts else []
            canvas_only += ["logprobs"] if request.logprobs else []
            if canvas_only:
                raise RequestError(f"`{canvas_only[0]}` does not apply to `decode: autoregressive` (it writes token "
                                   "by token, with no canvas)", canvas_only[0])
        chat = isinstance(request, ChatRequest)
        prompt = None if chat else request.prompt
        prompts = 1 if chat or isinstance(prompt, str) or not isinstance(prompt[0], str) else len(prompt)
        self.scheduler.check_size(prompts * request.n)  # before measuring each of 150k prompts
        if chat:
            if len(request.messages) > self.settings.max_prompt_tokens:  # every message renders as a token or more
                raise RequestError(f"the conversation has {len(request.messages)} messages; this server accepts at "
                                   f"most {self.settings.max_prompt_tokens} prompt tokens", "messages", CONTEXT)
            self._check_bytes(sum(message_bytes(m) for m in request.messages), "the conversation", "messages")
        elif isinstance(prompt, str):
            self._check_bytes(utf8_size(prompt), "the infill template" if request.infill else "the prompt", "prompt")
        elif isinstance(prompt[0], str):
            for i, text in enumerate(prompt):
                self._check_bytes(utf8_size(text), f"prompt {i}", "prompt")
        elif len(prompt) > self.settings.max_prompt_tokens:
            raise RequestError(f"the prompt has {len(prompt)} tokens; this server accepts at most "
                               f"{self.settings.max_prompt_tokens}", "prompt", CONTEXT)
        vocab = self.model_config.vocab_size
        if request.logit_bias and any(int(token) >= vocab for token in request.logit_bias):
            raise RequestError(f"`logit_bias` names token ids outside the vocabulary [0, {vocab})", "logit_bias")
        self.scheduler.check_room(prompts * request.n)  # 429 last: what can never be served is a 400 first
        return prompts * request.n

    async def plan(self, request: CompletionRequest | ChatRequest) -> Plan:
        """`check`, then the request's prompts and settings, worked out in the thread pool."""
        self.check(request)
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._plan, request)

    # ---- requests to sequences (thread pool) -----------------------------------------------------------------

    def _plan(self, request: CompletionRequest | ChatRequest) -> Plan:
        config = self.config_for(request)
        prompts = [self.chat_prompt(request)] if isinstance(request, ChatRequest) else self.completion_prompts(request)
        grammar = self.grammar(request)
        if grammar is not None and not (config.eos_token_ids or self.model_config.eos_token_ids):
            raise RequestError("response_format needs the model to have an EOS token", "response_format")
        configs = []
        for prompt in prompts:
            if prompt.region is not None:
                # The region is the whole budget, and EOS must not cut off the fixed text after a hole.
                configs.append(self.config_for(request, budget=len(prompt.region)).updated(eos_token_id=None,
                                                                                             pad_token_id=None))
            elif grammar is not None and not config.eos_token_ids:
                configs.append(config.updated(eos_token_id=self.model_config.eos_token_ids))
            else:
                configs.append(config)
        return Plan(prompts, configs, grammar)

    def config_for(self, request: DiffusionParameters, budget: int | None = None) -> GenerationConfig:
        """The request's generation settings; `budget` (new tokens) defaults to what the request asks for."""
        budget = budget or self.budget(request)
        try:
            return self.defaults.updated(max_new_tokens=budget,
                                         **request.generation_overrides(self.defaults.t_min, self.defaults.t_max))
        except ValueError as err:
            raise RequestError(str(err), named_field(str(err))) from err

    def _check_prompt(self, ids: list[int], param: str = "prompt") -> None:
        if not ids:
            raise RequestError("the prompt is empty", param)
        if len(ids) > self.settings.max_prompt_tokens:
            raise RequestError(f"the prompt has {len(ids)} tokens; this server accepts at most "
                               f"{self.settings.max_prompt_tokens}", param, CONTEXT)
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise RequestError(f"the prompt holds token ids outside the vocabulary [0, {vocab})", param)

    def completion_prompts(self, request: CompletionRequest) -> list[Prompt]:
        prompt = request.prompt
        if request.infill:
            if not isinstance(prompt, str):
                raise RequestError("`infill` needs `prompt` to be one string with {{N}} holes", "prompt")
            return [self._infill_prompt(prompt, request.token_budget or self.settings.max_tokens)]
        if isinstance(prompt, str):
            prompts = [self.tokenizer.encode(prompt)]
        elif all(isinstance(p, str) for p in prompt):
            prompts = [self.tokenizer.encode(p) for p in prompt]
        else:
            prompts = [list(prompt)]
        for ids in prompts:
            self._check_prompt(ids)
        return [Prompt(ids) for ids in prompts]

    def _infill_prompt(self, template: str, budget: int) -> Prompt:
        """The template's prompt and region; the holes are measured against `budget` before anything is built."""
        if re.search(r"\{\{0*[1-9]\d{9,}\}\}", template):  # not even worth converting to a number
            raise RequestError(f"a hole of the template is larger than max_tokens allows ({budget})", "prompt")
        try:
            parts = parse_infill_template(template)
        except ValueError as err:  # no hole, or a hole of size 0
            raise RequestError(str(err), "prompt") from err
        holes = sum(p.size for p in parts if isinstance(p, Hole))
        if holes > budget:
            raise RequestError(f"the template's holes need {holes} tokens; max_tokens allows {budget}", "prompt")
        prefix = parts.pop(0) if isinstance(parts[0], str) else ""
        token_parts = [p if isinstance(p, Hole) else self.tokenizer.encode(p, add_special_tokens=False)
                       for p in parts]
        prompt = self.tokenizer.encode(prefix)
        self._check_prompt(prompt)
        canvas = self.model_config.canvas_length
        region = sum(p.size if isinstance(p, Hole) else len(p) for p in token_parts)
        region += min((-region) % canvas, len(prompt) - 1)  # the prompt tokens moved onto the first canvas
        if region > budget:
            raise RequestError(f"the infill region needs {region} tokens (holes, the text between and after them, "
                               f"and prompt tokens moved onto the canvas); max_tokens allows {budget}", "prompt")
        ids, region_ids, moved = layout_infill(prompt, token_parts, canvas)
        return Prompt(ids, region_ids, moved)

    def grammar(self, request: DiffusionParameters) -> str | None:
        fmt = request.response_format
        if fmt is None or fmt.type == "text":
            return None
        try:
            if fmt.type == "json_object":
                return grammar_from(json_object=True)
            return grammar_from(json_schema=fmt.json_schema.schema_)
        except (GrammarError, RecursionError) as err:
            raise RequestError(f"response_format: {err}", "response_format") from err

    def chat_prompt(self, request: ChatRequest) -> Prompt:
        if self.tokenizer.chat_template is None:
            raise RequestError("this model has no chat template; use /v1/completions", "messages")
        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        for message in messages:
            if message["role"] == "developer":
                message["role"] = "system"
        try:
            ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True,
                                             **(request.chat_template_kwargs or {}))
        except ValueError as err:  # the template raised, or refused the conversation
            raise RequestError(str(err), "messages") from err
        except Exception as err:  # the checkpoint's template failed on these inputs in some other way
            logger.warning("the chat template failed: %r", err)
            raise RequestError("the chat template could not render these messages", "messages") from err
        self._check_prompt(ids, "messages")
        return Prompt(ids)

    # ---- queueing (event loop) ---------------------------------------------------------------------------------

    def start(self, request: DiffusionParameters, plan: Plan) -> "Generation":
        """Submit n sequences per prompt, all or none (NeverFits, QueueFull)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        if request.seed is not None:
            base_seed = request.seed
        else:
            base_seed = 0 if request.temperature == 0 else random.getrandbits(62)
        deadline = time.monotonic() + self.settings.timeout
        sequences = []
        for prompt, config in zip(plan.prompts, plan.configs):
            for j in range(request.n):
                index = len(sequences)
                # Choice j of a seeded request uses seed + j, so choices differ and each is reproducible.
                sequences.append(SequenceRequest(
                    prompt=prompt.ids, config=config, seed=(base_seed + j) % SEED_MODULUS,
                    drafts=request.wants_drafts, region=prompt.region,
                    grammar=plan.grammar if prompt.region is None else None, deadline=deadline,
                    temperature=None if request.decode == "diffusion" else (
                        1.0 if request.temperature is None else request.temperature),
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
