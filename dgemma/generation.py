"""Block-autoregressive generation: canvases of `canvas_length` tokens, each denoised by the entropy-bound sampler.

Design choices:
- `generate_steps` is a generator of events over token ids (a draft after every denoising step, a commit after
  every canvas); `generate` consumes it. Text, terminals and HTTP streaming are layers on top.
- Per canvas everything that does not change between steps (attention masks, RoPE tables, the temperature
  schedule) is built once before the step loop.
- `max_new_tokens` is exact: the last canvas is denoised whole (its tokens depend on each other) and cut.
- With `sampling="reference"` the random numbers are drawn in the reference's order and shapes (one initial
  canvas per canvas, one multinomial and one renoise draw per step, for finished rows too), so that after
  `torch.manual_seed(s)` the output equals transformers' `generate()` token for token.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from .cache import KVCache
from .model import DiffusionGemma
from .sampling import (StableAndConfident, Workspace, draw_uniforms, entropy_bound_acceptance, fast_step,
                       reference_step, renoise, temperature_at)

if TYPE_CHECKING:
    from .constraints import CanvasControl

DEFAULT_MAX_NEW_TOKENS = 1024  # the reference's 256 cuts answers to one canvas


@dataclass
class EntropyBoundSamplerConfig:
    """Same name and field as the reference's, so `sampler_config=` arguments carry over unchanged."""

    entropy_bound: float

    def __post_init__(self):
        if isinstance(self.entropy_bound, bool) or not isinstance(self.entropy_bound, (int, float)) \
                or self.entropy_bound <= 0:
            raise ValueError(f"`entropy_bound` must be a float > 0 (got {self.entropy_bound!r})")
        self.entropy_bound = float(self.entropy_bound)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class GenerationConfig:
    """The fields of the reference's DiffusionGemmaGenerationConfig that change what is generated.

    From generation_config.json a null means "use the default"; passed to `generate`, None disables the
    feature (e.g. `stability_threshold=None` turns adaptive stopping off), as in the reference.
    """

    max_new_tokens: int | None = None
    max_length: int | None = None
    max_denoising_steps: int = 48
    sampler_config: EntropyBoundSamplerConfig = field(default_factory=lambda: EntropyBoundSamplerConfig(0.1))
    t_min: float | None = 0.4
    t_max: float | None = 0.8
    stability_threshold: int | None = 1
    confidence_threshold: float | None = 0.005
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None

    @property
    def entropy_bound(self) -> float:
        return self.sampler_config.entropy_bound

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerationConfig":
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names and v is not None}
        if isinstance(values.get("sampler_config"), dict):
            sampler = dict(values["sampler_config"])
            sampler.pop("_cls_name", None)
            values["sampler_config"] = EntropyBoundSamplerConfig(**sampler)
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "GenerationConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "generation_config.json"
        return cls.from_dict(json.loads(path.read_text())) if path.is_file() else cls()

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["sampler_config"] = {"entropy_bound": self.entropy_bound, "_cls_name": "EntropyBoundSamplerConfig"}
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def updated(self, **overrides: Any) -> "GenerationConfig":
        """A copy with `overrides` applied (`entropy_bound=` is a shortcut for the sampler config)."""
        config = copy.deepcopy(self)
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names - {"entropy_bound"})
        if unknown:
            raise ValueError(f"Unexpected generation arguments: {unknown}")
        for key, value in overrides.items():
            if key == "entropy_bound":
                config.sampler_config = EntropyBoundSamplerConfig(value)
            elif key == "sampler_config" and isinstance(value, dict):
                config.sampler_config = EntropyBoundSamplerConfig(
                    **{k: v for k, v in value.items() if k != "_cls_name"})
            elif key == "sampler_config":
                config.sampler_config = EntropyBoundSamplerConfig(value.entropy_bound)
            else:
                setattr(config, key, value)
        config.validate()
        return config

    def validate(self) -> None:
        steps = self.max_denoising_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
            raise ValueError(f"`max_denoising_steps` must be a positive integer, but got {steps!r}")
        if not isinstance(self.sampler_config, EntropyBoundSamplerConfig):
            raise ValueError(f"`sampler_config` must be an EntropyBoundSamplerConfig, got {type(self.sampler_config)}")
        for name in ("t_min", "t_max"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or value < 0):
                raise ValueError(f"`{name}` must be >= 0.0 (got {value!r})")
        if self.t_min is not None and self.t_max is not None and self.t_max <= self.t_min:
            raise ValueError(f"`t_max` must be > `t_min` (got t_max={self.t_max} <= t_min={self.t_min})")
        threshold = self.stability_threshold
        if threshold is not None and (not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 0):
            raise ValueError(f"`stability_threshold` must be an integer >= 0 (got {threshold!r})")
        confidence = self.confidence_threshold
        if confidence is not None and (not _is_number(confidence) or confidence <= 0):
            raise ValueError(f"`confidence_threshold` must be a float > 0 (got {confidence!r})")
        for name in ("max_length", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"`{name}` must be a positive integer, but got {value!r}")
        for token in self.eos_token_ids + [t for t in (self.pad_token_id, self.bos_token_id) if t is not None]:
            if not isinstance(token, int) or token < 0:
                raise ValueError(f"token ids must be non-negative integers, got {token!r}")


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


@dataclass
class CanvasCommitted:
    """A canvas was committed: its tokens (cut to the token budget, pad after EOS) and which rows are done."""

    canvas_index: int
    tokens: torch.Tensor  # [B, <= L]
    finished: torch.Tensor  # [B] bool
    steps: int


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [B, prompt + new]
    tokens_per_forward: torch.Tensor  # [B] generated non-pad tokens / decoder passes the row needed
    past_key_values: KVCache
    decoder_forward_passes: torch.Tensor  # [B]


# ---- the loop ----------------------------------------------------------------------------------------------------

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
    if sampling not in ("fast", "reference"):
        raise ValueError(f"`sampling` must be 'fast' or 'reference', got {sampling!r}")
    if control is not None and sampling != "fast":
        raise ValueError("fixed tokens and grammars need sampling='fast' (the reference has neither)")
    _check_inputs(model, input_ids, attention_mask, past_key_values)
    device, dtype = model.device, model.dtype
    canvas_length, vocab = model.config.canvas_length, model.config.vocab_size
    batch, prompt_len = input_ids.shape
    input_ids = input_ids.to(device=device, dtype=torch.long)
    cached = past_key_values.length if past_key_values is not None else 0
    cur_len = cached + prompt_len
    if config.max_new_tokens is not None:
        max_new_tokens = config.max_new_tokens
    elif config.max_length is not None:
        max_new_tokens = config.max_length - cur_len
        if max_new_tokens <= 0:
            raise ValueError(f"`max_length` {config.max_length} leaves no room after {cur_len} prompt tokens")
    else:
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    num_canvases = math.ceil(max_new_tokens / canvas_length)

    mask = (attention_mask.to(device=device, dtype=torch.bool) if attention_mask is not None
            else torch.ones(batch, cur_len, dtype=torch.bool, device=device))
    cache = past_key_values or KVCache(model.config, batch, dtype, device)
    cache.reserve(cur_len + num_canvases * canvas_length)
    if cached:
        cache.valid[:, :cached] = mask[:, :cached]  # the caller's mask is the authority, as in the reference

    pad, eos = config.pad_token_id, torch.tensor(config.eos_token_ids, dtype=torch.long, device=device)
    stopper = (StableAndConfident(config.stability_threshold, config.confidence_threshold)
               if config.stability_threshold is not None and config.confidence_threshold is not None else None)
    temperatures = [temperature_at(step, config.max_denoising_steps, config.t_min, config.t_max)
                    if config.t_min is not None and config.t_max is not None else None
                    for step in range(config.max_denoising_steps + 1)]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    passes = torch.zeros(batch, dtype=torch.int32, device=device)
    workspace = Workspace()
    embed_scale = model.decoder.embed_tokens.scale_as(dtype)
    sequences = input_ids
    to_encode, new_valid = input_ids, mask[:, cached:]

    for canvas_index in range(num_canvases):
        positions = torch.arange(cache.length, cache.length + to_encode.shape[1], device=device).expand(batch, -1)
        plan = cache.plan(model.rope(positions), new_valid, encoder=True)
        model.encode(to_encode, plan)
        cache.commit(new_valid)

        start = cache.length
        canvas_valid = torch.ones(batch, canvas_length, dtype=torch.bool, device=device)
        canvas_positions = torch.arange(start, start + canvas_length, device=device).expand(batch, -1)
        plan = cache.plan(model.rope(canvas_positions), canvas_valid, encoder=False, fast_kernels=sampling == "fast")
        canvas = torch.randint(0, vocab, (batch, canvas_length), device=device, generator=generator)
        if control is not None:
            canvas = control.begin(canvas_index, canvas)
        argmax = canvas
        self_conditioning: torch.Tensor | None = None
        finished_denoising = torch.zeros(batch, dtype=torch.bool, device=device)
        if stopper is not None:
            stopper.reset()
        steps_run = 0
        for step in range(config.max_denoising_steps, 0, -1):
            passes += ~(finished_denoising | finished)
            soft = None
            if self_conditioning is not None:
                soft = model.soft_embeddings(self_conditioning) if sampling == "reference" else self_conditioning
            hidden = model.decode(canvas, plan, soft)
            if sampling == "reference":
                result = reference_step(model.logits(hidden), temperatures[step], dtype, generator)
            else:
                result = fast_step(hidden, model.head_matrix, model.embedding_matrix,
                                   embed_scale, model.config.final_logit_softcapping,
                                   temperatures[step], draw_uniforms(batch * canvas_length, generator, device),
                                   workspace)
            if control is None:
                accepted = entropy_bound_acceptance(result.entropy, config.entropy_bound)
                ready = None
            else:
                logits_at = processed_logits_at(model, hidden, temperatures[step])
                result, accepted, ready = control.accept(canvas_index, canvas, result, config.entropy_bound,
                                                         logits_at, generator)
            new_canvas = renoise(torch.where(accepted, result.sampled, canvas), accepted, vocab, generator)
            new_argmax, new_sc = result.argmax, result.self_conditioning
            if stopper is not None:
                if finished_denoising.any():
                    # Rows that already stopped keep their canvas and self-conditioning as they were. (Their
                    # entropy no longer matters: a stopped row stays stopped.)
                    rows = finished_denoising[:, None]
                    new_argmax = torch.where(rows, argmax, new_argmax)
                    new_canvas = torch.where(rows, canvas, new_canvas)
                    new_sc = torch.where(rows[..., None], self_conditioning, new_sc)
                stopped = stopper(new_argmax, result.entropy)
                finished_denoising = finished_denoising | (stopped if ready is None else stopped & ready)
            canvas, argmax, self_conditioning = new_canvas, new_argmax, new_sc
            steps_run += 1
            yield DraftStep(canvas_index, steps_run, argmax, accepted, result.entropy, finished_denoising.clone())
            if bool(finished_denoising.all()):
                break

        if control is not None:
            argmax = control.complete(canvas_index, argmax, logits_at)
            control.commit(canvas_index, argmax)
        sequences = torch.cat([sequences, argmax], dim=1)
        finished = _finalize_canvas(sequences, finished, canvas_length, eos, pad,
                                    max_length=cur_len + max_new_tokens)
        produced = min(canvas_length, max_new_tokens - canvas_index * canvas_length)
        yield CanvasCommitted(canvas_index, sequences[:, -canvas_length:][:, :produced], finished.clone(), steps_run)
        if bool(finished.all()):
            break
        to_encode = sequences[:, -canvas_length:]
        new_valid = torch.ones(batch, canvas_length, dtype=torch.bool, device=device)

    sequences = sequences[:, :prompt_len + max_new_tokens]
    new_tokens = sequences[:, prompt_len:]
    counted = (new_tokens != pad).sum(dim=-1) if pad is not None else torch.full((batch,), new_tokens.shape[1])
    yield GenerationOutput(sequences=sequences, tokens_per_forward=counted / passes.clamp_min(1),
                           past_key_values=cache, decoder_forward_passes=passes)


def processed_logits_at(model: DiffusionGemma, hidden: torch.Tensor, temperature: torch.Tensor | None):
    """Processed logits of single canvas positions, computed on demand (the fast step keeps none)."""
    def logits_at(row: int, position: int) -> torch.Tensor:
        logits = model.logits(hidden[row, position])
        return logits / temperature if temperature is not None else logits
    return logits_at


def _finalize_canvas(sequences: torch.Tensor, finished: torch.Tensor, canvas_length: int, eos: torch.Tensor,
                     pad: int | None, max_length: int) -> torch.Tensor:
    """Mark rows done (EOS in the canvas, or the length budget reached) and pad what follows EOS, in place."""
    newly = torch.isin(sequences[:, -canvas_length:], eos).any(dim=-1) if eos.numel() else torch.zeros_like(finished)
    if sequences.shape[1] >= max_length:
        newly = torch.ones_like(finished)
    previously = finished
    finished = previously | newly
    if pad is not None and bool(finished.any()):
        sequences[previously, -canvas_length:] = pad
        if eos.numel() and bool(newly.any()):
            canvas = sequences[:, -canvas_length:]
            is_eos = torch.isin(canvas, eos)
            seen = is_eos.cumsum(dim=-1)
            canvas[(seen > 0) & ~((seen == 1) & is_eos)] = pad
            sequences[:, -canvas_length:] = canvas
    return finished


def generate(model: DiffusionGemma, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             past_key_values: KVCache | None = None, generation_config: GenerationConfig | None = None,
             sampling: str = "fast", generator: torch.Generator | None = None, control: CanvasControl | None = None,
             **overrides: Any) -> GenerationOutput:
    """Generate after `input_ids` [B, T] (left-padded, with `attention_mask`, for B > 1).

    `overrides` are GenerationConfig fields (plus `entropy_bound`), applied on top of `generation_config`
    or the model's `generation_config.json`. With `past_key_values`, `input_ids` holds only uncached tokens.
    """
    config = (generation_config or model.generation_config).updated(**overrides)
    for event in generate_steps(model, input_ids, config, attention_mask, past_key_values, sampling, generator,
                                control):
        if isinstance(event, GenerationOutput):
            return event
    raise AssertionError("generate_steps ended without an output")


@torch.no_grad()
def autoregressive_steps(model: DiffusionGemma, input_ids: torch.Tensor, max_new_tokens: int,
                         eos_token_ids: list[int] | None = None, temperature: float = 1.0,
                         generator: torch.Generator | None = None) -> Iterator[int]:
    """Next-token decoding with the encoder alone (it is an autoregressive LM): yields each new token of a
    single sequence [1, T]. temperature 0 is greedy. The baseline `dgemma bench` compares diffusion against."""
    _check_inputs(model, input_ids, None, None)
    if input_ids.shape[0] != 1:
        raise ValueError("autoregressive decoding takes one sequence")
    device = model.device
    cache = KVCache(model.config, 1, model.dtype, device, capacity=input_ids.shape[1] + max_new_tokens)
    tokens = input_ids.to(device)
    stop = set(eos_token_ids or [])
    for _ in range(max_new_tokens):
        positions = torch.arange(cache.length, cache.length + tokens.shape[1], device=device)[None]
        valid = torch.ones_like(tokens, dtype=torch.bool)
        hidden = model.encode(tokens, cache.plan(model.rope(positions), valid, encoder=True))
        cache.commit(valid)
        logits = model.logits(hidden[:, -1])
        if temperature == 0:
            token = int(logits.argmax())
        else:
            token = int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator))
        yield token
        if token in stop:
            return
        tokens = torch.tensor([[token]], device=device)
