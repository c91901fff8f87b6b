"""The server's engine thread: one thread owns the model and steps the engine; requests wait in a bounded queue.

Design choices:
- Continuous batching at step granularity: every step, the canvases of all running sequences go through one
  decoder forward (the engine's step), whatever canvas and step each is at; sequences join and leave between
  steps, and prompts admitted together are encoded in one forward.
- Each sequence is an engine group of one with its own generator (seeded from the request), so a seeded request
  gives the same tokens alone or batched, and the same as `model.generate(..., generator=...)`.
- `decode: autoregressive` sequences are batched the same way: every step, one encoder forward gives each its next
  token (a `TokenBatch`), before the diffusion step. Alone, a seeded one gives `autoregressive_steps`' tokens; in a
  batch, the same where the encoder's matmuls are batch-invariant (see `TokenBatch`).
- This module is where requests become tensors: the service hands in plain `SequenceRequest`s (token ids,
  settings, a seed, an infill region or a grammar) and gets plain events back (lists of ids, not tensors),
  through a callback it must not block in.
- The loop runs on whichever thread calls `run` (`dgemma serve`: the process's main thread, the HTTP server on
  another) or on a thread of its own (`start`). torch's OpenMP parallel regions entered from a thread other than
  the process's first measured 1.3 to 3.5 times slower per small operation on a 2-core CPU, and the whole server
  half as fast (docs/performance.md, "Serving").
- Bounded: a fixed number of rows in a preallocated cache, a bounded queue, a per-sequence deadline. The server
  holds at most `max_sequences + max_queue` sequences (running or waiting); a request's sequences are queued all
  together or not at all, and one with more sequences than the server ever holds is refused as never fitting. A
  cancelled sequence leaves the queue at once; a running one frees its row at the next step, as does an expired
  one.
- A sequence that cannot be admitted (its settings fail when they become tensors) ends with an error event, so
  no client waits for a sequence that is not running.
- Log-probabilities (when a request's settings ask for them) travel in the Commit events as plain lists, one
  entry per committed token.
- `model_fingerprint` names the build and the weights served (OpenAI's `system_fingerprint`), computed once.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..cache import KVCache
from ..constraints import FixedTokens, GrammarControl, grammar_tokenizer
from ..engine import CanvasCommitted, DraftStep, Engine, Group, until_eos
from ..generation import TokenBatch, TokenSequence
from ..generation_config import GenerationConfig
from ..model import DiffusionGemma, attached_weights
from ..onednn import ReorderedExperts
from ..quantized import quantized_weights
from ..tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The server cannot take the request's sequences now (it may later: HTTP 429)."""


class NeverFits(ValueError):
    """The request has more sequences than the server ever holds, running and waiting (HTTP 400)."""


@dataclass
class Draft:
    step: int
    canvas_index: int
    argmax: list[int]
    accepted: list[bool]
    entropy: list[float]


@dataclass
class Commit:
    canvas_index: int
    tokens: list[int]  # this canvas's tokens within the budget, up to and including the first EOS
    steps: int
    # With logprobs asked for: each token's log-probability (-inf outside a top_k/top_p truncation), and the
    # most likely tokens at its position as (id, log-probability) pairs, most likely first.
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class Finish:
    reason: str  # "stop" (EOS), "length" (budget), "cancelled", "timeout", "error"
    generated: list[int]
    decoder_passes: int
    message: str = ""


Event = Draft | Commit | Finish


@dataclass(eq=False)
class SequenceRequest:
    """One sequence to generate, as plain data; the scheduler alone turns it into tensors."""

    prompt: list[int]
    config: GenerationConfig  # its max_new_tokens is the budget
    seed: int
    on_event: Callable[[Event], None]
    drafts: bool = False
    region: list[int] | None = None  # infilling: the tokens after the prompt, -1 where a hole is
    grammar: str | None = None  # structured output: an llguidance grammar
    temperature: float | None = None  # set: decode autoregressively, token by token, at this temperature
    deadline: float | None = None
    cancelled: bool = False
    generated: list[int] = field(default_factory=list)
    ended_by_eos: bool = False
    group: Group | None = None
    sequence: TokenSequence | None = None  # autoregressive decoding: its place in the scheduler's TokenBatch


class Scheduler:
    def __init__(self, model: DiffusionGemma, tokenizer: Tokenizer, max_sequences: int, max_queue: int,
                 max_context: int):
        """`max_context`: the longest prompt + budget a sequence may have; the tokenizer serves grammars."""
        self.model, self.tokenizer = model, tokenizer
        self.max_queue, self.max_context = max_queue, max_context
        self._grammar_tokenizers: dict[int, Any] = {}  # by EOS id: building one takes up to a second
        # Room for the longest allowed sequence plus the scratch canvas past it, in every row.
        cache = KVCache(model.config, max_sequences, model.dtype, model.device,
                        capacity=max_context + model.config.canvas_length, growable=False)
        self.engine = Engine(model, cache, sampling="fast")
        # `decode: autoregressive` sequences, one encoder forward a step for all of them; their cache grows to the
        # longest of them (nothing is allocated while none comes)
        self.tokens = TokenBatch(model, max_sequences)
        self.running: list[SequenceRequest] = []
        self.waiting: collections.deque[SequenceRequest] = collections.deque()
        self.starting = 0  # taken from `waiting`, not yet in `running` (counted against the capacity meanwhile)
        self.lock = threading.Condition()
        self.stopping = False
        self.looping = False  # set when `run` starts
        self.ended = threading.Event()  # set when `run` returns
        self.steps_run = 0

    @property
    def max_sequences(self) -> int:
        return self.engine.cache.batch_size

    # ---- the caller's side (any thread) --------------------------------------------------------------------

    def start(self) -> None:
        """Run the loop on a thread of its own (for an application embedding the server; `dgemma serve` calls
        `run` on its main thread instead)."""
        threading.Thread(target=self.run, name="dgemma-engine", daemon=True).start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Tell the loop to stop, with `drain` after the running and waiting sequences have finished (without,
        they end as cancelled), and wait up to `timeout` seconds for it to return, whichever thread runs it (not at
        all when it has not started)."""
        with self.lock:
            if not drain:
                for request in list(self.running) + list(self.waiting):
                    request.cancelled = True
            self.stopping = True
            self.lock.notify_all()
        if self.looping:
            self.ended.wait(timeout)

    @property
    def capacity(self) -> int:
        """Sequences the server holds at once: one per row, and `max_queue` waiting for a row."""
        return self.max_sequences + self.max_queue

    def check_size(self, count: int) -> None:
        """Raise NeverFits if `count` sequences are more than the server ever holds."""
        if count > self.capacity:
            raise NeverFits(f"the request makes {count} sequences (prompts times n); this server holds at most "
                            f"{self.capacity} ({self.max_sequences} running, {self.max_queue} waiting)")

    def check_room(self, count: int) -> None:
        """Raise NeverFits or QueueFull unless `count` sequences could be queued now (nothing is reserved)."""
        self.check_size(count)
        with self.lock:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            held = len(self.running) + self.starting + len(self.waiting)
            if held + count > self.capacity:
                raise QueueFull(f"the server holds {held} of its {self.capacity} sequences; the request's {count} "
                                "do not fit now")

    def submit(self, requests: list[SequenceRequest]) -> None:
        """Queue all of `requests` or none of them (NeverFits, QueueFull, ValueError)."""
        for request in requests:
            if len(request.prompt) + request.config.max_new_tokens > self.max_context:
                raise ValueError(f"prompt ({len(request.prompt)} tokens) plus max_tokens "
                                 f"({request.config.max_new_tokens}) exceed the server's context of "
                                 f"{self.max_context} tokens")
        with self.lock:
            self.check_room(len(requests))
            self.waiting.extend(requests)
            self.lock.notify_all()

    def cancel(self, request: SequenceRequest) -> None:
        """End a sequence: a waiting one leaves the queue now, a running one frees its row at the next step."""
        with self.lock:
            request.cancelled = True
            try:
                self.waiting.remove(request)
            except ValueError:
                return  # running (the loop drops it at its next step), being admitted, or already finished
            self.lock.notify_all()
        request.on_event(Finish("cancelled", [], 0))

    @property
    def load(self) -> dict[str, int]:
        return {"running": len(self.running), "waiting": len(self.waiting), "steps": self.steps_run}

    # ---- the engine thread --------------------------------------------------------------------------------

    def run(self) -> None:
        """The loop, on the calling thread: admit, step, repeat; returns once stopped and drained."""
        self.looping = True
        try:
            self._loop()
        finally:
            self.ended.set()

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.running and not self.waiting and not self.stopping:
                    self.lock.wait(timeout=0.5)
                if self.stopping and not self.running and not self.waiting:
                    return
                admitted = []
                while self.waiting and len(self.running) + len(admitted) < self.max_sequences:
                    admitted.append(self.waiting.popleft())
                self.starting = len(admitted)
            for request in admitted:
                try:
                    self._admit(request)
                except Exception:  # this sequence's settings are bad: fail it alone
                    logger.exception("admitting a sequence failed")
                    if request in self.running:
                        self.running.remove(request)
                    if request.group is not None:
                        self.engine.release(request.group)
                    request.on_event(Finish("error", [], 0, "the request could not be started"))
                finally:
                    self.starting -= 1  # only this thread writes it; in `running` now, or ended
            try:
                self._drop_cancelled()
                if self.running:
                    self._step()
            except Exception:  # a bug must not leave clients hanging: fail every running sequence
                logger.exception("engine step failed")
                for request in list(self.running):
                    self._finish(request, "error", "the engine failed; the request was ended")

    def _admit(self, request: SequenceRequest) -> None:
        if request.cancelled:
            request.on_event(Finish("cancelled", [], 0))
            return
        # A CPU generator on every device: the same seed gives the same draws wherever the model runs.
        generator = torch.Generator().manual_seed(request.seed)
        if request.temperature is not None:  # token by token with the encoder, beside the engine's canvases
            config = request.config
            temperature = request.temperature if config.do_sample else 0.0
            request.sequence = self.tokens.add(torch.tensor([request.prompt]), config.max_new_tokens,
                                               config.eos_token_ids, temperature, generator, processors=config)
            self.running.append(request)
            return
        canvas = self.model.config.canvas_length
        control = None
        if request.region is not None:
            control = FixedTokens(torch.tensor([request.region]), canvas)
        elif request.grammar is not None:
            eos = request.config.eos_token_ids[0]
            if eos not in self._grammar_tokenizers:
                self._grammar_tokenizers[eos] = grammar_tokenizer(self.tokenizer, self.model.config.vocab_size, eos)
            control = GrammarControl(request.grammar, self._grammar_tokenizers[eos], self.model.config.vocab_size,
                                     eos, 1, canvas, greedy=not request.config.do_sample)
        group = Group(torch.tensor([request.prompt]), request.config, generator=generator, control=control,
                      drafts=request.drafts)
        try:
            request.group = self.engine.add(group)
        except Exception:
            # Engine.add gives the group its rows before writing its settings; if writing fails, take the rows
            # back, or they stay owned by a group that never runs and the engine runs out of rows.
            for row, owner in enumerate(self.engine.owner):
                if owner is group:
                    self.engine.owner[row] = None
            raise
        self.running.append(request)

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        for request in list(self.running):
            if request.cancelled:
                self._finish(request, "cancelled")
            elif request.deadline is not None and now > request.deadline:
                self._finish(request, "timeout", "the request took longer than the server's time limit")

    @torch.no_grad()
    def _step(self) -> None:
        """One step of every running sequence: a token for the autoregressive ones, a denoising step for the
        others; counted once in `steps_run`."""
        stepped = self._advance_autoregressive()
        owners = {request.group: request for request in self.running if request.group is not None}
        if not owners:
            self.steps_run += stepped
            return
        events = self.engine.step()
        self.steps_run += 1
        for event in events:
            request = owners[event.group]
            if isinstance(event, DraftStep):
                request.on_event(Draft(event.step, event.canvas_index, event.argmax[0].tolist(),
                                       event.accepted[0].tolist(), event.entropy[0].tolist()))
            elif isinstance(event, CanvasCommitted):
                tokens, request.ended_by_eos = until_eos(event.tokens[0].tolist(), request.config.eos_token_ids)
                request.generated.extend(tokens)
                commit = Commit(event.canvas_index, tokens, event.steps)
                if event.logprobs is not None:
                    count = len(tokens)
                    commit.logprobs = event.logprobs[0, :count].tolist()
                    commit.top_logprobs = [list(zip(ids, values)) for ids, values in zip(
                        event.top_ids[0, :count].tolist(), event.top_logprobs[0, :count].tolist())]
                request.on_event(commit)
        for request in list(self.running):
            if request.group is not None and request.group.done:
                self._finish(request, "stop" if request.ended_by_eos else "length")

    def _advance_autoregressive(self) -> bool:
        """One token for every sequence decoded autoregressively (one encoder forward for all of them, or one per
        batch of prompts of similar lengths); whether there was any."""
        owners = {id(request.sequence): request for request in self.running if request.sequence is not None}
        if not owners:
            return False
        for sequence, token in self.tokens.step():
            request = owners[id(sequence)]
            request.generated.append(token)
            request.ended_by_eos = token in request.config.eos_token_ids
            request.on_event(Commit(len(request.generated) - 1, [token], 1))
            if sequence.finished:
                self._finish(request, "stop" if request.ended_by_eos else "length")
        return True

    def _finish(self, request: SequenceRequest, reason: str, message: str = "") -> None:
        """Free the sequence's rows (or its autoregressive decoder) now and report the end."""
        if request.group is not None:
            self.engine.release(request.group)
            passes = int(request.group.passes[0]) if request.group.passes is not None else 0
        else:
            if request.sequence is not None:
                self.tokens.remove(request.sequence)
                request.sequence = None
            passes = len(request.generated)
        self.running.remove(request)
        request.on_event(Finish(reason, list(request.generated), passes, message))


def model_fingerprint(model: DiffusionGemma) -> str:
    """A short hash of what is served: the model's config and, for every weight, its name, shape, dtype and a few
    of its values (the first and last eight), so that two checkpoints of one architecture differ. Reads a few
    bytes per tensor: instant for any model size."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        try:  # a view, never a copy of the tensor
            flat = tensor.detach().view(-1) if tensor.is_contiguous() else tensor.detach()[(0,) * tensor.dim()][None]
            digest.update(torch.cat([flat[:8], flat[-8:]]).float().cpu().numpy().tobytes())
        except (RuntimeError, TypeError, IndexError):  # packed, exotic or empty: name, shape and dtype stand for it
            pass
    for name, weight in quantized_weights(model):  # kept quantised: not in the state dict
        digest.update(f"{name}{weight.shape}{weight.qtype}".encode())
        digest.update(weight.codes.reshape(-1)[:16].cpu().numpy().tobytes())
    for name, weight in attached_weights(model, (ReorderedExperts,)):  # in oneDNN's layout: not in the state dict
        first = weight.matrices[0].to_dense().view(-1)  # one expert's matrix given back, a few MB
        digest.update(f"{name}{weight.shape}{weight.dtype}".encode())
        digest.update(torch.cat([first[:8], first[-8:]]).float().numpy().tobytes())
    return digest.hexdigest()[:12]
