"""DiffusionGemma GGUF files: the layout llama.cpp's conversion writes (architecture "diffusion-gemma").

`read_gguf` parses and validates a file's metadata and tensor directory (memory-mapped by `gguf.GGUFReader`, nothing
dequantised) into a `GGUFCheckpoint`: a config.json-shaped config, a generation_config.json-shaped generation dict, the
tokenizer rebuilt as a `tokenizers` JSON string, and tensors addressed by their checkpoint (transformers) names.
`write_gguf` writes the same layout from checkpoint-named tensors, quantising each to the requested GGML type.

Design choices:
- One name mapping (`_to_gguf_name` / `_from_gguf_name`) between checkpoint names (`model.decoder.layers.N...`, what
  `dgemma.checkpoints.module_name` understands) and GGUF names (`blk.N.attn_q.weight`, ...). The encoder's own layer
  scalars are `blk.N.enc_layer_output_scale.weight`, the decoder's `blk.N.layer_output_scale.weight`; every other
  encoder tensor is tied to the decoder's and is not stored, as in the checkpoint. Shapes are never transposed: the
  GGUF's ggml dimensions reversed are the checkpoint's.
- The expected tensors and their shapes are derived from the config alone (`_expected_shapes`), so a file is checked
  without building a model; every missing, unexpected, mis-shaped or unsupported tensor is reported in one error.
- The config is rebuilt from the metadata llama.cpp's Gemma 4 conversion writes: per-layer KV heads, the sliding
  window pattern, key lengths per layer kind, RoPE bases and dimension counts. The full layers' proportional RoPE
  exists in the file only as the derived `rope_freqs.weight` (frequency factors: 1.0 for the rotated pairs, 1e30 for
  the rest, over head_dim / 2 pairs); its partial rotary factor is read from it, and the tensor is then checked to be
  exactly what that config generates and is skipped. Float32 metadata is read back as the shortest decimal that
  round-trips (0.4, not 0.4000000059604645), so a config survives write and read unchanged.
- The writer derives the metadata from a `ModelConfig` and reads it back through the reader's own path before writing:
  a config that the layout cannot express (attention biases, untied embeddings, per-layer head dims within one layer
  kind, RoPE the keys cannot describe) is refused instead of being written wrongly.
- Dequantisation is `gguf.quants.dequantize` itself. Quantisation is `gguf.quants.quantize` for the types it
  implements; the K-quants (Q4_K, Q5_K, Q6_K), which it does not implement, are numpy ports of ggml's reference
  quantizers (`quantize_row_q4_K_ref`, `..._q5_K_ref`, `..._q6_K_ref`, what llama-quantize runs without an importance
  matrix): the same scale searches, float32 sums accumulated in the same order, the same block layouts. Their output
  was checked byte for byte against that C code (built without FMA contraction; a build that fuses multiply-adds can
  round differently); the tests pin it with known-answer hashes. Vectorised numpy quantises a few million values a
  second, so the whole released model would take hours: fine for tests and small models, not llama-quantize.
- Writing goes through a temporary file renamed into place, tensor by tensor (header first, then each tensor is
  quantised and written), so memory holds one tensor's encoding at a time and a crash leaves no partial file.
- Generation settings come from the `diffusion.eb_*` keys when present, else the release's defaults (48 steps,
  t 0.8 -> 0.4, entropy bound 0.1, stability 1, confidence 0.005). The file stores one EOS id; the end-of-generation
  set is rebuilt as that id plus the ids of the `<turn|>` and `<|tool_response>` tokens when the vocabulary has them
  (for the release: [1, 106, 50]). Without tokenizer metadata only the stored EOS id is known.

Tokenizer (read from llama.cpp's `convert_hf_to_gguf.py` `Gemma4Model.set_vocab`, gguf-py's `LlamaHfVocab` and
`SpecialVocab`, `src/llama-vocab.cpp`, and transformers 5.23's `integrations/gguf/gguf_tokenizer_mapping.py` and
`models/gemma/tokenization_gemma.py`):
- `tokenizer.ggml.model = "gemma4"`: the HF tokenizer.json vocabulary (`▁` for spaces, `<0xXX>` byte tokens) as
  `tokens`, its merges as "a b" strings, types NORMAL / CONTROL (special) / BYTE / USER_DEFINED (the seven chat markers
  llama.cpp always renders). llama.cpp tokenizes it as SPM-style BPE (pre-type GEMMA4): spaces escaped to `▁`, text
  split only into runs of newlines and runs of anything else, rank-ordered merges over raw UTF-8 characters, `<0xXX>`
  byte fallback, and a run of newlines that is itself a token emitted whole. The rebuilt HF tokenizer is transformers'
  GemmaTokenizer pipeline (Replace " " -> "▁" normalizer, BPE with byte_fallback and fuse_unk, decoder Replace / Byte-
  Fallback / Fuse) with the newline-only tokens as non-special added tokens, which reproduces llama.cpp's newline
  split and whole-run rule (they are cut out before any merge); CONTROL tokens become special added tokens,
  USER_DEFINED ones non-special added tokens (always matched, and rendered on decode: the chat markers stay visible).
  No post-processor: `add_bos_token` is reported in `tokenizer_config`, and BOS is the tokenizer layer's (or the chat
  template's) to add, as for dgemma's own tokenizers.
- `tokenizer.ggml.model = "gpt2"` with `tokenizer.ggml.pre = "gpt-2"`: byte-level BPE (GPT-2 alphabet and split
  regex), the layout llama.cpp uses for byte-level tokenizers such as the ones dgemma trains. Other tokenizer models
  are not rebuilt (`tokenizer_json` None, with a warning); the weights still load.
- Limitations: a newline run longer than the longest newline-only token is split greedily into the longest such tokens
  here, but BPE-merged character by character in llama.cpp. Merges whose parts or result are not vocabulary tokens
  (which the `tokenizers` library cannot load; a valid tokenizer.json has none) are dropped with a warning. The real
  Gemma 4 tokenizer.json could not be inspected here; agreement with llama.cpp is tested on trained vocabularies
  against a port of its algorithm.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize as _gguf_dequantize
from gguf.quants import quantize as _gguf_quantize
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

from .config import FULL, SLIDING, ModelConfig

logger = logging.getLogger(__name__)

ARCHITECTURE = "diffusion-gemma"
_T = GGMLQuantizationType
SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = (
    _T.F32, _T.F16, _T.BF16, _T.Q8_0, _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1, _T.Q4_K, _T.Q5_K, _T.Q6_K)
_UNQUANTISED_1D = (_T.F32, _T.F16, _T.BF16)  # norms and scalars: llama.cpp reads them as plain floats
_K_QUANTS = (_T.Q4_K, _T.Q5_K, _T.Q6_K)  # gguf-py has no quantizer for these
_QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION: the block layouts of the current ggml

_ROPE_FREQS = "rope_freqs.weight"
_UNROTATED = 1e30  # llama.cpp's frequency factor for pairs that proportional RoPE leaves unrotated
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new")  # the activation the gemma4 graph hard-codes

# The release's generation_config.json, used where the file has no `diffusion.eb_*` key.
_GENERATION_KEYS: tuple[tuple[str, str, type], ...] = (
    ("max_denoising_steps", "diffusion.eb_max_steps", int),
    ("t_min", "diffusion.eb_t_min", float),
    ("t_max", "diffusion.eb_t_max", float),
    ("entropy_bound", "diffusion.eb_entropy_bound", float),
    ("stability_threshold", "diffusion.eb_stability_threshold", int),
    ("confidence_threshold", "diffusion.eb_confidence_threshold", float),
)
_GENERATION_DEFAULTS = {"max_denoising_steps": 48, "t_min": 0.4, "t_max": 0.8, "entropy_bound": 0.1,
                        "stability_threshold": 1, "confidence_threshold": 0.005}
# Gemma 4's end-of-turn and tool-response markers also end generation (the release's eos_token_id [1, 106, 50]).
_EXTRA_EOS_TOKENS = ("<turn|>", "<|tool_response>")

# llama.cpp token types (gguf.TokenType)
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 3, 4, 5, 6
# Tokens llama.cpp's Gemma 4 conversion marks USER_DEFINED so that they are always rendered for the chat parser.
_VISIBLE_TOKENS = frozenset({"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                             "<tool_response|>", '<|"|>'})
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPACE = "\u2581"  # ▁, SentencePiece's escaped space
_SPACE_IN_MERGE = "\u0120"  # gguf's SpecialVocab writes a space inside a merge part as chr(ord(" ") + 256)


class GGUFError(ValueError):
    """A GGUF file (or a model to write as one) that dgemma cannot use as it is."""


# ---- names -----------------------------------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "model.decoder.embed_tokens.weight": "token_embd.weight",
    "model.decoder.norm.weight": "output_norm.weight",
    "model.decoder.self_conditioning.pre_norm.weight": "self_cond_pre_norm.weight",
    "model.decoder.self_conditioning.gate_proj.weight": "self_cond_gate.weight",
    "model.decoder.self_conditioning.up_proj.weight": "self_cond_up.weight",
    "model.decoder.self_conditioning.down_proj.weight": "self_cond_down.weight",
}
_LAYER_NAMES = {  # after `model.decoder.layers.N.` -> after `blk.N.`
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
    "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
    "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "router.proj.weight": "ffn_gate_inp.weight",
    "router.scale": "ffn_gate_inp.scale",
    "router.per_expert_scale": "ffn_down_exps.scale",
    "experts.gate_up_proj": "ffn_gate_up_exps.weight",
    "experts.down_proj": "ffn_down_exps.weight",
    "layer_scalar": "layer_output_scale.weight",
}
_ENCODER_SCALAR = "enc_layer_output_scale.weight"
_GLOBAL_NAMES_BACK = {v: k for k, v in _GLOBAL_NAMES.items()}
_LAYER_NAMES_BACK = {v: k for k, v in _LAYER_NAMES.items()}
_DECODER_LAYER = re.compile(r"model\.decoder\.layers\.(\d+)\.(.+)")
_ENCODER_LAYER = re.compile(r"model\.encoder\.language_model\.layers\.(\d+)\.layer_scalar")
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def _to_gguf_name(name: str) -> str | None:
    """GGUF name of a checkpoint tensor (None for one the layout has no place for)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    if match := _ENCODER_LAYER.fullmatch(name):
        return f"blk.{match[1]}.{_ENCODER_SCALAR}"
    if (match := _DECODER_LAYER.fullmatch(name)) and match[2] in _LAYER_NAMES:
        return f"blk.{match[1]}.{_LAYER_NAMES[match[2]]}"
    return None


def _from_gguf_name(name: str) -> str | None:
    """Checkpoint name of a GGUF tensor (None for one dgemma has no tensor for)."""
    if name in _GLOBAL_NAMES_BACK:
        return _GLOBAL_NAMES_BACK[name]
    if match := _BLOCK.fullmatch(name):
        if match[2] == _ENCODER_SCALAR:
            return f"model.encoder.language_model.layers.{match[1]}.layer_scalar"
        if match[2] in _LAYER_NAMES_BACK:
            return f"model.decoder.layers.{match[1]}.{_LAYER_NAMES_BACK[match[2]]}"
    return None


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every stored tensor of a tied DiffusionGemma without attention biases, in checkpoint names and shapes."""
    h, ff = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.decoder.embed_tokens.weight": (config.vocab_size, h)}
    for i, spec in enumerate(config.layers):
        p = f"model.decoder.layers.{i}."
        q, kv = config.num_attention_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        shapes[f"model.encoder.language_model.layers.{i}.layer_scalar"] = (1,)
        shapes[p + "layer_scalar"] = (1,)
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        if spec.has_v_proj:
            shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        shapes[p + "self_attn.q_norm.weight"] = (spec.head_dim,)
        shapes[p + "self_attn.k_norm.weight"] = (spec.head_dim,)
        shapes[p + "mlp.gate_proj.weight"] = (ff, h)
        shapes[p + "mlp.up_proj.weight"] = (ff, h)
        shapes[p + "mlp.down_proj.weight"] = (h, ff)
        norms = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"]
        if config.has_experts:
            e, m = config.num_experts, config.moe_intermediate_size
            shapes[p + "router.proj.weight"] = (e, h)
            shapes[p + "router.scale"] = (h,)
            shapes[p + "router.per_expert_scale"] = (e,)
            shapes[p + "experts.gate_up_proj"] = (e, 2 * m, h)
            shapes[p + "experts.down_proj"] = (e, h, m)
            norms += ["pre_feedforward_layernorm_2", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2"]
        shapes.update({f"{p}{norm}.weight": (h,) for norm in norms})
    shapes["model.decoder.norm.weight"] = (h,)
    shapes["model.decoder.self_conditioning.pre_norm.weight"] = (h,)
    shapes["model.decoder.self_conditioning.gate_proj.weight"] = (ff, h)
    shapes["model.decoder.self_conditioning.up_proj.weight"] = (ff, h)
    shapes["model.decoder.self_conditioning.down_proj.weight"] = (h, ff)
    return shapes


# ---- metadata <-> config -------------------------------------------------------------------------------------------

def _key(name: str) -> str:
    return f"{ARCHITECTURE}.{name}"


def _f32(value: float) -> float:
    """The shortest decimal that float32 `value` rounds to, e.g. 0.4 for float32(0.4)."""
    return float(str(np.float32(value)))


def _rope_freqs(config: ModelConfig) -> np.ndarray | None:
    """llama.cpp's frequency factors for the full layers' proportional RoPE (None when their RoPE is plain)."""
    params = config.rope_parameters[FULL]
    if params.get("rope_type", "default") != "proportional":
        return None
    head_dim = config.layer(config.layer_types.index(FULL)).head_dim
    # Same pair count as ModelConfig.rope_inv_freq; their frequencies divided by the factor, the rest never rotate.
    rotated = int(float(params.get("partial_rotary_factor", 1.0)) * head_dim // 2)
    factor = float(params.get("factor", 1.0))
    return np.array([factor] * rotated + [_UNROTATED] * (head_dim // 2 - rotated), dtype=np.float32)


def _uniform(values: list[int], name: str, source: str) -> int:
    if len(set(values)) != 1:
        raise GGUFError(f"{source}: {name} differs between layers ({values}); DiffusionGemma uses one value")
    return values[0]


def _model_metadata(config: ModelConfig, source: str) -> tuple[dict[str, Any], np.ndarray | None]:
    """The `diffusion-gemma.*` and `diffusion.*` metadata of a model config, and its `rope_freqs.weight`."""
    layers = config.layers
    kinds = {kind: [spec for spec in layers if spec.kind == kind] for kind in (SLIDING, FULL)}
    meta: dict[str, Any] = {
        _key("context_length"): config.max_position_embeddings,
        _key("embedding_length"): config.hidden_size,
        _key("feed_forward_length"): config.intermediate_size,
        _key("block_count"): config.num_hidden_layers,
        _key("vocab_size"): config.vocab_size,
        _key("attention.head_count"): config.num_attention_heads,
        _key("attention.head_count_kv"): [spec.num_kv_heads for spec in layers],
        _key("attention.layer_norm_rms_epsilon"): float(config.rms_norm_eps),
        _key("attention.sliding_window_pattern"): [spec.is_sliding for spec in layers],
        _key("attention.causal"): False,
        _key("attention.shared_kv_layers"): 0,
        _key("embedding_length_per_layer_input"): 0,
        "diffusion.canvas_length": config.canvas_length,
    }
    for kind, suffix in ((FULL, ""), (SLIDING, "_swa")):
        if not kinds[kind]:
            continue
        head_dim = _uniform([spec.head_dim for spec in kinds[kind]], f"the head dim of {kind} layers", source)
        params = config.rope_parameters[kind]
        proportional = params.get("rope_type", "default") == "proportional"
        # Proportional RoPE runs over the whole head with rope_freqs masking pairs; plain RoPE over a prefix.
        rotated = head_dim if proportional else int(head_dim * float(params.get("partial_rotary_factor", 1.0)))
        meta[_key(f"attention.key_length{suffix}")] = head_dim
        meta[_key(f"attention.value_length{suffix}")] = head_dim
        meta[_key(f"rope.dimension_count{suffix}")] = rotated
        meta[_key(f"rope.freq_base{suffix}")] = float(params["rope_theta"])
    if kinds[SLIDING]:
        meta[_key("attention.sliding_window")] = config.sliding_window
    if config.final_logit_softcapping:
        meta[_key("final_logit_softcapping")] = float(config.final_logit_softcapping)
    if config.has_experts:
        meta[_key("expert_count")] = config.num_experts
        meta[_key("expert_used_count")] = config.top_k_experts
        meta[_key("expert_feed_forward_length")] = config.moe_intermediate_size
    return meta, _rope_freqs(config)


def _required(meta: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in meta:
        raise GGUFError(f"{source}: required metadata key {key!r} is missing")
    return meta[key]


def _per_layer(meta: Mapping[str, Any], key: str, layers: int, source: str) -> list[Any]:
    """A key llama.cpp stores either once or as one value per layer, as a per-layer list."""
    value = _required(meta, key, source)
    values = list(value) if isinstance(value, list) else [value] * layers
    if len(values) != layers:
        raise GGUFError(f"{source}: {key} has {len(values)} entries for {layers} layers")
    return values


def _fraction(count: int, total: int) -> float:
    """A factor f with int(f * total) == count: ModelConfig turns partial rotary factors back into counts that way."""
    factor = count / total
    while factor * total < count:  # float rounding may land just below the integer
        factor = math.nextafter(factor, math.inf)
    return factor


def _rope_parameters(meta: Mapping[str, Any], kind: str, head_dim: int, rope_freqs: np.ndarray | None,
                     source: str) -> dict[str, Any]:
    suffix = "_swa" if kind == SLIDING else ""
    params: dict[str, Any] = {"rope_type": "default",
                              "rope_theta": _required(meta, _key(f"rope.freq_base{suffix}"), source)}
    if kind == FULL and rope_freqs is not None:
        if rope_freqs.shape != (head_dim // 2,):
            raise GGUFError(f"{source}: {_ROPE_FREQS} has shape {tuple(rope_freqs.shape)}, expected "
                            f"({head_dim // 2},) for full-attention layers of head dim {head_dim}")
        rotated = int(np.argmax(rope_freqs >= _UNROTATED)) if (rope_freqs >= _UNROTATED).any() else head_dim // 2
        params.update(rope_type="proportional", partial_rotary_factor=_fraction(2 * rotated, head_dim))
        if rotated and rope_freqs[0] != 1.0:
            params["factor"] = _f32(rope_freqs[0])
        return params
    rotated = meta.get(_key(f"rope.dimension_count{suffix}"), head_dim)
    if rotated != head_dim:
        params["partial_rotary_factor"] = _fraction(rotated, head_dim)
    return params


def _config_from_metadata(meta: Mapping[str, Any], rope_freqs: np.ndarray | None, vocab_size: int,
                          source: str) -> dict[str, Any]:
    """A config.json-shaped dict (what ModelConfig.from_dict reads) from a file's metadata."""
    layers = _required(meta, _key("block_count"), source)
    if not isinstance(layers, int) or layers <= 0:
        raise GGUFError(f"{source}: {_key('block_count')} must be a positive integer, got {layers!r}")
    pattern = _per_layer(meta, _key("attention.sliding_window_pattern"), layers, source)
    kinds = [SLIDING if sliding else FULL for sliding in pattern]
    if kinds[-1] != FULL:
        raise GGUFError(f"{source}: the last layer is a sliding-window layer; DiffusionGemma's last layer is "
                        "full attention")
    kv_heads = _per_layer(meta, _key("attention.head_count_kv"), layers, source)
    head_dims = {}
    for kind, suffix in ((FULL, ""), (SLIDING, "_swa")):
        if kind in kinds:
            key_length = _required(meta, _key(f"attention.key_length{suffix}"), source)
            value_length = meta.get(_key(f"attention.value_length{suffix}"), key_length)
            if value_length != key_length:
                raise GGUFError(f"{source}: attention.value_length{suffix} {value_length} differs from "
                                f"attention.key_length{suffix} {key_length}; DiffusionGemma's values share the "
                                "keys' head dim")
            head_dims[kind] = key_length
    base = kinds.index(SLIDING) if SLIDING in kinds else 0  # the base values are the sliding layers'
    per_layer = {}
    for i, kind in enumerate(kinds):
        overrides = {}
        if head_dims[kind] != head_dims[kinds[base]]:
            overrides["head_dim"] = head_dims[kind]
        if kv_heads[i] != kv_heads[base]:
            overrides["num_key_value_heads"] = kv_heads[i]
        if overrides:
            per_layer[str(i)] = overrides
    text: dict[str, Any] = {
        "model_type": "diffusion_gemma_text",
        "vocab_size": vocab_size,
        "hidden_size": _required(meta, _key("embedding_length"), source),
        "intermediate_size": _uniform(_per_layer(meta, _key("feed_forward_length"), layers, source),
                                      "feed_forward_length", source),
        "num_hidden_layers": layers,
        "num_attention_heads": _uniform(_per_layer(meta, _key("attention.head_count"), layers, source),
                                        "attention.head_count", source),
        "num_key_value_heads": kv_heads[base],
        "head_dim": head_dims[kinds[base]],
        "layer_types": kinds,
        "per_layer_config": per_layer,
        "rope_parameters": {kind: _rope_parameters(meta, kind, head_dims[kind], rope_freqs, source)
                            for kind in sorted(set(kinds))},
        "rms_norm_eps": _required(meta, _key("attention.layer_norm_rms_epsilon"), source),
        "max_position_embeddings": _required(meta, _key("context_length"), source),
        "final_logit_softcapping": meta.get(_key("final_logit_softcapping")) or None,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "use_bidirectional_attention": None,
        "tie_word_embeddings": True,
    }
    if SLIDING in kinds:
        text["sliding_window"] = _required(meta, _key("attention.sliding_window"), source)
    experts = meta.get(_key("expert_count")) or None
    text["num_experts"] = experts
    text["top_k_experts"] = _required(meta, _key("expert_used_count"), source) if experts else None
    text["moe_intermediate_size"] = _required(meta, _key("expert_feed_forward_length"), source) if experts else None
    for name, key in (("pad_token_id", "padding_token_id"), ("eos_token_id", "eos_token_id"),
                      ("bos_token_id", "bos_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            text[name] = meta[f"tokenizer.ggml.{key}"]
    return {"architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
            "canvas_length": _required(meta, "diffusion.canvas_length", source), "tie_word_embeddings": True,
            "text_config": text}


def _model_config(config: dict[str, Any], source: str) -> ModelConfig:
    try:
        return ModelConfig.from_dict(config)
    except ValueError as err:
        raise GGUFError(f"{source}: {err}") from err


def _representable(config: ModelConfig, source: str) -> None:
    """Refuse what the published layout has no place for, before anything is written."""
    problems = []
    if not config.tie_word_embeddings:
        problems.append("untied embeddings (the layout has no output.weight and no separate encoder weights)")
    if config.attention_bias:
        problems.append("attention biases (the layout has none)")
    if config.hidden_activation not in _GELU_TANH:
        problems.append(f"activation {config.hidden_activation!r} (llama.cpp's graph is GELU-tanh)")
    if config.use_bidirectional_attention == "all":
        problems.append("a bidirectional encoder (use_bidirectional_attention='all')")
    if problems:
        raise GGUFError(f"{source}: the DiffusionGemma GGUF layout cannot hold " + "; ".join(problems))


def _check_round_trip(config: ModelConfig, meta: dict[str, Any], rope_freqs: np.ndarray | None, source: str) -> None:
    """Read the metadata back as the reader will and refuse a config that would not come back the same."""
    back = _model_config(_config_from_metadata(meta, rope_freqs, config.vocab_size, source), source)
    fields = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "layers", "max_position_embeddings", "num_experts", "top_k_experts", "moe_intermediate_size",
              "canvas_length"]
    if SLIDING in config.layer_types:  # without sliding layers the window is not stored, and unused
        fields.append("sliding_window")
    differing = [name for name in fields if getattr(back, name) != getattr(config, name)]
    if _f32(back.rms_norm_eps) != _f32(config.rms_norm_eps):
        differing.append("rms_norm_eps")
    if (back.final_logit_softcapping or None) != (_f32(config.final_logit_softcapping)
                                                  if config.final_logit_softcapping else None):
        differing.append("final_logit_softcapping")
    for kind in sorted(set(config.layer_types)):
        if not torch.equal(back.rope_inv_freq(kind), config.rope_inv_freq(kind)):
            differing.append(f"RoPE of {kind} layers ({config.rope_parameters[kind]})")
    if differing:
        raise GGUFError(f"{source}: the GGUF metadata cannot express this config exactly; it would read back with "
                        f"different {', '.join(differing)}")


def _generation_from_metadata(meta: Mapping[str, Any], config: ModelConfig,
                              tokens: list[str] | None) -> dict[str, Any]:
    values = {name: kind(meta[key]) if key in meta else _GENERATION_DEFAULTS[name]
              for name, key, kind in _GENERATION_KEYS}
    eos = config.eos_token_ids
    if tokens is not None:
        ids = {token: i for i, token in enumerate(tokens)}
        eos = eos + [ids[token] for token in _EXTRA_EOS_TOKENS if token in ids and ids[token] not in eos]
    return {
        "max_denoising_steps": values["max_denoising_steps"],
        "t_min": values["t_min"],
        "t_max": values["t_max"],
        "sampler_config": {"entropy_bound": values["entropy_bound"]},
        "stability_threshold": values["stability_threshold"],
        "confidence_threshold": values["confidence_threshold"],
        "eos_token_id": eos,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
    }


def _generation_metadata(generation: Mapping[str, Any], source: str) -> dict[str, Any]:
    sampler = generation.get("sampler_config") or {}
    values = dict(generation, entropy_bound=sampler.get("entropy_bound", generation.get("entropy_bound")))
    meta = {}
    for name, key, kind in _GENERATION_KEYS:
        value = values.get(name)
        if value is None:
            raise GGUFError(f"{source}: generation {name} is missing or None; the diffusion.eb_* keys hold a value "
                            "for every setting (a disabled feature cannot be stored)")
        if kind is int and (not isinstance(value, int) or value < 0):
            raise GGUFError(f"{source}: generation {name} must be a non-negative integer, got {value!r}")
        meta[key] = kind(value)
    return meta


# ---- metadata values -------------------------------------------------------------------------------------------

def _field_value(field: Any) -> Any:
    """A metadata field as a Python value (lists for arrays; float32 read back as its shortest decimal)."""
    kind = field.types[0]
    if kind == GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8")
    if kind == GGUFValueType.ARRAY:
        item = field.types[-1] if len(field.types) > 1 else None
        if item == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        if not field.data:
            return []
        values = np.concatenate([field.parts[i] for i in field.data]).tolist()
        return [_f32(v) for v in values] if item == GGUFValueType.FLOAT32 else values
    value = field.parts[-1].tolist()[0]
    return _f32(value) if kind == GGUFValueType.FLOAT32 else value


def _add_value(writer: GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:  # lists: gguf infers the item type (int32, float32, bool, string)
        writer.add_array(key, list(value))


# ---- tokenizer -------------------------------------------------------------------------------------------------

def _merge_pairs(merges: list[str], vocab: Mapping[str, int], source: str) -> list[tuple[str, str]]:
    """Merge strings as llama.cpp splits them (at the first space after the first character), kept only when both
    parts and their concatenation are tokens, as the `tokenizers` library requires."""
    pairs, dropped = [], 0
    for merge in merges:
        cut = merge.find(" ", 1)
        if cut < 0:
            dropped += 1
            continue
        candidates = [(merge[:cut], merge[cut + 1:])]
        candidates.append(tuple(part.replace(_SPACE_IN_MERGE, " ") for part in candidates[0]))
        pair = next(((a, b) for a, b in candidates if a in vocab and b in vocab and a + b in vocab), None)
        if pair is None:
            dropped += 1
        else:
            pairs.append(pair)
    if dropped:
        logger.warning("%s: dropped %d of %d merges whose parts or result are not vocabulary tokens",
                       source, dropped, len(merges))
    return pairs


def _tokenizer_from_metadata(meta: Mapping[str, Any], source: str) -> str | None:
    tokens = meta["tokenizer.ggml.tokens"]
    kind = meta.get("tokenizer.ggml.model")
    pre = meta.get("tokenizer.ggml.pre")
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = _merge_pairs(meta.get("tokenizer.ggml.merges") or [], vocab, source)
    if kind == "gemma4":
        unk = meta.get("tokenizer.ggml.unknown_token_id")
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True,
                                         unk_token=tokens[unk] if unk is not None else None))
        tokenizer.normalizer = normalizers.Replace(" ", _SPACE)
        tokenizer.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(),
                                               decoders.Fuse()])
        # llama.cpp splits words at newline runs and emits a run that is itself a token whole, whatever the merges
        # say. Newline-only tokens as added tokens do both: they are cut out of the text before any merge.
        whole = [i for i, token in enumerate(tokens) if token and not token.strip("\n") and types[i] == _NORMAL]
    elif kind == "gpt2" and pre == "gpt-2":
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        whole = []
    else:
        logger.warning("%s: tokenizer %r (pre-tokenizer %r) is not rebuilt; dgemma rebuilds 'gemma4' and "
                       "'gpt2'/'gpt-2' tokenizers", source, kind, pre)
        return None
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                  for i, token_type in enumerate(types) if token_type == _CONTROL and tokens[i]])
    user_defined = [i for i, token_type in enumerate(types) if token_type == _USER_DEFINED and tokens[i]]
    tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in sorted(whole + user_defined)])
    return tokenizer.to_str()


def _tokenizer_config_from_metadata(meta: Mapping[str, Any], tokens: list[str], source: str) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id"),
                      ("unk_token", "unknown_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None:
            if not 0 <= token_id < len(tokens):
                raise GGUFError(f"{source}: tokenizer.ggml.{key} {token_id} is outside the {len(tokens)} tokens")
            config[name] = tokens[token_id]
    # llama.cpp adds BOS for gemma4 whatever the flag says; other BPE models only when it is set.
    default_bos = meta.get("tokenizer.ggml.model") == "gemma4"
    config["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos))
    if "tokenizer.ggml.add_eos_token" in meta:
        config["add_eos_token"] = bool(meta["tokenizer.ggml.add_eos_token"])
    return config


def _is_gemma_style(data: Mapping[str, Any]) -> bool:
    """Gemma's tokenizer.json shape: spaces replaced by ▁, byte-fallback BPE, decoder undoing both."""
    normalizer = data.get("normalizer") or {}
    if normalizer.get("type") == "Sequence" and len(normalizer.get("normalizers", [])) == 1:
        normalizer = normalizer["normalizers"][0]
    decoder = data.get("decoder") or {}
    steps = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else []
    pre = data.get("pre_tokenizer")
    # Split on " " after the normalizer is a no-op (transformers' GemmaTokenizer); Split on newlines is llama.cpp's.
    pre_ok = pre is None or (pre.get("type") == "Split" and (
        (pre.get("pattern") == {"String": " "} and pre.get("behavior") == "MergedWithPrevious")
        or (pre.get("pattern") == {"Regex": "\n+"} and pre.get("behavior") == "Isolated")))
    return (normalizer.get("type") == "Replace" and normalizer.get("pattern") == {"String": " "}
            and normalizer.get("content") == _SPACE and bool(data["model"].get("byte_fallback")) and pre_ok
            and {"type": "Replace", "pattern": {"String": _SPACE}, "content": " "} in steps
            and {"type": "ByteFallback"} in steps)


def _is_byte_level(data: Mapping[str, Any]) -> bool:
    """GPT-2's tokenizer.json shape: byte-level alphabet and split regex, no normalizer."""
    pre = data.get("pre_tokenizer") or {}
    return (data.get("normalizer") is None and not data["model"].get("byte_fallback")
            and pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space") and pre.get("use_regex", True)
            and (data.get("decoder") or {}).get("type") == "ByteLevel")


def _tokenizer_metadata(tokenizer_json: str, tokenizer_config: Mapping[str, Any], config: ModelConfig,
                        source: str) -> dict[str, Any]:
    """The `tokenizer.*` metadata llama.cpp's conversion writes for a tokenizer.json."""
    try:
        tokenizer = Tokenizer.from_str(tokenizer_json)
        data = json.loads(tokenizer_json)
    except Exception as err:  # the tokenizers library raises its own exception types
        raise GGUFError(f"{source}: the tokenizer JSON cannot be loaded ({err})") from err
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
            or model.get("ignore_merges") or model.get("dropout"):
        raise GGUFError(f"{source}: only plain BPE tokenizers can be written to GGUF, got model {model.get('type')!r}")
    kind = "gemma4" if _is_gemma_style(data) else "gpt2" if _is_byte_level(data) else None
    if kind is None:
        raise GGUFError(f"{source}: the tokenizer is neither Gemma-style (▁ spaces, byte fallback) nor byte-level "
                        "BPE; llama.cpp's GGUF tokenizer models cannot describe it")
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    by_id = {i: token for token, i in vocab.items()}
    if set(by_id) != set(range(len(by_id))):
        raise GGUFError(f"{source}: the tokenizer's ids are not contiguous from 0")
    if len(by_id) > config.vocab_size:
        raise GGUFError(f"{source}: the tokenizer has {len(by_id)} tokens, more than the model's vocab_size "
                        f"{config.vocab_size}")
    added = tokenizer.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(config.vocab_size):
        token = by_id.get(i)
        if token is None:  # embedding rows beyond the tokenizer, as llama.cpp pads them
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
        else:
            tokens.append(token)
            if i in added:
                types.append(_CONTROL if added[i].special and token not in _VISIBLE_TOKENS else _USER_DEFINED)
            else:
                types.append(_BYTE if kind == "gemma4" and _BYTE_TOKEN.fullmatch(token) else _NORMAL)
    merges = [merge if isinstance(merge, str) else " ".join(part.replace(" ", _SPACE_IN_MERGE) for part in merge)
              for merge in model.get("merges", [])]

    def token_id(name: str, fallback: int | None) -> int | None:
        text = tokenizer_config.get(name)
        text = text.get("content") if isinstance(text, dict) else text
        if text is None:
            return fallback
        if text not in vocab:
            raise GGUFError(f"{source}: tokenizer_config {name} {text!r} is not a token")
        return vocab[text]

    meta: dict[str, Any] = {"tokenizer.ggml.model": kind}
    if kind == "gpt2":
        meta["tokenizer.ggml.pre"] = "gpt-2"
    meta["tokenizer.ggml.tokens"] = tokens
    if kind == "gemma4":
        meta["tokenizer.ggml.scores"] = [-1000.0] * len(tokens)  # what llama.cpp's LlamaHfVocab writes; BPE ignores it
    meta["tokenizer.ggml.token_type"] = types
    if merges:
        meta["tokenizer.ggml.merges"] = merges
    ids = {"bos_token_id": token_id("bos_token", config.bos_token_id),
           "eos_token_id": token_id("eos_token", (config.eos_token_ids or [None])[0]),
           "unknown_token_id": token_id("unk_token", vocab.get(model.get("unk_token"))),
           "padding_token_id": token_id("pad_token", config.pad_token_id)}
    meta.update({f"tokenizer.ggml.{key}": value for key, value in ids.items() if value is not None})
    meta["tokenizer.ggml.add_bos_token"] = bool(tokenizer_config.get("add_bos_token", True))
    if "add_eos_token" in tokenizer_config:
        meta["tokenizer.ggml.add_eos_token"] = bool(tokenizer_config["add_eos_token"])
    if kind == "gemma4":
        meta["tokenizer.ggml.add_space_prefix"] = False
    return meta


# ---- K-quant encoders (numpy ports of ggml's reference quantizers) -----------------------------------------------

_QK_K = 256
_GROUP_MAX_EPS = 1e-15


def _row_sum(values: np.ndarray) -> np.ndarray:
    """Sums over the last axis accumulated left to right in float32, as the C loops do (numpy's own sum is
    pairwise and rounds differently)."""
    return np.cumsum(values, axis=-1, dtype=np.float32)[..., -1]


def _make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float,
                      nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's make_qkx2_quants for rows x [N, n]: (scale [N], -min [N], codes [N, n]) of x ~ scale * code + min,
    searching nstep + 1 candidate scales for the least weighted squared error."""
    lo = np.minimum(x.min(axis=1), 0)
    hi = x.max(axis=1)
    sum_w = _row_sum(weights)
    sum_x = _row_sum(weights * x)
    flat = hi == lo
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(flat, 0, nmax / (hi - lo)).astype(np.float32)
        scale = np.where(flat, 0, 1 / iscale).astype(np.float32)
        codes = np.clip(np.rint(iscale[:, None] * (x - lo[:, None])), 0, nmax)
        best = _row_sum(weights * np.square(scale[:, None] * codes + lo[:, None] - x))
        for step in range(nstep + 1):
            # The C code re-centres on the best min found so far: later candidates use the updated lo.
            iscale = (np.float32(rmin) + np.float32(rdelta) * np.float32(step) + nmax) / (hi - lo)
            trial = np.clip(np.rint(iscale[:, None] * (x - lo[:, None])), 0, nmax)
            sum_l = _row_sum(weights * trial)
            sum_l2 = _row_sum(weights * trial * trial)
            sum_xl = _row_sum(weights * trial * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            this_min = np.where(positive, 0, this_min)
            error = _row_sum(weights * np.square(this_scale[:, None] * trial + this_min[:, None] - x))
            better = (det > 0) & (error < best) & ~flat
            codes = np.where(better[:, None], trial, codes)
            best = np.where(better, error, best)
            scale = np.where(better, this_scale, scale).astype(np.float32)
            lo = np.where(better, this_min, lo).astype(np.float32)
    return scale, -lo, np.where(flat[:, None], 0, codes)


def _scale_min_blocks(x: np.ndarray, nmax: int, rmin: float, rdelta: float,
                      nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The common part of Q4_K and Q5_K (8 sub-blocks of 32 with 6-bit scales and mins under fp16 d and dmin) for
    blocks x [N, 256]: the 16 header bytes [N, 16] (d, dmin, packed scales) and the codes [N, 256]."""
    blocks = x.shape[0]
    sub = x.reshape(blocks * 8, 32)
    weights = np.sqrt(_row_sum(np.square(sub))[:, None] / 32) + np.abs(sub)
    scales, mins, codes = _make_qkx2_quants(sub, weights, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(blocks, 8), mins.reshape(blocks, 8)
    # Running maxima that start at +0.0, as in C (a plain max of -0.0 mins would store dmin as -0.0).
    max_scale, max_min = (np.where(v > 0, v, 0).astype(np.float32) for v in (scales.max(axis=1), mins.max(axis=1)))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, 63 / max_scale, 0).astype(np.float32)
        inv_min = np.where(max_min > 0, 63 / max_min, 0).astype(np.float32)
    ls = np.clip(np.rint(inv_scale[:, None] * scales), 0, 63).astype(np.uint8)
    lm = np.clip(np.rint(inv_min[:, None] * mins), 0, 63).astype(np.uint8)
    d = (max_scale / 63).astype(np.float16)
    dmin = (max_min / 63).astype(np.float16)
    # Codes recomputed against the rounded scales, where the sub-block scale is not zero (as the C code skips).
    step = (d.astype(np.float32)[:, None] * ls).reshape(-1, 1)
    offset = (dmin.astype(np.float32)[:, None] * lm).reshape(-1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        requantised = np.clip(np.rint((sub + offset) / step), 0, nmax)
    codes = np.where(step != 0, requantised, codes).astype(np.uint8).reshape(blocks, _QK_K)
    packed = np.concatenate([ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
                             lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                             (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], axis=1)
    header = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), packed], axis=1)
    return header, codes


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Low nibbles of codes [N, 256] as ggml's K-quants store them: byte l of 32-group g is code[64g + l] | code[64g +
    32 + l] << 4."""
    low = (codes & 0xF).reshape(-1, 4, 2, 32)
    return (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)


def _q4_k_blocks(x: np.ndarray) -> np.ndarray:
    header, codes = _scale_min_blocks(x, 15, -1.0, 0.1, 20)
    return np.concatenate([header, _pack_nibbles(codes)], axis=1)


def _q5_k_blocks(x: np.ndarray) -> np.ndarray:
    header, codes = _scale_min_blocks(x, 31, -0.5, 0.1, 15)
    high = ((codes.reshape(-1, 8, 32) >> 4) & 1) << np.arange(8, dtype=np.uint8)[None, :, None]
    return np.concatenate([header, np.bitwise_or.reduce(high, axis=1), _pack_nibbles(codes)], axis=1)


def _make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants with rmse_type 1 for rows x [N, n]: (scale [N], codes + nmax [N, n]) of symmetric
    quantisation weighted by x^2, trying 18 scales around nmax / max|x|."""
    rows = np.arange(x.shape[0])
    peak = x[rows, np.abs(x).argmax(axis=1)]
    small = np.abs(peak) < _GROUP_MAX_EPS
    weights = x * x
    with np.errstate(divide="ignore", invalid="ignore"):
        safe_peak = np.where(small, 1, peak).astype(np.float32)

        def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            levels = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1)
            return levels, _row_sum(weights * x * levels), _row_sum(weights * levels * levels)

        levels, sum_lx, sum_l2 = trial(-nmax / safe_peak)
        scale = np.where(sum_l2 != 0, sum_lx / sum_l2, 0).astype(np.float32)
        best = scale * sum_lx
        codes = levels + nmax
        for step in range(-9, 10):
            if step == 0:
                continue
            levels, sum_lx, sum_l2 = trial(-(nmax + np.float32(0.1) * step) / safe_peak)
            better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
            codes = np.where(better[:, None], levels + nmax, codes)
            scale = np.where(better, sum_lx / sum_l2, scale).astype(np.float32)
            best = np.where(better, scale * sum_lx, best)
    return np.where(small, 0, scale), np.where(small[:, None], 0, codes)


def _q6_k_blocks(x: np.ndarray) -> np.ndarray:
    """Q6_K: 16 sub-blocks of 16 with int8 scales under one fp16 d, 6-bit codes (4 low bits in ql, 2 in qh)."""
    blocks = x.shape[0]
    sub = x.reshape(blocks * 16, 16)
    scales, codes = _make_qx_quants(sub, 32)
    scales = scales.reshape(blocks, 16)
    peak = scales[np.arange(blocks), np.abs(scales).argmax(axis=1)]
    empty = np.abs(peak) < _GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(empty, 0, -128 / np.where(empty, 1, peak)).astype(np.float32)
        d = np.where(empty, 0, 1 / iscale).astype(np.float16)
        q_scales = np.minimum(127, np.rint(iscale[:, None] * scales)).astype(np.int8)
        step = (d.astype(np.float32)[:, None] * q_scales).reshape(-1, 1)
        requantised = np.clip(np.rint(sub / step), -32, 31) + 32
    codes = np.where(step != 0, requantised, codes).astype(np.uint8).reshape(blocks, 2, 4, 32)
    codes[empty] = 0  # ggml writes an all-zero block when every scale is negligible
    low = codes & 0xF
    ql = (low[:, :, 0:2] | (low[:, :, 2:4] << 4)).reshape(blocks, 128)
    high = (codes >> 4) << np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    qh = np.bitwise_or.reduce(high, axis=2).reshape(blocks, 64)
    return np.concatenate([ql, qh, q_scales.view(np.uint8), d.reshape(-1, 1).view(np.uint8)], axis=1)


_K_ENCODERS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    _T.Q4_K: _q4_k_blocks, _T.Q5_K: _q5_k_blocks, _T.Q6_K: _q6_k_blocks}
_K_CHUNK = 4096  # super-blocks per numpy pass: about 4 MB of input, so the search's temporaries stay small


def quantize_blocks(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """data [..., n] as GGML `qtype`: float arrays for F32/F16, bytes [..., n / block * block_bytes] otherwise."""
    if qtype not in _K_ENCODERS:
        return _gguf_quantize(data, qtype)
    blocks = data.reshape(-1, _QK_K).astype(np.float32, copy=False)
    out = np.empty((blocks.shape[0], GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    for start in range(0, blocks.shape[0], _K_CHUNK):
        out[start:start + _K_CHUNK] = _K_ENCODERS[qtype](blocks[start:start + _K_CHUNK])
    return out.reshape(*data.shape[:-1], -1)


# ---- reading -----------------------------------------------------------------------------------------------------

@dataclass
class GGUFCheckpoint:
    """A validated DiffusionGemma GGUF file; tensors stay memory-mapped until `dequantized` is called."""

    path: Path
    config: dict[str, Any]
    generation: dict[str, Any]
    tensor_types: dict[str, str]  # checkpoint name -> GGML type name
    tokenizer_json: str | None
    tokenizer_config: dict[str, Any]
    chat_template: str | None
    # checkpoint name -> gguf ReaderTensor (its data a view into the file's mapping)
    _tensors: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def tensor_names(self) -> list[str]:
        """Checkpoint names of the stored tensors, in file order (`rope_freqs.weight`, derived data, excluded)."""
        return list(self._tensors)

    def _tensor(self, name: str) -> Any:
        if name not in self._tensors:
            raise KeyError(f"{name} is not a tensor of {self.path}")
        return self._tensors[name]

    def raw(self, name: str) -> tuple[np.ndarray, GGMLQuantizationType, tuple[int, ...]]:
        """(the stored data as mapped: floats for F32/F16, bytes otherwise; its GGML type; the checkpoint shape)."""
        tensor = self._tensor(name)
        return tensor.data, GGMLQuantizationType(tensor.tensor_type), tuple(int(d) for d in reversed(tensor.shape))

    def dequantized(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor as `gguf.quants.dequantize` decodes it (fp32), in the checkpoint's shape, cast to `dtype`."""
        data, qtype, shape = self.raw(name)
        values = _gguf_dequantize(data, qtype)
        if not values.flags.writeable:  # a view of the read-only mapping (F32): torch needs its own copy
            values = values.copy()
        return torch.from_numpy(values.reshape(shape)).to(dtype)


def _open(path: Path) -> GGUFReader:
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        return GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OverflowError) as err:  # what gguf raises on short or garbled data
        raise GGUFError(f"{path} is truncated or corrupt: {err}") from err


def read_gguf(path: str | Path) -> GGUFCheckpoint:
    """Parse and validate a DiffusionGemma GGUF file without dequantising any weight."""
    path = Path(path)
    source = str(path)
    reader = _open(path)
    try:
        meta = {name: _field_value(f) for name, f in reader.fields.items()}
    except UnicodeDecodeError as err:
        raise GGUFError(f"{path} is corrupt: metadata string is not UTF-8 ({err})") from err
    architecture = meta.get("general.architecture")
    if architecture != ARCHITECTURE:
        raise GGUFError(f"{path} holds a {architecture!r} model; dgemma reads {ARCHITECTURE!r} files")
    stored = {t.name: t for t in reader.tensors}
    embedding = stored.get(_GLOBAL_NAMES["model.decoder.embed_tokens.weight"])
    if embedding is None or len(embedding.shape) != 2:
        raise GGUFError(f"{path}: tensor token_embd.weight (model.decoder.embed_tokens.weight) is missing or not 2-D")
    vocab_size = int(embedding.shape[1])  # ggml order: [hidden, vocab]
    if meta.get(_key("vocab_size"), vocab_size) != vocab_size:
        raise GGUFError(f"{path}: {_key('vocab_size')} is {meta[_key('vocab_size')]} but token_embd.weight has "
                        f"{vocab_size} rows")
    rope_freqs = None
    if _ROPE_FREQS in stored:
        freqs = stored[_ROPE_FREQS]
        if freqs.tensor_type not in SUPPORTED_TYPES:
            raise GGUFError(f"{path}: {_ROPE_FREQS} is stored as {freqs.tensor_type.name}, which dgemma does not read")
        rope_freqs = _gguf_dequantize(freqs.data, freqs.tensor_type).reshape(-1)
    try:
        config = _config_from_metadata(meta, rope_freqs, vocab_size, source)
        model_config = _model_config(config, source)
    except TypeError as err:  # e.g. a string where a count belongs: the file is not what its keys claim
        raise GGUFError(f"{path}: metadata of an unexpected type ({err})") from err
    if rope_freqs is not None and not np.array_equal(rope_freqs, _rope_freqs(model_config)):
        raise GGUFError(f"{path}: {_ROPE_FREQS} is not the pattern llama.cpp generates for proportional RoPE "
                        "(equal factors for the rotated pairs, then 1e30)")

    expected = _expected_shapes(model_config)
    tensors, problems = {}, []
    for gguf_name, tensor in stored.items():
        if gguf_name == _ROPE_FREQS:
            continue
        name = _from_gguf_name(gguf_name)
        if name is None or name not in expected:
            problems.append(f"unexpected tensor {gguf_name}" + (f" ({name})" if name else ""))
            continue
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if shape != expected[name]:
            problems.append(f"wrong shape: {gguf_name} ({name}) is {shape}, the config implies {expected[name]}")
        if tensor.tensor_type not in SUPPORTED_TYPES:
            problems.append(f"unsupported type: {gguf_name} ({name}) is stored as {tensor.tensor_type.name}; "
                            f"dgemma reads {', '.join(t.name for t in SUPPORTED_TYPES)}")
        tensors[name] = tensor
    problems += [f"missing tensor {_to_gguf_name(name)} ({name}) {shape}"
                 for name, shape in expected.items() if name not in tensors]
    if problems:
        raise GGUFError(f"{path} does not match its metadata:\n" + "\n".join(f"  {p}" for p in problems))

    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) > vocab_size:
        raise GGUFError(f"{path}: {len(tokens)} tokens but token_embd.weight has {vocab_size} rows")
    tokenizer_config = _tokenizer_config_from_metadata(meta, tokens, source) if tokens is not None else {}
    return GGUFCheckpoint(
        path=path,
        config=config,
        generation=_generation_from_metadata(meta, model_config, tokens),
        tensor_types={name: GGMLQuantizationType(t.tensor_type).name for name, t in tensors.items()},
        tokenizer_json=_tokenizer_from_metadata(meta, source) if tokens is not None else None,
        tokenizer_config=tokenizer_config,
        chat_template=meta.get("tokenizer.chat_template"),
        _tensors=tensors,
    )


# ---- writing -----------------------------------------------------------------------------------------------------

def _parse_type(name: str, tensor: str, source: str) -> GGMLQuantizationType:
    try:
        qtype = GGMLQuantizationType[name.upper()]
    except KeyError:
        qtype = None
    if qtype not in SUPPORTED_TYPES:
        raise GGUFError(f"{source}: type {name!r} for {tensor} is not one dgemma writes "
                        f"({', '.join(t.name for t in SUPPORTED_TYPES)})")
    return qtype


def _tensor_plan(config: ModelConfig, tensors: Mapping[str, torch.Tensor], types: Mapping[str, str],
                 source: str) -> list[tuple[str, str, GGMLQuantizationType, tuple[int, ...]]]:
    """(checkpoint name, GGUF name, type, shape) for every tensor to write, all checked before any is written."""
    expected = _expected_shapes(config)
    problems = [f"missing tensor {name} {shape}" for name, shape in expected.items() if name not in tensors]
    problems += [f"unexpected tensor {name}" for name in tensors if name not in expected]
    problems += [f"wrong shape: {name} is {tuple(tensors[name].shape)}, the config implies {shape}"
                 for name, shape in expected.items() if name in tensors and tuple(tensors[name].shape) != shape]
    problems += [f"a type is given for {name}, which is not a tensor of this model" for name in types
                 if name not in expected]
    if problems:
        raise GGUFError(f"{source}: the tensors do not match the config:\n" + "\n".join(f"  {p}" for p in problems))
    plan = []
    for name, shape in expected.items():
        qtype = _parse_type(types[name], name, source) if name in types else _T.F32
        block = GGML_QUANT_SIZES[qtype][0]
        if len(shape) == 1 and qtype not in _UNQUANTISED_1D:
            raise GGUFError(f"{source}: {name} is 1-D; it must be F32, F16 or BF16, not {qtype.name}")
        if shape[-1] % block:
            raise GGUFError(f"{source}: {name} {shape} cannot be stored as {qtype.name}: its rows of {shape[-1]} "
                            f"values are not a multiple of the {block}-value blocks")
        plan.append((name, _to_gguf_name(name), qtype, shape))
    return plan


def _encode(tensor: torch.Tensor, qtype: GGMLQuantizationType, name: str, source: str) -> np.ndarray:
    values = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    if not np.isfinite(values).all():
        raise GGUFError(f"{source}: {name} holds NaN or infinite values")
    return quantize_blocks(values, qtype)


def _add_tensor_info(writer: GGUFWriter, name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType) -> None:
    block, size = GGML_QUANT_SIZES[qtype]
    nbytes = math.prod(shape) // block * size
    if qtype in (_T.F32, _T.F16):
        writer.add_tensor_info(name, shape, np.dtype(np.float32 if qtype == _T.F32 else np.float16), nbytes, qtype)
    else:  # gguf takes quantised tensors by their byte shape
        writer.add_tensor_info(name, (*shape[:-1], shape[-1] // block * size), np.dtype(np.uint8), nbytes, qtype)


def write_gguf(path: str | Path, config: dict[str, Any], tensors: Mapping[str, torch.Tensor],
               types: Mapping[str, str] | None = None, generation: Mapping[str, Any] | None = None,
               tokenizer_json: str | None = None, tokenizer_config: Mapping[str, Any] | None = None,
               chat_template: str | None = None, blocks: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write checkpoint-named tensors and a config.json-shaped config as a DiffusionGemma GGUF.

    `types` maps checkpoint names to GGML type names (default F32); 1-D tensors take F32, F16 or BF16 only.
    `generation` (generation_config.json-shaped) adds the `diffusion.eb_*` keys; `tokenizer_json` (with
    `tokenizer_config` for its special tokens and add_bos_token) the `tokenizer.*` keys. `blocks` gives some
    tensors already encoded in their type (uint8 block bytes [..., row bytes], as GGUFReader reads them back:
    a converter's output, or random codes for a speed benchmark); their `tensors` entries give only their shapes
    (meta tensors will do)."""
    path = Path(path)
    source = str(path)
    model_config = _model_config(config, source)
    _representable(model_config, source)
    meta, rope_freqs = _model_metadata(model_config, source)
    _check_round_trip(model_config, meta, rope_freqs, source)
    plan = _tensor_plan(model_config, tensors, types or {}, source)
    blocks = blocks or {}
    for name, _, qtype, shape in plan:
        if name in blocks:
            block, size = GGML_QUANT_SIZES[qtype]
            expected = (*shape[:-1], shape[-1] // block * size)
            if blocks[name].dtype != np.uint8 or tuple(blocks[name].shape) != expected:
                raise GGUFError(f"{source}: {name} as {qtype.name} needs uint8 block bytes of shape {expected}, "
                                f"got {blocks[name].dtype} {tuple(blocks[name].shape)}")
    if generation is not None:
        meta.update(_generation_metadata(generation, source))
    token_ids = {"bos_token_id": model_config.bos_token_id, "padding_token_id": model_config.pad_token_id,
                 "eos_token_id": (model_config.eos_token_ids or [None])[0]}
    meta.update({f"tokenizer.ggml.{key}": value for key, value in token_ids.items() if value is not None})
    if tokenizer_json is not None:
        meta.update(_tokenizer_metadata(tokenizer_json, tokenizer_config or {}, model_config, source))
    if chat_template:
        meta["tokenizer.chat_template"] = chat_template

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(tmp, ARCHITECTURE)
    try:
        writer.add_quantization_version(_QUANTIZATION_VERSION)
        for key, value in meta.items():
            _add_value(writer, key, value)
        order = [(_ROPE_FREQS, _T.F32, tuple(rope_freqs.shape))] if rope_freqs is not None else []
        order += [(gguf_name, qtype, shape) for _, gguf_name, qtype, shape in plan]
        for gguf_name, qtype, shape in order:
            _add_tensor_info(writer, gguf_name, shape, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if rope_freqs is not None:
            writer.write_tensor_data(rope_freqs)
        for name, _, qtype, _ in plan:  # one tensor's encoding in memory at a time
            writer.write_tensor_data(blocks[name] if name in blocks else _encode(tensors[name], qtype, name, source))
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path
