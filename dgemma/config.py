"""Model configuration, read from and written to a checkpoint's `config.json`.

Design choices:
- One typed dataclass for the text model plus the few top-level fields generation needs. Unknown keys are
  ignored on read; the raw JSON is kept so that a save writes back what a load read (vision config included).
- Everything the forward pass derives from the config (per-layer head dim and KV heads, which layers have a
  `v_proj`, the effective sliding window, RoPE inverse frequencies) is computed once here.
- The sliding window follows the reference's convention: with `use_bidirectional_attention == "all"` the stored
  value `w` becomes `w // 2 + 1` in memory and is written back as `(w' - 1) * 2`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SLIDING = "sliding_attention"
FULL = "full_attention"

ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "gelu_new", "silu", "relu")

# Defaults of the reference's DiffusionGemmaTextConfig for keys a config.json may omit.
_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_144,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 30,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "attention_bias": False,
    "sliding_window": 512,
    "final_logit_softcapping": 30.0,
    "use_bidirectional_attention": None,
    "num_experts": None,
    "top_k_experts": None,
    "moe_intermediate_size": None,
}

_DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


class ConfigError(ValueError):
    """A config.json that dgemma cannot build a model from."""


@dataclass(frozen=True)
class LayerSpec:
    """What one layer's attention looks like, derived from `layer_types` and `per_layer_config`."""

    kind: str  # SLIDING or FULL
    head_dim: int
    num_kv_heads: int
    has_v_proj: bool  # full layers reuse their keys as values

    @property
    def is_sliding(self) -> bool:
        return self.kind == SLIDING


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_activation: str
    max_position_embeddings: int
    initializer_range: float
    rms_norm_eps: float
    pad_token_id: int | None
    eos_token_id: int | list[int] | None
    bos_token_id: int | None
    attention_bias: bool
    sliding_window: int  # effective window, as the reference holds it in memory
    layer_types: list[str]
    per_layer_config: dict[int, dict[str, int]]
    rope_parameters: dict[str, dict[str, Any]]
    final_logit_softcapping: float | None
    use_bidirectional_attention: str | None
    num_experts: int | None
    top_k_experts: int | None
    moe_intermediate_size: int | None
    canvas_length: int = 256
    tie_word_embeddings: bool = True
    image_token_id: int | None = 258_880
    # The checkpoint's config.json as read, so that saving writes back every key we do not model.
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # ---- derived values ----------------------------------------------------------------------------------

    @property
    def has_experts(self) -> bool:
        return bool(self.num_experts)

    @property
    def encoder_is_causal(self) -> bool:
        return self.use_bidirectional_attention != "all"

    @property
    def embed_scale(self) -> float:
        return self.hidden_size**0.5

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def layer(self, index: int) -> LayerSpec:
        kind = self.layer_types[index]
        overrides = self.per_layer_config.get(index, {})
        return LayerSpec(
            kind=kind,
            head_dim=overrides.get("head_dim", self.head_dim),
            num_kv_heads=overrides.get("num_key_value_heads", self.num_key_value_heads),
            has_v_proj=kind == SLIDING,
        )

    @property
    def layers(self) -> list[LayerSpec]:
        return [self.layer(i) for i in range(self.num_hidden_layers)]

    def rope_inv_freq(self, kind: str) -> torch.Tensor:
        """Inverse RoPE frequencies (fp32, on the CPU, length head_dim // 2) for the layers of one kind."""
        first = self.layer_types.index(kind)
        head_dim = self.layer(first).head_dim
        params = self.rope_parameters[kind]
        rope_type = params.get("rope_type", "default")
        base = float(params["rope_theta"])
        fraction = float(params.get("partial_rotary_factor", 1.0))
        if rope_type == "default":
            dim = int(head_dim * fraction)
            inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))
        elif rope_type == "proportional":
            # Rotate the first `fraction` of the frequency pairs with exponents over the whole head dim;
            # the remaining pairs get frequency zero (cos 1, sin 0), so they pass through unrotated.
            angles = int(fraction * head_dim // 2)
            rotated = 1.0 / (base ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64, device="cpu").float() / head_dim))
            inv = torch.cat([rotated, torch.zeros(head_dim // 2 - angles, dtype=torch.float32, device="cpu")])
            inv = inv / float(params.get("factor", 1.0))
        else:
            raise ConfigError(f"rope_parameters[{kind!r}]: rope_type {rope_type!r} is not supported "
                              "(supported: 'default', 'proportional')")
        return inv

    # ---- reading and writing ------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        model_type = data.get("model_type")
        if model_type != "diffusion_gemma":
            raise ConfigError(
                f"config.json has model_type {model_type!r}; dgemma loads 'diffusion_gemma' checkpoints "
                "(DiffusionGemmaForBlockDiffusion)")
        text = dict(_TEXT_DEFAULTS)
        text.update(data.get("text_config") or {})
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if not isinstance(text[key], int) or text[key] <= 0:
                raise ConfigError(f"text_config.{key} must be a positive integer, got {text[key]!r}")

        num_layers = text["num_hidden_layers"]
        layer_types = text.get("layer_types")
        if layer_types is None:
            layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(num_layers)]
        layer_types = list(layer_types)
        if len(layer_types) != num_layers:
            raise ConfigError(f"text_config.layer_types has {len(layer_types)} entries for {num_layers} layers")
        unknown = sorted(set(layer_types) - {SLIDING, FULL})
        if unknown:
            raise ConfigError(f"text_config.layer_types: unknown layer type(s) {unknown}")
        if layer_types[-1] != FULL:
            layer_types[-1] = FULL  # the reference forces the last layer to full attention

        rope = copy.deepcopy(text.get("rope_parameters") or _DEFAULT_ROPE)
        for kind in set(layer_types):
            if kind not in rope:
                raise ConfigError(f"text_config.rope_parameters has no entry for {kind!r}")

        if "per_layer_config" in text:
            per_layer = {int(k): dict(v) for k, v in (text["per_layer_config"] or {}).items()}
        else:
            # Same derivation as the reference when a config gives the global values instead.
            overrides: dict[str, int] = {"head_dim": text.get("global_head_dim", 512)}
            if text.get("num_global_key_value_heads") is not None:
                overrides["num_key_value_heads"] = text["num_global_key_value_heads"]
            per_layer = {i: dict(overrides) for i, kind in enumerate(layer_types) if kind == FULL}

        bidirectional = text.get("use_bidirectional_attention")
        if bidirectional not in (None, "all", "vision"):
            raise ConfigError(f"text_config.use_bidirectional_attention must be null, 'all' or 'vision', "
                              f"got {bidirectional!r}")
        window = int(text["sliding_window"])
        if bidirectional == "all":
            window = window // 2 + 1

        activation = text["hidden_activation"]
        if activation not in ACTIVATIONS:
            raise ConfigError(f"text_config.hidden_activation {activation!r} is not supported ({ACTIVATIONS})")
        num_experts = text.get("num_experts") or None
        if num_experts and not (text.get("top_k_experts") and text.get("moe_intermediate_size")):
            raise ConfigError("text_config.num_experts is set, so top_k_experts and moe_intermediate_size must be too")

        config = cls(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_hidden_layers=num_layers,
            num_attention_heads=text["num_attention_heads"],
            num_key_value_heads=text["num_key_value_heads"],
            head_dim=text["head_dim"],
            hidden_activation=activation,
            max_position_embeddings=text["max_position_embeddings"],
            initializer_range=text["initializer_range"],
            rms_norm_eps=text["rms_norm_eps"],
            pad_token_id=text["pad_token_id"],
            eos_token_id=text["eos_token_id"],
            bos_token_id=text["bos_token_id"],
            attention_bias=bool(text["attention_bias"]),
            sliding_window=window,
            layer_types=layer_types,
            per_layer_config=per_layer,
            rope_parameters=rope,
            final_logit_softcapping=text["final_logit_softcapping"],
            use_bidirectional_attention=bidirectional,
            num_experts=num_experts,
            top_k_experts=text.get("top_k_experts"),
            moe_intermediate_size=text.get("moe_intermediate_size"),
            canvas_length=int(data.get("canvas_length") or 256),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", True)),
            image_token_id=data.get("image_token_id", 258_880),
            raw=copy.deepcopy(data),
        )
        for i, spec in enumerate(config.layers):
            if config.num_attention_heads % spec.num_kv_heads:
                raise ConfigError(f"layer {i}: num_attention_heads {config.num_attention_heads} is not a multiple "
                                  f"of its {spec.num_kv_heads} key/value heads")
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from err
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """The config.json this config was read from, with the modelled fields written back."""
        data = copy.deepcopy(self.raw) if self.raw else {}
        data.setdefault("architectures", ["DiffusionGemmaForBlockDiffusion"])
        data["model_type"] = "diffusion_gemma"
        data["canvas_length"] = self.canvas_length
        data["tie_word_embeddings"] = self.tie_word_embeddings
        data["image_token_id"] = self.image_token_id
        text = dict(data.get("text_config") or {})
        stored_window = (self.sliding_window - 1) * 2 if self.use_bidirectional_attention == "all" \
            else self.sliding_window
        for key in _TEXT_DEFAULTS:
            text[key] = getattr(self, key)
        text.pop("global_head_dim", None)
        text.pop("num_global_key_value_heads", None)
        text.update(
            model_type="diffusion_gemma_text",
            sliding_window=stored_window,
            layer_types=list(self.layer_types),
            per_layer_config={str(k): v for k, v in self.per_layer_config.items()},
            rope_parameters=copy.deepcopy(self.rope_parameters),
            tie_word_embeddings=self.tie_word_embeddings,
        )
        data["text_config"] = text
        return data

    def save(self, directory: str | Path) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    # ---- summaries ----------------------------------------------------------------------------------------

    def parameter_counts(self) -> dict[str, int]:
        """Total and per-token active parameters of the text model, computed from the shapes."""
        h, v = self.hidden_size, self.vocab_size
        attention = 0
        for spec in self.layers:
            q = self.num_attention_heads * spec.head_dim
            kv = spec.num_kv_heads * spec.head_dim
            projections = kv * (2 if spec.has_v_proj else 1)
            attention += h * (q + projections) + q * h + 2 * spec.head_dim
            if self.attention_bias:
                attention += q + projections + h
        dense_mlp = 3 * h * self.intermediate_size
        norms = 4 * h
        per_layer_common = dense_mlp + norms
        experts_total = experts_active = 0
        if self.has_experts:
            expert = 3 * h * self.moe_intermediate_size
            router = h * self.num_experts + h + self.num_experts + 3 * h
            experts_total = self.num_experts * expert + router
            experts_active = self.top_k_experts * expert + router
        stack_common = attention + self.num_hidden_layers * per_layer_common + h
        self_conditioning = 3 * h * self.intermediate_size + h
        embed = v * h
        head = 0 if self.tie_word_embeddings else v * h
        total = embed + head + stack_common + self.num_hidden_layers * experts_total + self_conditioning
        active = embed + head + stack_common + self.num_hidden_layers * experts_active + self_conditioning
        if not self.tie_word_embeddings:  # an untied encoder owns a second copy of the stack and embeddings
            total += embed + stack_common + self.num_hidden_layers * experts_total
        return {"total": total, "active": active, "embedding": embed}

