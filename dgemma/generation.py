"""The generation API: `generate` and `generate_steps` run one batch through the engine; `autoregressive_steps`
decodes token by token with the encoder alone (a `TokenBatch` of one sequence; `TokenBatch` decodes several side by
side); `speculative_steps` decodes exactly as it does, verifying diffusion drafts a canvas at a time.

Design choices:
- `generate_steps` is a generator of events over token ids (a DraftStep after every denoising step, a
  CanvasCommitted after every canvas, then the GenerationOutput); `generate` consumes it. Text, terminals and
  HTTP streaming are layers on top. The denoising itself is the engine's (engine.py), shared with the server.
- The batch is one engine group: one generator, one GenerationConfig, canvases in lockstep. With
  `sampling="reference"` the random numbers are drawn in the reference's order and shapes, so that after
  `torch.manual_seed(s)` the output equals transformers' `generate()` token for token.
- `max_new_tokens` is exact: the last canvas is denoised whole (its tokens depend on each other) and cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import torch

from .cache import KVCache
from .engine import SAMPLING_MODES, CanvasCommitted, DraftStep, Engine, Group, batches_by_length, until_eos
from .generation_config import GenerationConfig
from .model import DiffusionGemma
from .sampling import process_logits

if TYPE_CHECKING:
    from .constraints import CanvasControl

__all__ = ["generate", "generate_steps", "autoregressive_steps", "speculative_steps", "SpeculativeStats",
           "GenerationOutput", "DraftStep", "CanvasCommitted"]


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [B, prompt + new]
    tokens_per_forward: torch.Tensor  # [B] generated non-pad tokens / decoder passes the row needed
    past_key_values: KVCache
    decoder_forward_passes: torch.Tensor  # [B]
    # With `logprobs=True` (or `top_logprobs=N`): each new token's log-probability under the processed
    # distribution that committed it, [B, new] fp32 (nan for pad written after a row ended, -inf for a token
    # outside a top_k/top_p truncation, e.g. a fixed infill token), and the N most likely tokens at each
    # position with theirs, [B, new, N] each (ids, log-probabilities).
    logprobs: torch.Tensor | None = None
    top_logprob_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


# ---- the loop ----------------------------------------------------------------------------------------------------

    def new_tokens(self, row: int, prompt_length: int, eos_token_ids: list[int]) -> list[int]:
        """Row `row`'s generated tokens, up to and including the first end-of-generation token."""
        return until_eos(self.sequences[row, prompt_length:].tolist(), eos_token_ids)[0]


def _check_inputs(model: DiffusionGemma, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  cache: KVCache | None) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long,
                                                                                                   torch.int32):
        raise ValueError(f"`input_ids` must be an integer tensor of shape [batch, length], got "
                         f"{getattr(input_ids, 'shape', type(input_ids))}")
    if input_ids.shape[1] == 0:
        raise ValueError("`input_ids` is empty: give at least one prompt token (e.g. BOS)")
    vocab = model.config.vocab_size
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        raise ValueError(f"`input_ids` holds ids outside the vocabulary [0, {vocab})")
    image = model.config.image_token_id
    if image is not None and bool((input_ids == image).any()):
        raise ValueError(f"the prompt contains image tokens (id {image}); dgemma runs the text model only")
    expected = input_ids.shape[1] + (cache.length if cache is not None else 0)
    if attention_mask is not None and (attention_mask.dim() != 2 or tuple(attention_mask.shape) != (
            input_ids.shape[0], expected)):
        raise ValueError(f"`attention_mask` passed to generate must be 2D [batch, cached + new tokens] = "
                         f"{[input_ids.shape[0], expected]}, got {list(attention_mask.shape)}")
    if cache is not None and cache.batch_size != input_ids.shape[0]:
        raise ValueError(f"`past_key_values` holds {cache.batch_size} rows but `input_ids` has {input_ids.shape[0]}")


@torch.no_grad()
def generate_steps(model: DiffusionGemma, input_ids: torch.Tensor, config: GenerationConfig,
                   attention_mask: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                   sampling: str = "fast", generator: torch.Generator | None = None,
                   control: CanvasControl | None = None,
                   ) -> Iterator[DraftStep | CanvasCommitted | GenerationOutput]:
    """Yield a DraftStep after every denoising step, a CanvasCommitted after every canvas, then the output.

    `control` (fast sampling only) fixes tokens or enforces a grammar on every canvas; see constraints.py."""
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"`sampling` must be 'fast' or 'reference', got {sampling!r}")
    _check_inputs(model, input_ids, attention_mask, past_key_values)
    batch, prompt_length = input_ids.shape
    cache = past_key_values or KVCache(model.config, batch, model.dtype, model.device)
    cached = cache.length
    new_mask = None
    if attention_mask is not None:
        attention_mask = attention_mask.to(device=cache.device, dtype=torch.bool)
        if cached:
            cache.valid[:, :cached] = attention_mask[:, :cached]  # the caller's mask is the authority, as there
        new_mask = attention_mask[:, cached:]
    canvas = model.config.canvas_length
    budget = config.token_budget(cached + prompt_length)
    limit = model.config.max_position_embeddings
    if cached + prompt_length + budget > limit:
        raise ValueError(f"{cached + prompt_length} context tokens plus max_new_tokens={budget} exceed the model's "
                         f"context of {limit} tokens (max_position_embeddings)")
    cache.reserve(cached + prompt_length + -(-budget // canvas) * canvas)
    engine = Engine(model, cache, sampling)
    group = engine.add(Group(input_ids, config, new_mask, generator, control))
    commits: list[CanvasCommitted] = []
    while not group.done:
        for event in engine.step():
            if isinstance(event, CanvasCommitted):
                commits.append(event)
            yield event
    sequences = group.sequences[:, :prompt_length + budget]
    new_tokens = sequences[:, prompt_length:]
    pad = config.pad_token_id
    counted = (new_tokens != pad).sum(dim=-1) if pad is not None else torch.full((batch,), new_tokens.shape[1],
                                                                                     device=new_tokens.device)
    output = GenerationOutput(sequences=sequences, tokens_per_forward=counted / group.passes.clamp_min(1),
                              past_key_values=cache, decoder_forward_passes=group.passes)
    if group.wants_logprobs:
        output.logprobs = torch.cat([c.logprobs for c in commits], dim=1)
        output.top_logprob_ids = torch.cat([c.top_ids for c in commits], dim=1)
        output.top_logprobs = torch.cat([c.top_logprobs for c in commits], dim=1)
    yield output


def generate(model: DiffusionGemma, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             past_key_values: KVCache | None = None, generation_config: GenerationConfig | None = None,
             sampling: str = "fast", generator: torch.Generator | None = None, control: CanvasControl | None = None,
             **overrides: Any) -> GenerationOutput:
    """Generate after `input_ids` [B, T] (left-padded, with `attention_mask`, for B > 1).

    `overrides` are GenerationConfig fields (plus `entropy_bound`), applied on top of `generation_config`
    (default: the checkpoint's generation_config.json, when the model has one). With `past_key_values`,
    `input_ids` holds only uncached tokens.
    """
    base = generation_config or getattr(model, "generation_config", None) or GenerationConfig()
    config = base.updated(**overrides)
    for event in generate_steps(model, input_ids, config, attention_mask, past_key_values, sampling, generator,
                                control):
        if isinstance(event, GenerationOutput):
            return event
    raise AssertionError("generate_steps ended without an output")


class _NextToken:
    """The autoregressive sampler of `autoregressive_steps` and `speculative_steps`: one token from the encoder's
    logits at a position, under the logits processors of a GenerationConfig (top_k, top_p, logit_bias, and the
    penalties, counting the tokens generated so far), applied as on a canvas: (soft-capped logits + bias) / T,
    then truncated; temperature 0 is the argmax. One draw from `generator` per token, so that both decoders consume
    the same random numbers for the same tokens."""

    def __init__(self, model: DiffusionGemma, temperature: float, generator: torch.Generator | None,
                 processors: GenerationConfig | None):
        device, vocab = model.device, model.config.vocab_size
        self.temperature, self.generator, self.processors, self.device = temperature, generator, processors, device
        self.top_k, self.top_p = (processors.top_k, processors.top_p) if processors is not None else (None, None)
        self.bias = self.counts = None
        if processors is not None and processors.biases:
            self.bias = torch.zeros(vocab, dtype=torch.float32, device=device)
            for token, value in (processors.logit_bias or {}).items():
                self.bias[token] = value
            self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token from fp32 logits [V]; counted for the penalties from then on."""
        if self.bias is not None:
            penalties = self.processors.frequency_penalty * self.counts + \
                self.processors.presence_penalty * (self.counts > 0)
            logits = logits + self.bias - penalties
        if self.temperature == 0:  # truncation always keeps the argmax
            token = int(logits.argmax())
        else:
            probs = torch.softmax(process_logits(logits, self.temperature, None, self.top_k, self.top_p), dim=-1)
            where = self.generator.device if self.generator is not None else self.device
            token = int(torch.multinomial(probs.to(where), 1, generator=self.generator))
        if self.counts is not None:
            self.counts[token] += 1
        return token


def _check_single(model: DiffusionGemma, input_ids: torch.Tensor, what: str) -> None:
    _check_inputs(model, input_ids, None, None)
    if input_ids.shape[0] != 1:
        raise ValueError(f"{what} decoding takes one sequence")


@dataclass(eq=False)
class TokenSequence:
    """One sequence of a `TokenBatch`: its cache row, the tokens it encodes next (its prompt, then its newest
    token), and how far it has got."""

    row: int
    pending: torch.Tensor  # [1, T]
    max_new_tokens: int
    stop: set[int]
    next_token: _NextToken
    produced: int = 0
    finished: bool = field(init=False)  # the last token was an end-of-generation token, or the budget is spent

    def __post_init__(self) -> None:
        self.finished = self.max_new_tokens <= 0


class TokenBatch:
    """Sequences decoded token by token with the encoder alone (it is an autoregressive LM), side by side in the rows
    of one cache. Each `step` encodes every running sequence's pending tokens (prompts and newest tokens together, in
    forwards batched by length; rows of different lengths attend each to exactly its own keys) and draws each
    sequence's next token with its own sampler and generator. Alone it is `autoregressive_steps`; `dgemma serve`
    keeps one for its `decode: autoregressive` requests, so that concurrent ones share their forwards.

    Forwards run with `exact=False` by default (dgemma.model: a lone token's products in `dgemma.one_row`'s compiled
    kernels, where a large bf16 or fp16 model on a CPU takes them); `exact=True` keeps the reference's kernels. A
    sequence's tokens are the same alone and in a batch wherever the kernels give a row the same result in a batch of
    any size; a batch's logits can differ from a lone row's by rounding (fp32: within 2e-5 on the bundled model; a
    large bf16 model's lone row takes the one-row kernels), so that a draw near a boundary can differ."""

    def __init__(self, model: DiffusionGemma, rows: int, capacity: int = 0, exact: bool = False):
        self.model = model
        self.exact = exact
        self.cache = KVCache(model.config, rows, model.dtype, model.device, capacity=capacity)
        self.sequences: list[TokenSequence] = []

    def add(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_ids: list[int] | None = None,
            temperature: float = 1.0, generator: torch.Generator | None = None,
            processors: GenerationConfig | None = None) -> TokenSequence:
        """Start decoding after `input_ids` [1, T] in a free row (ValueError when every row is taken)."""
        _check_single(self.model, input_ids, "autoregressive")
        taken = {sequence.row for sequence in self.sequences}
        free = [row for row in range(self.cache.batch_size) if row not in taken]
        if not free:
            raise ValueError(f"all {self.cache.batch_size} rows of the batch are taken")
        sequence = TokenSequence(free[0], input_ids.to(self.model.device), max_new_tokens, set(eos_token_ids or []),
                                 _NextToken(self.model, temperature, generator, processors))
        self.cache.clear(sequence.row)
        self.sequences.append(sequence)
        return sequence

    def remove(self, sequence: TokenSequence) -> None:
        """Free the sequence's row."""
        self.sequences.remove(sequence)
        self.cache.clear(sequence.row)

    @torch.no_grad()
    def step(self) -> list[tuple[TokenSequence, int]]:
        """The next token of every sequence not finished, in the order they were added."""
        running = [sequence for sequence in self.sequences if not sequence.finished]
        tokens: dict[int, int] = {}
        for batch in batches_by_length(running, lambda sequence: sequence.pending.shape[1]):
            width = max(sequence.pending.shape[1] for sequence in batch)
            ids = torch.cat([torch.nn.functional.pad(s.pending, (0, width - s.pending.shape[1])) for s in batch])
            counts = [sequence.pending.shape[1] for sequence in batch]
            lengths = torch.tensor(counts, device=ids.device)
            valid = torch.arange(width, device=ids.device) < lengths[:, None]
            rows = [sequence.row for sequence in batch]
            hidden = self.model.encode(ids, self.cache.encoder_plan(self.model.rope, valid, rows, counts), self.exact)
            self.cache.commit(valid, rows, counts)
            last = hidden[torch.arange(len(batch), device=ids.device), lengths - 1]
            logits = self.model.logits(last[0] if len(batch) == 1 else last, self.exact)  # one row: the 1-D product
            for i, sequence in enumerate(batch):
                token = sequence.next_token(logits if len(batch) == 1 else logits[i])
                sequence.produced += 1
                sequence.finished = token in sequence.stop or sequence.produced >= sequence.max_new_tokens
                sequence.pending = torch.tensor([[token]], device=ids.device)
                tokens[id(sequence)] = token
        return [(sequence, tokens[id(sequence)]) for sequence in running]


def autoregressive_steps(model: DiffusionGemma, input_ids: torch.Tensor, max_new_tokens: int,
                         eos_token_ids: list[int] | None = None, temperature: float = 1.0,
                         generator: torch.Generator | None = None, *,
                         processors: GenerationConfig | None = None, exact: bool = False) -> Iterator[int]:
    """Next-token decoding with the encoder alone (it is an autoregressive LM): yields each new token of a
    single sequence [1, T], sampled by `_NextToken` (temperature 0 is greedy; `processors` brings a
    GenerationConfig's logits processors): a `TokenBatch` of one (`exact`: its kernels). The baseline `dgemma bench`
    compares diffusion against, and `--decode autoregressive`."""
    batch = TokenBatch(model, 1, capacity=input_ids.shape[1] + max_new_tokens, exact=exact)
    sequence = batch.add(input_ids, max_new_tokens, eos_token_ids, temperature, generator, processors)
    while not sequence.finished:
        for _, token in batch.step():
            yield token


@dataclass
class SpeculativeStats:
    """What `speculative_steps` spent: decoder passes drafting, encoder passes verifying (the prompt's prefill not
    counted, as for autoregressive decoding), and drafted tokens kept."""

    decoder_passes: int = 0
    encoder_passes: int = 0
    drafts: int = 0
    drafted_tokens_kept: int = 0

    @property
    def forwards(self) -> int:
        return self.decoder_passes + self.encoder_passes


@torch.no_grad()
def speculative_steps(model: DiffusionGemma, input_ids: torch.Tensor, max_new_tokens: int,
                      eos_token_ids: list[int] | None = None, temperature: float = 1.0,
                      generator: torch.Generator | None = None, *, draft: GenerationConfig,
                      draft_generator: torch.Generator | None = None, processors: GenerationConfig | None = None,
                      stats: SpeculativeStats | None = None) -> Iterator[int]:
    """Autoregressive decoding drafted by diffusion: exactly the tokens `autoregressive_steps` yields with the same
    arguments and generator and `exact=True` (the kernels this verification runs; by default a large bf16 model's
    lone tokens take one-row kernels, which can round a logit differently), at more than one token per forward where
    the drafts are good.

    Each round the diffusion decoder drafts one canvas after the committed tokens (with `draft`'s sampler settings
    and `draft_generator`; by default a CPU generator seeded with `generator`'s seed + 1, so that a seeded call drafts
    the same canvases every time), its first position fixed to the last token sampled. One causal encoder pass over the
    canvas gives the autoregressive distribution at every position after it; walking left to right, the next token
    is drawn from that distribution with `generator` (one draw per token, as `autoregressive_steps` draws), and the
    walk goes on while it equals the drafted token. The first token that differs ends the round: it is kept (it is
    a sample of the right distribution), and the cache keeps the keys and values of the tokens before it. Every
    token yielded is therefore drawn from p(token | everything before it), whatever the draft; the draft only
    decides how many of them one encoder pass verifies. `stats` counts the passes (tokens per forward =
    tokens / stats.forwards)."""
    from .constraints import FixedTokens

    _check_single(model, input_ids, "speculative")
    length = model.config.canvas_length
    cache = KVCache(model.config, 1, model.dtype, model.device,
                    capacity=input_ids.shape[1] + max_new_tokens + length)
    stop = set(eos_token_ids or [])
    stats = stats if stats is not None else SpeculativeStats()
    next_token = _NextToken(model, temperature, generator, processors)
    if draft_generator is None and generator is not None:
        draft_generator = torch.Generator().manual_seed(generator.initial_seed() + 1)
    prompt = input_ids.to(model.device)
    valid = torch.ones_like(prompt, dtype=torch.bool)
    hidden = model.encode(prompt, cache.encoder_plan(model.rope, valid))
    cache.commit(valid)
    last = next_token(model.logits(hidden[0, -1]))
    yield last
    produced = 1
    draft = draft.updated(max_new_tokens=length, max_length=None)
    while produced < max_new_tokens and last not in stop:
        engine = Engine(model, cache, "fast")
        group = engine.add(Group(torch.empty(1, 0, dtype=torch.long), draft, generator=draft_generator,
                                 control=FixedTokens(torch.tensor([[last]]), length), drafts=False))
        while not group.done:
            engine.step()
        stats.decoder_passes += int(group.passes[0])  # the engine's count (a guided step is two passes)
        stats.drafts += 1
        canvas = group.sequences[:, -length:].to(model.device)
        canvas_valid = torch.ones_like(canvas, dtype=torch.bool)
        logits = model.logits(model.encode(canvas, cache.encoder_plan(model.rope, canvas_valid))[0])
        stats.encoder_passes += 1
        kept = 1  # the canvas's first token, `last`, was sampled from the right distribution
        for position in range(length):
            last = next_token(logits[position])
            yield last
            produced += 1
            matches = position + 1 < length and last == int(canvas[0, position + 1])
            if matches:
                kept += 1
                stats.drafted_tokens_kept += 1
            if not matches or produced == max_new_tokens or last in stop:
                break
        cache.commit(canvas_valid, counts=[kept])
