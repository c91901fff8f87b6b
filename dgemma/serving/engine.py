"""The serving engine: one thread owns the model and batches denoising steps across all running sequences.

Design choices:
- Continuous batching at step granularity: every step, the canvases of all running sequences go through one
  decoder forward, whatever canvas and step each is at; a sequence that commits a canvas encodes it and starts
  the next one while the others keep denoising. New sequences join at the next step.
- Each sequence has its own random generator and draws its own numbers in the order a single-sequence run
  draws them (initial canvas, then per step one uniform per position and one renoise draw), so a seeded request
  gives the same tokens alone or batched, and the same as `model.generate(..., generator=...)` with batch 1.
- The engine knows token ids only. It hands events (a draft after each step, a commit after each canvas, the
  end) to a per-sequence callback; text, stop strings and HTTP are the caller's business (`service.py`).
- Bounded: a fixed number of rows (concurrent sequences) in a preallocated `SlotCache`, a bounded queue, a
  per-sequence deadline; cancelled or expired sequences free their row at the next step.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..cache import SlotCache
from ..generation import GenerationConfig, processed_logits_at
from ..model import DiffusionGemma
from ..constraints import CanvasControl
from ..sampling import (StableAndConfident, StepResult, Workspace, draw_uniforms, entropy_bound_acceptance,
                        fast_step, renoise, temperature_at)

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The engine's waiting queue is at its limit."""


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
    tokens: list[int]  # this canvas's tokens within the budget, cut after the first EOS
    steps: int


@dataclass
class Finish:
    reason: str  # "stop" (EOS), "length" (budget), "cancelled", "timeout", "error"
    generated: list[int]
    decoder_passes: int
    message: str = ""


Event = Draft | Commit | Finish


@dataclass
class Sequence:
    """One sequence being generated; the engine thread alone touches its tensors."""

    prompt: list[int]
    config: GenerationConfig
    generator: torch.Generator
    on_event: Callable[[Event], None]
    max_new_tokens: int
    want_drafts: bool = False
    deadline: float | None = None
    control: CanvasControl | None = None  # fixed tokens (infilling) or a grammar, for batch 1
    generated: list[int] = field(default_factory=list)
    row: int = -1
    canvas: torch.Tensor | None = None
    argmax: torch.Tensor | None = None
    soft: torch.Tensor | None = None
    stopper: StableAndConfident | None = None
    step: int = 0  # remaining denoising steps of the current canvas (N .. 1)
    steps_run: int = 0
    canvas_index: int = 0
    decoder_passes: int = 0
    cancelled: bool = False
    logits_at: Callable | None = None  # the last step's logits, for a control to finish a canvas with


class Engine:
    def __init__(self, model: DiffusionGemma, max_sequences: int = 8, max_queue: int = 64,
                 max_context: int = 2048):
        self.model = model
        self.config = model.config
        self.max_queue = max_queue
        self.max_context = max_context
        canvas = self.config.canvas_length
        # Room for the longest allowed sequence plus the scratch canvas past it.
        self.cache = SlotCache(self.config, max_sequences, max_context + canvas, model.dtype, model.device)
        self.running: list[Sequence] = []  # running[i] occupies cache row i
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.lock = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.steps_run = 0
        self.workspace = Workspace()  # used by the engine thread only
        self.embed_scale = model.decoder.embed_tokens.scale_as(model.dtype)

    # ---- the caller's side (any thread) --------------------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="dgemma-engine", daemon=True)
        self.thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the loop; with `drain`, after the running and waiting sequences have finished."""
        with self.lock:
            if not drain:
                for sequence in list(self.running) + list(self.waiting):
                    sequence.cancelled = True
            self.stopping = True
            self.lock.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)

    def submit(self, sequence: Sequence) -> Sequence:
        if len(sequence.prompt) + sequence.max_new_tokens > self.max_context:
            raise ValueError(f"prompt ({len(sequence.prompt)} tokens) plus max_tokens ({sequence.max_new_tokens}) "
                             f"exceed the server's context of {self.max_context} tokens")
        with self.lock:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(sequence)
            self.lock.notify_all()
        return sequence

    def cancel(self, sequence: Sequence) -> None:
        sequence.cancelled = True  # seen by the loop at its next step

    @property
    def load(self) -> dict[str, int]:
        return {"running": len(self.running), "waiting": len(self.waiting), "steps": self.steps_run}

    # ---- the engine thread --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.running and not self.waiting and not self.stopping:
                    self.lock.wait(timeout=0.5)
                if self.stopping and not self.running and not self.waiting:
                    return
                admitted = []
                while self.waiting and len(self.running) + len(admitted) < self.cache.rows:
                    admitted.append(self.waiting.popleft())
            try:
                for sequence in admitted:
                    self._admit(sequence)
                self._drop_cancelled()
                if self.running:
                    self._step()
            except Exception as err:  # a bug must not leave clients hanging: fail every running sequence
                logger.exception("engine step failed")
                for sequence in list(self.running):
                    self._finish(sequence, "error", str(err))

    @torch.no_grad()
    def _admit(self, sequence: Sequence) -> None:
        if sequence.cancelled:
            sequence.on_event(Finish("cancelled", [], 0))
            return
        sequence.row = len(self.running)
        self.running.append(sequence)
        self._encode(sequence, sequence.prompt)
        self._new_canvas(sequence)

    def _encode(self, sequence: Sequence, tokens: list[int]) -> None:
        view = self.cache.row(sequence.row)
        ids = torch.tensor([tokens], device=self.model.device)
        positions = torch.arange(view.length, view.length + len(tokens), device=self.model.device)[None]
        valid = torch.ones_like(ids, dtype=torch.bool)
        self.model.encode(ids, view.plan(self.model.rope(positions), valid, encoder=True))
        view.commit(valid)
        self.cache.sync(sequence.row, view)

    def _new_canvas(self, sequence: Sequence) -> None:
        length, vocab = self.config.canvas_length, self.config.vocab_size
        sequence.canvas = torch.randint(0, vocab, (1, length), device=self.model.device,
                                        generator=sequence.generator)
        if sequence.control is not None:
            sequence.canvas = sequence.control.begin(sequence.canvas_index, sequence.canvas)
        sequence.argmax, sequence.soft = sequence.canvas, None
        config = sequence.config
        sequence.stopper = (StableAndConfident(config.stability_threshold, config.confidence_threshold)
                            if config.stability_threshold is not None and config.confidence_threshold is not None
                            else None)
        sequence.step, sequence.steps_run = config.max_denoising_steps, 0

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        for sequence in list(self.running):
            if sequence.cancelled:
                self._finish(sequence, "cancelled")
            elif sequence.deadline is not None and now > sequence.deadline:
                self._finish(sequence, "timeout", "the request took longer than the server's time limit")

    @torch.no_grad()
    def _step(self) -> None:
        model, running = self.model, self.running
        length = self.config.canvas_length
        active = len(running)
        canvases = torch.cat([s.canvas for s in running])
        positions = torch.tensor([self.cache.lengths[s.row] for s in running], device=model.device)[:, None]
        plan = self.cache.decoder_plan(model.rope(positions + torch.arange(length, device=model.device)), active,
                                       length, fast_kernels=True)
        soft = None
        if any(s.soft is not None for s in running):
            # A first step has no signal; zeros give exactly the same result (the block's MLP maps 0 to 0).
            zeros = torch.zeros(1, length, self.config.hidden_size, dtype=model.dtype, device=model.device)
            soft = torch.cat([s.soft if s.soft is not None else zeros for s in running])
        hidden = model.decode(canvases, plan, soft)
        temperatures = [temperature_at(s.step, s.config.max_denoising_steps, s.config.t_min, s.config.t_max)
                        if s.config.t_min is not None and s.config.t_max is not None else torch.tensor(1.0)
                        for s in running]
        uniforms = torch.cat([draw_uniforms(length, s.generator, model.device) for s in running])
        result = fast_step(hidden, model.head_matrix, model.embedding_matrix,
                           self.embed_scale, self.config.final_logit_softcapping,
                           torch.stack(temperatures), uniforms, self.workspace)
        self.steps_run += 1
        done = []
        for i, sequence in enumerate(running):
            row = StepResult(result.sampled[i:i + 1], result.argmax[i:i + 1], result.entropy[i:i + 1],
                             result.self_conditioning[i:i + 1])
            ready = True
            if sequence.control is None:
                accepted = entropy_bound_acceptance(row.entropy, sequence.config.entropy_bound)
            else:
                sequence.logits_at = processed_logits_at(model, hidden[i:i + 1], temperatures[i])
                row, accepted, ready_rows = sequence.control.accept(
                    sequence.canvas_index, sequence.canvas, row, sequence.config.entropy_bound, sequence.logits_at,
                    sequence.generator)
                ready = bool(ready_rows[0])
            entropy = row.entropy
            sampled = torch.where(accepted, row.sampled, sequence.canvas)
            sequence.canvas = renoise(sampled, accepted, self.config.vocab_size, sequence.generator)
            sequence.argmax = row.argmax
            sequence.soft = row.self_conditioning
            sequence.decoder_passes += 1
            sequence.step -= 1
            sequence.steps_run += 1
            stopped = ready and (bool(sequence.stopper(sequence.argmax, entropy)[0]) if sequence.stopper else False)
            if sequence.want_drafts:
                sequence.on_event(Draft(sequence.steps_run, sequence.canvas_index, sequence.argmax[0].tolist(),
                                        accepted[0].tolist(), entropy[0].tolist()))
            if stopped or sequence.step == 0:
                done.append(sequence)
        for sequence in done:
            self._commit(sequence)

    def _commit(self, sequence: Sequence) -> None:
        if sequence.control is not None:
            sequence.argmax = sequence.control.complete(sequence.canvas_index, sequence.argmax, sequence.logits_at)
            sequence.control.commit(sequence.canvas_index, sequence.argmax)
        tokens = sequence.argmax[0].tolist()[:sequence.max_new_tokens - len(sequence.generated)]
        eos = set(sequence.config.eos_token_ids)
        end = next((i + 1 for i, t in enumerate(tokens) if t in eos), None)
        if end is not None:
            tokens = tokens[:end]
        sequence.generated.extend(tokens)
        sequence.on_event(Commit(sequence.canvas_index, tokens, sequence.steps_run))
        sequence.canvas_index += 1
        if end is not None:
            self._finish(sequence, "stop")
        elif len(sequence.generated) >= sequence.max_new_tokens:
            self._finish(sequence, "length")
        else:
            self._encode(sequence, sequence.argmax[0].tolist())
            self._new_canvas(sequence)

    def _finish(self, sequence: Sequence, reason: str, message: str = "") -> None:
        """Free the sequence's row (moving the last running sequence into it) and report the end."""
        row, last = sequence.row, len(self.running) - 1
        if row != last:
            moved = self.running[last]
            self.cache.move(last, row)
            moved.row = row
            self.running[row] = moved
        else:
            self.cache.clear(row)
        self.running.pop()
        sequence.row = -1
        sequence.on_event(Finish(reason, list(sequence.generated), sequence.decoder_passes, message))
