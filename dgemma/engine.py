"""The engine: one implementation of "denoise a batch of canvases one step", for the library and the server.

`generate` runs one group through it; the server's scheduler runs many, joining and leaving between steps.

Design choices:
- Rows and groups. A row is one sequence: one row of the KV cache and of the engine's per-row state (canvas,
  argmax, self-conditioning, stopping state, settings). A group is the rows of one call that share a random
  generator and a GenerationConfig and go through canvases in lockstep: a library batch is one group, each
  server choice a group of one. Every step runs one decoder forward over all rows of all groups.
- Random numbers are drawn per group in the reference's order and shapes: a fresh canvas after each encode,
  then per step the sample (a multinomial in reference mode, one uniform per position in fast mode) and one
  full renoise draw, also for rows that have stopped. A group's tokens therefore do not depend on which other
  groups share its steps: a seeded request is the same alone, batched, and through `model.generate`. (In
  reference mode the forwards run one group at a time as well: its grouped expert matmuls give a row a height
  that depends on the batch, which some CPU BLAS round differently; tests/test_engine.py checks both modes.)
- Per-row arithmetic (temperature schedule, acceptance bound, renoising, stopping) is vectorised across all
  rows; each row's settings live in [rows] tensors written once when its group joins.
- A group's canvas ends when all its rows have stopped (stable and confident) or its steps are spent. Its
  argmax is committed (cut to the budget, padded after EOS); unless every row is done, the canvas is encoded at
  the start of the next step, in one batched forward with every other group's commits and new prompts.
- Rows that stopped keep their canvas and self-conditioning until their group commits.
- The host waits for the device once per step, to learn which canvases ended; nothing else in a step needs it.
- Logits processors (logit_bias, penalties, top_k, top_p; see sampling.py) are per-row settings too: a [rows, V]
  fp32 bias (allocated when a group first needs one), rewritten for a group's rows when it joins and after each
  of its commits (the penalties count the tokens committed so far), and [rows] top_k / top_p. Rows whose group
  uses none of them take the sampler's unchanged path, the others its controlled path (two calls when a step has
  both), so a row's tokens depend on its own settings only.
- Guidance on the prompt (`guidance_scale`): a second KV cache, created when a guided group first joins, holds for
  each guided row BOS and the canvases it has committed, without its prompt. Each step then runs the decoder a
  second time over the same canvases against that cache, in one forward for every row (a row without guidance has
  an empty prefix there and ignores the result), and a guided row's states become h_bos + scale * (h - h_bos)
  before anything reads them. The guide cache's rows move and clear with the main cache's.
- Log-probabilities are computed when a canvas commits, not per step: the engine keeps, for rows whose group asks
  for them, the hidden states and temperature of the last step that ran for the row (a row that stopped early
  keeps those of its stopping step, whose argmax it commits), and at the commit recomputes that step's processed
  logits one row at a time ([L, V] fp32) for the committed tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, NamedTuple, TypeVar

import torch

from .cache import KVCache
from .generation_config import GenerationConfig
from .model import DiffusionGemma
from .sampling import (Controls, StepResult, Workspace, draw_tokens, draw_uniforms, entropy_bound_acceptance,
                       fast_step, process_logits, reference_step, stable_and_confident, temperature_at,
                       temperature_schedule, token_logprobs)

if TYPE_CHECKING:
    from .constraints import CanvasControl

SAMPLING_MODES = ("fast", "reference")


def until_eos(tokens: Iterable[int], eos_token_ids: Iterable[int]) -> tuple[list[int], bool]:
    """The tokens up to and including the first end-of-generation token, and whether there was one."""
    eos = set(eos_token_ids)
    kept: list[int] = []
    for token in tokens:
        kept.append(token)
        if token in eos:
            return kept, True
    return kept, False


# ---- events ------------------------------------------------------------------------------------------------------

@dataclass
class DraftStep:
    """After a denoising step: the argmax canvas (the best current guess) and which positions were accepted."""

    canvas_index: int
    step: int  # 1-based step within the canvas
    argmax: torch.Tensor  # [B, L]
    accepted: torch.Tensor  # [B, L] bool
    entropy: torch.Tensor  # [B, L]
    finished_denoising: torch.Tensor  # [B] bool
    canvas: torch.Tensor | None = None  # [B, L] the next step's input: accepted samples, fresh noise elsewhere
    group: Group | None = None


@dataclass
class CanvasCommitted:
    """A canvas was committed: its tokens (cut to the token budget, pad after EOS) and which rows are done."""

    canvas_index: int
    tokens: torch.Tensor  # [B, <= L]
    finished: torch.Tensor  # [B] bool
    steps: int
    group: Group | None = None
    # With `logprobs` / `top_logprobs`: each token's log-probability under the processed distribution of the last
    # step of its row (-inf outside a top_k/top_p truncation, nan where the token is pad written after the row
    # ended), [B, <= L] fp32; and the `top_logprobs` most likely tokens there, [B, <= L, top_logprobs] each.
    logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


# ---- groups ------------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Group:
    """Rows that share a generator and settings and move through canvases together.

    `input_ids` [B, T] are the tokens to encode first (with a reused cache, only the uncached ones);
    `attention_mask` [B, T] marks left padding (None: all real). The engine fills in the rest."""

    input_ids: torch.Tensor
    config: GenerationConfig
    attention_mask: torch.Tensor | None = None
    generator: torch.Generator | None = None
    control: CanvasControl | None = None
    drafts: bool = True  # emit a DraftStep after every step
    rows: list[int] = field(default_factory=list)
    budget: int = 0  # new tokens to generate
    prompt_length: int = 0  # cached + new prompt tokens when the group joined
    canvas_index: int = 0
    steps_run: int = 0  # denoising steps of the current canvas
    remaining: int = 0  # steps left in the current canvas
    has_signal: bool = False  # whether the current canvas has self-conditioning yet
    sequences: torch.Tensor | None = None  # [B, prompt + committed]
    finished: torch.Tensor | None = None  # [B] rows done (EOS or budget)
    passes: torch.Tensor | None = None  # [B] decoder passes each row needed
    pending: torch.Tensor | None = None  # [B, T] tokens to encode before the next canvas
    pending_valid: torch.Tensor | None = None
    logits_at: Callable[[int, int], torch.Tensor] | None = None  # the last step's, for a control to finish with
    done: bool = False
    cancelled: bool = False

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def controlled(self) -> bool:
        """Whether the group's rows take the sampler's controlled path (a bias or a truncation)."""
        return self.config.biases or self.config.truncates

    @property
    def wants_logprobs(self) -> bool:
        return self.config.logprobs or self.config.top_logprobs > 0


class Pending(NamedTuple):
    """Tokens a group's rows of a cache take at the next prefill: ids [B, T] and which of them are real [B, T]."""

    group: Group
    ids: torch.Tensor
    valid: torch.Tensor


class Engine:
    """Owns the per-row state of up to `cache.batch_size` rows and steps every running group together."""

    def __init__(self, model: DiffusionGemma, cache: KVCache, sampling: str = "fast"):
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"`sampling` must be 'fast' or 'reference', got {sampling!r}")
        self.model, self.cache, self.sampling = model, cache, sampling
        self.exact = sampling == "reference"
        config, device, rows = model.config, model.device, cache.batch_size
        self.canvas_length, self.vocab_size = config.canvas_length, config.vocab_size
        self.groups: list[Group] = []
        self.owner: list[Group | None] = [None] * rows
        self.workspace = Workspace()
        self.embed_scale = model.decoder.embed_tokens.scale_as(model.dtype)

        def zeros(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(rows, *shape, dtype=dtype, device=device)

        length = self.canvas_length
        # Per-row state, row i = cache row i; rows 0 .. in_use - 1 are occupied.
        self.canvas = zeros(length, dtype=torch.long)
        self.argmax = zeros(length, dtype=torch.long)
        self.soft = zeros(length, config.hidden_size, dtype=model.dtype)
        self.stopped = zeros(dtype=torch.bool)
        self.run = zeros(dtype=torch.int32)  # steps in a row with an unchanged argmax
        self.steps_left = zeros(dtype=torch.int32)
        # Per-row settings, from each row's GenerationConfig.
        self.max_steps = zeros(dtype=torch.int32)
        self.t_min = zeros(dtype=torch.float32)
        self.t_span = zeros(dtype=torch.float32)
        self.tempered = zeros(dtype=torch.bool)
        self.bound = zeros(dtype=torch.float32)
        self.greedy = zeros(dtype=torch.bool)  # do_sample=False: the argmax instead of a sample
        self.adaptive = zeros(dtype=torch.bool)
        self.stability = zeros(dtype=torch.int32)
        self.confidence = zeros(dtype=torch.float32)
        self.top_k = zeros(dtype=torch.long)  # 0: off
        self.top_p = zeros(dtype=torch.float32)  # 1: off
        self.guidance = zeros(dtype=torch.float32)  # guidance_scale, 1: off
        # What a commit needs for log-probabilities: the last step's states and temperature of each row.
        self.last_hidden = zeros(length, config.hidden_size, dtype=model.dtype)
        self.last_temperature = zeros(dtype=torch.float32)
        self.bias: torch.Tensor | None = None  # [rows, V] fp32, allocated when a group first needs one
        self.row_state = [self.canvas, self.argmax, self.soft, self.stopped, self.run, self.steps_left,
                          self.max_steps, self.t_min, self.t_span, self.tempered, self.bound, self.greedy,
                          self.adaptive, self.stability, self.confidence, self.top_k, self.top_p, self.guidance,
                          self.last_hidden, self.last_temperature]
        self.guide_cache: KVCache | None = None  # BOS and committed canvases of guided rows, created when needed
        self._plans: dict[bool, tuple[tuple, object]] = {}  # decoder plans (main or guide cache) and their keys
        self._layout_version = 0  # bumped whenever rows move or caches change: the decoder plan is rebuilt

    # ---- membership ---------------------------------------------------------------------------------------

    @property
    def in_use(self) -> int:
        return sum(owner is not None for owner in self.owner)

    @property
    def free_rows(self) -> int:
        return len(self.owner) - self.in_use

    def add(self, group: Group) -> Group:
        """Give a group rows; its prompt is encoded (with everything else pending) at the next step."""
        if group.size > self.free_rows:
            raise ValueError(f"the group needs {group.size} rows but the engine has {self.free_rows} free")
        if group.control is not None and self.exact:
            raise ValueError("fixed tokens and grammars need sampling='fast' (the reference has neither)")
        if not group.config.do_sample and self.exact:
            raise ValueError("do_sample=False (argmax sampling) needs sampling='fast' (the reference has no such mode)")
        if group.config.guides and self.exact:
            raise ValueError("guidance_scale needs sampling='fast' (the reference has no guidance)")
        outside = [t for t in (group.config.logit_bias or {}) if t >= self.vocab_size]
        if outside:
            raise ValueError(f"`logit_bias` names token ids outside the vocabulary [0, {self.vocab_size}): "
                             f"{sorted(outside)[:5]}")
        first = self.in_use
        group.rows = list(range(first, first + group.size))
        device = self.model.device
        cached = self.cache.lengths[first]
        group.prompt_length = cached + group.input_ids.shape[1]
        group.budget = group.config.token_budget(group.prompt_length)
        group.sequences = group.input_ids.to(device=device, dtype=torch.long)
        group.finished = torch.zeros(group.size, dtype=torch.bool, device=device)
        group.passes = torch.zeros(group.size, dtype=torch.int32, device=device)
        group.pending = group.sequences
        group.pending_valid = (torch.ones_like(group.sequences, dtype=torch.bool) if group.attention_mask is None
                               else group.attention_mask.to(device=device, dtype=torch.bool))
        self._write_settings(group)  # may fail (a setting fp32/int32 cannot hold): the rows are not taken yet
        if group.config.guides and self.guide_cache is None:
            cache = self.cache
            self.guide_cache = KVCache(self.model.config, cache.batch_size, cache.dtype, cache.device, cache.capacity)
        for row in group.rows:
            self.owner[row] = group
        self.groups.append(group)
        return group

    def _write_settings(self, group: Group) -> None:
        config, rows = group.config, self._select(group)
        self.max_steps[rows] = config.max_denoising_steps
        self.tempered[rows] = config.has_temperature
        if config.has_temperature:
            # fp32 as the reference's schedule rounds them (see sampling.temperature_schedule)
            self.t_min[rows] = config.t_min
            self.t_span[rows] = config.t_max - config.t_min
        self.bound[rows] = config.entropy_bound
        self.greedy[rows] = not config.do_sample
        self.adaptive[rows] = config.stops_adaptively
        if config.stops_adaptively:
            self.stability[rows] = config.stability_threshold
            self.confidence[rows] = config.confidence_threshold
        self.top_k[rows] = self._top_k(config)
        self.top_p[rows] = 1.0 if config.top_p is None else config.top_p
        self.guidance[rows] = config.guidance_scale
        if config.biases:
            self._write_bias(group)

    def _top_k(self, config: GenerationConfig) -> int:
        """A group's top_k as the sampler takes it: 0 (off) when it keeps the whole vocabulary anyway."""
        return config.top_k if config.top_k and config.top_k < self.vocab_size else 0

    def _write_bias(self, group: Group) -> None:
        """The group's rows of the bias: logit_bias, minus the penalties for the tokens committed so far."""
        if self.bias is None:
            self.bias = torch.zeros(len(self.owner), self.vocab_size, dtype=torch.float32, device=self.model.device)
            self.row_state.append(self.bias)
        config, device = group.config, self.model.device
        bias = torch.zeros(group.size, self.vocab_size, dtype=torch.float32, device=device)
        if config.logit_bias:
            ids = torch.tensor(list(config.logit_bias), dtype=torch.long, device=device)
            bias[:, ids] = torch.tensor(list(config.logit_bias.values()), dtype=torch.float32, device=device)
        committed = group.sequences[:, group.input_ids.shape[1]:]
        if committed.numel() and (config.frequency_penalty or config.presence_penalty):
            counts = torch.zeros_like(bias).scatter_add_(1, committed, torch.ones_like(committed, dtype=bias.dtype))
            bias -= config.frequency_penalty * counts + config.presence_penalty * (counts > 0)
        self.bias[self._select(group)] = bias

    def cancel(self, group: Group) -> None:
        """Stop a group; its rows are freed at the next step (call from the thread that steps the engine)."""
        group.cancelled = True

    def release(self, group: Group) -> None:
        """Free a finished or cancelled group's rows, keeping the occupied rows contiguous."""
        if group not in self.groups:
            return
        self.groups.remove(group)
        for row in sorted(group.rows, reverse=True):
            last = self.in_use - 1
            if row != last:
                self._move_row(last, row)
            else:
                for cache in self._caches():
                    cache.clear(row)
                self.owner[row] = None
        group.rows = []
        self._layout_version += 1

    def _move_row(self, source: int, target: int) -> None:
        moved = self.owner[source]
        self._layout_version += 1
        for cache in self._caches():
            cache.move(source, target)
        for state in self.row_state:
            state[target] = state[source]
        moved.rows[moved.rows.index(source)] = target
        self.owner[target], self.owner[source] = moved, None

    def _caches(self) -> list[KVCache]:
        return [self.cache] + ([] if self.guide_cache is None else [self.guide_cache])

    def _select(self, group: Group) -> slice | torch.Tensor:
        """Index of a group's rows in the per-row state: a slice when they are consecutive (the usual case)."""
        rows = group.rows
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return slice(rows[0], rows[0] + len(rows))
        return torch.tensor(rows, device=self.model.device)

    # ---- one step -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[DraftStep | CanvasCommitted]:
        """Free the rows of groups that are done or cancelled, encode what is pending, run one denoising step
        over every row, and commit the canvases that ended. A group that finishes is marked `done`; its rows
        (and cache) stay as they are until the next step or `release`."""
        for group in [g for g in self.groups if g.done or g.cancelled]:
            self.release(group)
        self._prefill()
        running = [g for g in self.groups if not g.done]
        if not running:
            return []
        n = self.in_use
        guided = any(g.config.guides for g in running)
        for group in running:
            rows = self._select(group)
            # A guided step is two decoder passes over the row's canvas.
            group.passes += ~(self.stopped[rows] | group.finished) * (2 if group.config.guides else 1)
        model = self.model
        soft = self.soft[:n] if any(g.has_signal for g in running) else None
        if self.exact and len(running) > 1:
            hidden = self._decode_each(running, soft)
        else:
            hidden = model.decode(self.canvas[:n], self._decoder_plan(n), soft, exact=self.exact)
        if guided:
            unprompted = model.decode(self.canvas[:n], self._decoder_plan(n, guide=True), soft, exact=self.exact)
            scale = self.guidance[:n, None, None]
            hidden = torch.where(scale != 1, (unprompted + scale * (hidden - unprompted)).to(hidden.dtype), hidden)
        temperature = temperature_schedule(self.steps_left[:n], self.max_steps[:n], self.t_min[:n], self.t_span[:n])
        temperature = torch.where(self.tempered[:n], temperature, 1.0)  # dividing by 1 changes nothing
        if any(g.wants_logprobs for g in running):  # a row that has stopped keeps its stopping step's
            before = self.stopped[:n]
            self.last_hidden[:n] = torch.where(before[:, None, None], self.last_hidden[:n], hidden)
            self.last_temperature[:n] = torch.where(before, self.last_temperature[:n], temperature)
        result = self._sample(hidden, running, temperature)
        accepted = entropy_bound_acceptance(result.entropy, self.bound[:n, None])
        ready = torch.ones(n, dtype=torch.bool, device=model.device)
        for group in running:
            if group.control is not None:
                self._control(group, hidden, result, accepted, ready)
        noise = torch.zeros_like(self.canvas[:n])
        for group in running:
            noise[self._select(group)] = draw_tokens(group.size, self.canvas_length, self.vocab_size, group.generator,
                                                     model.device)
        frozen = self.stopped[:n]
        canvas = torch.where(frozen[:, None], self.canvas[:n], torch.where(accepted, result.sampled, noise))
        argmax = torch.where(frozen[:, None], self.argmax[:n], result.argmax)
        soft = torch.where(frozen[:, None, None], self.soft[:n], result.self_conditioning)
        stop, run = stable_and_confident(argmax, self.argmax[:n], self.run[:n], self.stability[:n],
                                         self.confidence[:n], result.entropy)
        stopped = frozen | (stop & ready & self.adaptive[:n])
        self.canvas[:n], self.argmax[:n], self.soft[:n] = canvas, argmax, soft
        self.run[:n], self.stopped[:n] = run, stopped
        self.steps_left[:n] -= 1
        stopped_rows = stopped.tolist()  # the step's one wait for the device: which canvases have ended
        events: list[DraftStep | CanvasCommitted] = []
        for group in running:
            group.steps_run += 1
            group.remaining -= 1
            group.has_signal = True
            rows = self._select(group)
            if group.drafts:
                events.append(DraftStep(group.canvas_index, group.steps_run, argmax[rows], accepted[rows],
                                        result.entropy[rows], stopped[rows], canvas[rows], group))
            if group.remaining == 0 or all(stopped_rows[r] for r in group.rows):
                events.append(self._commit(group))
        return events

    def _sample(self, hidden: torch.Tensor, running: list[Group], temperature: torch.Tensor) -> StepResult:
        model, n = self.model, hidden.shape[0]
        if not self.exact:
            uniforms = torch.zeros(n, self.canvas_length, dtype=torch.float64, device=model.device)
            for group in running:
                uniforms[self._select(group)] = draw_uniforms(group.size * self.canvas_length, group.generator,
                                                              model.device).view(group.size, -1)
            controlled = [g for g in running if g.controlled]
            if not controlled:
                step = self._fast(hidden, temperature, uniforms)
            else:
                step = self._fast_controlled(hidden, temperature, uniforms, running, controlled)
            # Rows that take the argmax still drew their uniforms: a row's random numbers do not depend on it.
            step.sampled = torch.where(self.greedy[:n, None], step.argmax, step.sampled)
            return step
        # The reference's own operations and draws, group by group.
        sampled = torch.empty(n, self.canvas_length, dtype=torch.long, device=model.device)
        argmax, entropy = torch.empty_like(sampled), torch.empty(sampled.shape, device=model.device)
        soft = torch.empty_like(self.soft[:n])
        for group in running:
            rows = self._select(group)
            config = group.config
            step = reference_step(model.logits(hidden[rows]), self._temperature(group), model.dtype,
                                  group.generator, self.bias[rows] if config.biases else None, config.top_k,
                                  config.top_p)
            sampled[rows], argmax[rows], entropy[rows] = step.sampled, step.argmax, step.entropy
            soft[rows] = model.soft_embeddings(step.self_conditioning)
        return StepResult(sampled, argmax, entropy, soft)

    def _fast(self, hidden: torch.Tensor, temperature: torch.Tensor, uniforms: torch.Tensor,
              controls: Controls | None = None) -> StepResult:
        model = self.model
        return fast_step(hidden, model.head_matrix, model.embedding_matrix, self.embed_scale,
                         model.config.final_logit_softcapping, temperature, uniforms.reshape(-1, 1), self.workspace,
                         controls=controls)

    def _fast_controlled(self, hidden: torch.Tensor, temperature: torch.Tensor, uniforms: torch.Tensor,
                         running: list[Group], controlled: list[Group]) -> StepResult:
        """The fast step with the controlled groups' rows through the controlled path, the others (if any) through
        the unchanged one: each row's result depends on its own settings only."""
        device, n = self.model.device, hidden.shape[0]
        mine = sorted(row for g in controlled for row in g.rows)
        chosen = torch.tensor(mine, device=device)
        controls = Controls(bias=self.bias.index_select(0, chosen) if any(g.config.biases for g in controlled)
                            else None,
                            top_k=self.top_k.index_select(0, chosen), top_p=self.top_p.index_select(0, chosen),
                            max_top_k=max(self._top_k(g.config) for g in controlled),
                            uses_top_p=any(g.config.top_p is not None and g.config.top_p < 1 for g in controlled))
        step = self._fast(hidden.index_select(0, chosen), temperature.index_select(0, chosen),
                          uniforms.index_select(0, chosen), controls)
        if len(mine) == n:
            return step
        others = torch.tensor(sorted(set(range(n)) - set(mine)), device=device)
        plain = self._fast(hidden.index_select(0, others), temperature.index_select(0, others),
                           uniforms.index_select(0, others))
        merged = []
        for name in ("sampled", "argmax", "entropy", "self_conditioning"):
            a, b = getattr(step, name), getattr(plain, name)
            out = torch.empty((n,) + tuple(a.shape[1:]), dtype=a.dtype, device=device)
            out[chosen], out[others] = a, b
            merged.append(out)
        return StepResult(*merged)

    def _temperature(self, group: Group) -> torch.Tensor | None:
        config = group.config
        if not config.has_temperature:
            return None
        return temperature_at(group.remaining, config.max_denoising_steps, config.t_min, config.t_max).to(
            self.model.device)

    def _control(self, group: Group, hidden: torch.Tensor, result: StepResult, accepted: torch.Tensor,
                 ready: torch.Tensor) -> None:
        """Let a group's canvas control decide its rows' proposals and acceptance (in place)."""
        rows = self._select(group)
        config = group.config
        group.logits_at = processed_logits_at(self.model, hidden[rows], self._temperature(group),
                                              self.bias[rows] if config.biases else None, config.top_k, config.top_p)
        mine = StepResult(result.sampled[rows], result.argmax[rows], result.entropy[rows],
                          result.self_conditioning[rows])
        mine, accepted[rows], ready[rows] = group.control.accept(
            group.canvas_index, self.canvas[rows], mine, group.config.entropy_bound, group.logits_at, group.generator)
        result.sampled[rows], result.argmax[rows], result.entropy[rows] = mine.sampled, mine.argmax, mine.entropy

    def _decode_each(self, running: list[Group], soft: torch.Tensor | None) -> torch.Tensor:
        """The reference's decoder pass one group at a time: each group's matmuls see exactly the rows they see
        alone (a CPU BLAS may round a row differently in a product of another height: one row per expert alone, two
        in a batch), so that a group's tokens in reference mode do not depend on what runs beside it."""
        hidden = None
        for group in running:
            rows = self._select(group)
            # alone, a group's first step has no self-conditioning signal (zeros here would give the same)
            signal = soft[rows] if soft is not None and group.has_signal else None
            part = self.model.decode(self.canvas[rows], self.cache.decoder_plan(self.model.rope, group.rows,
                                                                                 self.canvas_length), signal)
            if hidden is None:
                hidden = part.new_zeros(self.in_use, *part.shape[1:])
            hidden[rows] = part
        return hidden

    def _decoder_plan(self, n: int, guide: bool = False):
        """The decoder's plan over rows 0 .. n - 1 of the main cache (or the guide cache), kept while nothing moved."""
        key = (n, self._layout_version)
        if guide not in self._plans or self._plans[guide][0] != key:
            cache = self.guide_cache if guide else self.cache
            self._plans[guide] = key, cache.decoder_plan(self.model.rope, n, self.canvas_length)
        return self._plans[guide][1]

    # ---- canvas boundaries ------------------------------------------------------------------------------------

    def _commit(self, group: Group) -> CanvasCommitted:
        argmax = self.argmax[self._select(group)].clone()
        if group.control is not None:
            argmax = group.control.complete(group.canvas_index, argmax, group.logits_at)
            group.control.commit(group.canvas_index, argmax)
        config, length = group.config, self.canvas_length
        logprobs = self._logprobs(group, argmax) if group.wants_logprobs else None
        was_finished = group.finished
        group.sequences = torch.cat([group.sequences, argmax], dim=1)
        over_budget = (group.canvas_index + 1) * length >= group.budget
        group.finished = mark_finished(group.sequences, group.finished, length, config.eos_token_ids,
                                       config.pad_token_id, over_budget)
        produced = min(length, group.budget - group.canvas_index * length)
        event = CanvasCommitted(group.canvas_index, group.sequences[:, -length:][:, :produced],
                                group.finished.clone(), group.steps_run, group)
        if logprobs is not None:
            values, top_ids, top_values = logprobs
            padded = was_finished[:, None] | (group.sequences[:, -length:] != argmax)  # pad written after the end
            values = values.masked_fill(padded, float("nan"))
            event.logprobs, event.top_ids, event.top_logprobs = (values[:, :produced], top_ids[:, :produced],
                                                                 top_values[:, :produced])
        group.canvas_index += 1
        if bool(group.finished.all()):
            group.done = True
        else:
            group.pending = group.sequences[:, -length:]
            group.pending_valid = torch.ones_like(group.pending, dtype=torch.bool)
            if config.frequency_penalty or config.presence_penalty:
                self._write_bias(group)  # the next canvas counts this one's tokens
        return event

    def _logprobs(self, group: Group, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probabilities of a group's committed tokens [B, L] under each row's last processed logits, one row
        at a time ([L, V] fp32), with the `top_logprobs` most likely tokens."""
        config, parts = group.config, []
        for i, row in enumerate(group.rows):
            temperature = self.last_temperature[row] if config.has_temperature else None
            bias = self.bias[row] if config.biases else None
            processed = process_logits(self.model.logits(self.last_hidden[row]), temperature, bias, config.top_k,
                                       config.top_p)
            parts.append(token_logprobs(processed, tokens[i], config.top_logprobs))
        return tuple(torch.stack(column) for column in zip(*parts))

    def _prefill(self) -> None:
        """Encode every group's pending tokens (new prompts, committed canvases), then start their canvases."""
        pending = [g for g in self.groups if g.pending is not None]
        # A group whose tokens are all cached already (a draft after a committed prefix) has nothing to encode.
        self._encode(self.cache, [Pending(g, g.pending, g.pending_valid) for g in pending if g.pending.shape[1]])
        self._encode(self.guide_cache, [self._unprompted(g) for g in pending if g.config.guides])
        for group in pending:
            self._start_canvas(group)

    def _unprompted(self, group: Group) -> Pending:
        """What a guided group's rows of the guide cache take next: BOS in place of its prompt, then each canvas it
        commits."""
        ids = (torch.full((group.size, 1), self.model.config.bos_token_id, device=self.model.device)
               if group.canvas_index == 0 else group.pending)
        return Pending(group, ids, torch.ones_like(ids, dtype=torch.bool))

    def _encode(self, cache: KVCache | None, items: list[Pending]) -> None:
        """Encode each item's tokens into its group's rows of `cache`, in forwards batched by length (one forward
        per group in reference mode, for the reason `_decode_each` gives)."""
        batches = ([[item] for item in items] if self.exact
                   else batches_by_length(items, lambda item: item.ids.shape[1], lambda item: item.group.size))
        for batch in batches:
            width = max(item.ids.shape[1] for item in batch)
            ids = torch.cat([torch.nn.functional.pad(item.ids, (0, width - item.ids.shape[1])) for item in batch])
            valid = torch.cat([torch.nn.functional.pad(item.valid, (0, width - item.valid.shape[1])) for item in batch])
            rows = [row for item in batch for row in item.group.rows]
            counts = [item.ids.shape[1] for item in batch for _ in item.group.rows]
            self.model.encode(ids, cache.encoder_plan(self.model.rope, valid, rows, counts), exact=self.exact)
            cache.commit(valid, rows, counts)
            self._layout_version += 1

    def _start_canvas(self, group: Group) -> None:
        rows = self._select(group)
        canvas = draw_tokens(group.size, self.canvas_length, self.vocab_size, group.generator, self.model.device)
        if group.control is not None:
            canvas = group.control.begin(group.canvas_index, canvas)
        self.canvas[rows] = canvas
        self.argmax[rows] = -1  # no previous argmax: the first step is never "stable"
        self.soft[rows] = 0  # no signal yet: zeros give exactly what skipping self-conditioning gives
        self.stopped[rows] = False
        self.run[rows] = 0
        self.steps_left[rows] = group.config.max_denoising_steps
        group.remaining = group.config.max_denoising_steps
        group.steps_run, group.has_signal = 0, False
        group.pending = group.pending_valid = None


Item = TypeVar("Item")


def batches_by_length(items: list[Item], length: Callable[[Item], int],
                      rows: Callable[[Item], int] = lambda item: 1) -> list[list[Item]]:
    """Items whose tokens are to be encoded (`length` tokens in each of `rows` rows), longest first, batched so that
    padding every row to its batch's longest at most doubles the work of a batch."""
    batches: list[list[Item]] = []
    for item in sorted(items, key=lambda item: -length(item)):
        if batches:
            batch = batches[-1]
            tokens = sum(length(i) * rows(i) for i in batch) + length(item) * rows(item)
            if length(batch[0]) * (sum(rows(i) for i in batch) + rows(item)) <= 2 * tokens:
                batch.append(item)
                continue
        batches.append([item])
    return batches


def mark_finished(sequences: torch.Tensor, finished: torch.Tensor, canvas_length: int, eos_token_ids: list[int],
                  pad: int | None, over_budget: bool) -> torch.Tensor:
    """Rows done after the last committed canvas (EOS in it, or the budget reached), and, in place, pad for the
    rows that were already done and after each row's first EOS (kept), as the reference does."""
    device = sequences.device
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
    canvas = sequences[:, -canvas_length:]
    newly = torch.isin(canvas, eos).any(dim=-1) if eos.numel() else torch.zeros_like(finished)
    if over_budget:
        newly = torch.ones_like(finished)
    if pad is not None and bool((finished | newly).any()):
        canvas[finished] = pad
        if eos.numel():
            is_eos = torch.isin(canvas, eos)
            seen = is_eos.cumsum(dim=-1)
            canvas[(seen > 0) & ~((seen == 1) & is_eos)] = pad
    return finished | newly


def processed_logits_at(model: DiffusionGemma, hidden: torch.Tensor, temperature: torch.Tensor | None,
                        bias: torch.Tensor | None = None, top_k: int | None = None,
                        top_p: float | None = None) -> Callable[[int, int], torch.Tensor]:
    """Processed logits of single canvas positions, computed on demand (the fast step keeps none); `bias` is
    [rows, V] or None."""
    def logits_at(row: int, position: int) -> torch.Tensor:
        return process_logits(model.logits(hidden[row, position]), temperature, None if bias is None else bias[row],
                              top_k, top_p)
    return logits_at
