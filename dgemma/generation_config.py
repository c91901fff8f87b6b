"""Generation settings: the fields of the reference's DiffusionGemmaGenerationConfig that change what is generated.

One dataclass, built once per request from generation_config.json, `generate(**overrides)` or an OpenAI request.
From generation_config.json a null means "use the default"; passed as an override, None disables the feature
(e.g. `stability_threshold=None` turns adaptive stopping off), as in the reference.

dgemma adds per-call settings (PER_CALL), never read from or written to generation_config.json: `do_sample`,
the logits processors `top_k`, `top_p`, `logit_bias`, `frequency_penalty`, `presence_penalty` (see the field
comments and sampling.py for their exact meaning on a canvas), the prompt's `guidance_scale`, and the outputs
`logprobs`, `top_logprobs`. At their defaults they change nothing, so `sampling="reference"` stays token-identical
to transformers; set, they apply in both sampling modes (do_sample=False and guidance_scale in fast mode only).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_MAX_NEW_TOKENS = 1024  # the reference's 256 cuts answers to one canvas
# How new tokens are produced: denoised a canvas at a time (the model's own mode), token by token with the encoder
# alone, or token by token with diffusion drafts verified by the encoder (generation.py).
DECODE_MODES = ("diffusion", "autoregressive", "speculative")
# Per-call settings: dgemma's own, never written to generation_config.json nor read from it (transformers'
# GenerationConfig has top_k and top_p with other defaults, which the reference's generate() does not apply).
PER_CALL = ("do_sample", "top_k", "top_p", "logit_bias", "frequency_penalty", "presence_penalty", "logprobs",
            "top_logprobs", "guidance_scale")


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
    # dgemma's, per call (never saved): False takes the argmax at every position instead of a sample (the
    # deterministic limit of the temperature schedule; OpenAI's `temperature: 0`). The schedule still sets the
    # entropies that decide how many positions a step keeps and when a canvas stops (their zero-temperature limit
    # would keep a whole canvas of first guesses at once), and the self-conditioning distribution. Fast sampling
    # only: the reference has no such mode.
    do_sample: bool = True
    # dgemma's logits processors and outputs, per call (never saved, never read from generation_config.json; see
    # PER_CALL). Every one is applied to the logits of every canvas position, in this order: `logit_bias` and the
    # penalties are added to the soft-capped logits (the logits the model outputs), the temperature divides them,
    # `top_k` then `top_p` truncate; the result is "the processed distribution", which everything a step does reads:
    # the sample, the argmax that is committed, the entropies that decide acceptance and stopping, the next step's
    # self-conditioning and the log-probabilities. At their defaults they change nothing.
    top_k: int | None = None  # keep the tokens whose logit is at least the k-th largest (ties kept); None or 0: off
    top_p: float | None = None  # keep the fewest most likely tokens whose probability reaches top_p; None or 1: off
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit at every position
    # OpenAI's penalties: token j's logit loses frequency_penalty * c[j] + presence_penalty * (c[j] > 0), c[j] the
    # times j occurs in the canvases committed so far (the prompt and the canvas being denoised excluded).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # Classifier-free guidance on the prompt, per call (fast sampling only): each step the decoder also runs on the
    # same canvas after BOS and the canvases committed so far, without the prompt, and the final states h become
    # h_bos + guidance_scale * (h - h_bos) before the vocabulary head (which is linear before its soft-cap, so the
    # logits combine the same way). 1: off. It costs a second decoder pass per step, counted as a pass.
    guidance_scale: float = 1.0
    # Return the log-probability of every committed token under the processed distribution of the last step that
    # ran for its row (the distribution the committed argmax was taken from), and `top_logprobs` alternatives.
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def truncates(self) -> bool:
        """Whether top_k or top_p removes any token."""
        return bool(self.top_k) or (self.top_p is not None and self.top_p < 1)

    @property
    def biases(self) -> bool:
        """Whether a bias is added to the logits (logit_bias, or a penalty that may apply)."""
        return bool(self.logit_bias) or self.frequency_penalty != 0 or self.presence_penalty != 0

    @property
    def guides(self) -> bool:
        """Whether the decoder's states are guided by the prompt (guidance_scale other than 1)."""
        return self.guidance_scale != 1

    @property
    def entropy_bound(self) -> float:
        return self.sampler_config.entropy_bound

    @property
    def has_temperature(self) -> bool:
        return self.t_min is not None and self.t_max is not None

    @property
    def stops_adaptively(self) -> bool:
        """Whether a canvas may end before its step budget (both stopping thresholds set)."""
        return self.stability_threshold is not None and self.confidence_threshold is not None

    def token_budget(self, context_length: int) -> int:
        """How many new tokens to generate after `context_length` (cached + prompt) tokens: `max_new_tokens`,
        else what `max_length` leaves, else DEFAULT_MAX_NEW_TOKENS."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length is not None:
            if self.max_length <= context_length:
                raise ValueError(f"`max_length` {self.max_length} leaves no room after {context_length} prompt tokens")
            return self.max_length - context_length
        return DEFAULT_MAX_NEW_TOKENS

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerationConfig":
        names = {f.name for f in fields(cls)} - set(PER_CALL)  # transformers' top_k/top_p are not ours
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
        """generation_config.json's fields; the per-call choices (PER_CALL), which the reference's config does
        not have or means otherwise, are not among them."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in PER_CALL}
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
        for name in ("do_sample", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be true or false (got {getattr(self, name)!r})")
        if self.top_k is not None and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool)
                                       or self.top_k < 0):
            raise ValueError(f"`top_k` must be an integer >= 0 (0 or None: off), got {self.top_k!r}")
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 <= self.top_p <= 1):
            raise ValueError(f"`top_p` must be a number from 0 to 1 (1 or None: off), got {self.top_p!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"`logit_bias` must map token ids to numbers, got {type(self.logit_bias).__name__}")
            for token, bias in self.logit_bias.items():
                if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                    raise ValueError(f"`logit_bias` keys must be token ids (integers >= 0), got {token!r}")
                if not _is_number(bias) or not math.isfinite(bias):
                    raise ValueError(f"`logit_bias` values must be finite numbers, got {bias!r} for token {token}")
        scale = self.guidance_scale
        if not _is_number(scale) or not math.isfinite(scale) or scale < 1:
            raise ValueError(f"`guidance_scale` must be a finite number >= 1 (1: off), got {scale!r}")
        top = self.top_logprobs
        if not isinstance(top, int) or isinstance(top, bool) or top < 0:
            raise ValueError(f"`top_logprobs` must be an integer >= 0, got {top!r}")
        for token in self.eos_token_ids + [t for t in (self.pad_token_id, self.bos_token_id) if t is not None]:
            if not isinstance(token, int) or token < 0:
                raise ValueError(f"token ids must be non-negative integers, got {token!r}")
