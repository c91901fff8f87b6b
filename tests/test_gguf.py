"""dgemma.gguf: DiffusionGemma GGUF files read and written in llama.cpp's "diffusion-gemma" layout.

Oracles: `gguf.quants.dequantize` for every block format; known-answer hashes of ggml's reference C quantizers for the
K-quants (the hashes were computed once from ggml-quants.c's `quantize_row_q*_K_ref`); a port of llama.cpp's gemma4
tokenization (`src/llama-vocab.cpp`) for the rebuilt tokenizer; the published layout in shared/design/gguf.md.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from dgemma.checkpoints import to_checkpoint_names
from dgemma.config import FULL, SLIDING, ModelConfig
from dgemma.generation_config import GenerationConfig
from dgemma.gguf import (SUPPORTED_TYPES, GGUFError, _config_from_metadata, _expected_shapes, _field_value,
                         _model_metadata, quantize_blocks, read_gguf, write_gguf)
from dgemma.model import DiffusionGemma

from dgemma.recipes.bpe import train_tokenizer

S, F = SLIDING, FULL


def config_dict(**text) -> dict:
    values = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=32, layer_types=[S, F], sliding_window=16,
                  per_layer_config={"1": {"head_dim": 64, "num_key_value_heads": 1}}, num_experts=4, top_k_experts=2,
                  moe_intermediate_size=32, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    values.update(text)
    return {"model_type": "diffusion_gemma", "canvas_length": 8, "text_config": values}


# Every matrix row a multiple of 256, so that the K-quants (super-blocks of 256) can take every tensor.
K_CONFIG = config_dict(vocab_size=256, hidden_size=256, intermediate_size=256, head_dim=128,
                       per_layer_config={"1": {"head_dim": 256, "num_key_value_heads": 1}}, num_experts=2,
                       moe_intermediate_size=256)


def model_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random model's tensors under checkpoint names. init_weights sets every 1-D tensor to 1; they are perturbed
    so that a tensor stored under the wrong name (e.g. the encoder's layer scalar as the decoder's) shows."""
    model = DiffusionGemma(ModelConfig.from_dict(config))
    model.init_weights(torch.Generator().manual_seed(seed))
    noise = torch.Generator().manual_seed(seed + 1)
    return {name: (t + 0.1 * torch.randn(t.shape, generator=noise)) if t.dim() == 1 else t.clone()
            for name, t in to_checkpoint_names(model).items()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """A MoE model written in F32, without tokenizer."""
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    tensors = model_tensors(config_dict())
    write_gguf(path, config_dict(), tensors)
    return path, config_dict(), tensors


# ---- round trip ----------------------------------------------------------------------------------------------------

# Relative RMS error of each type on N(0, 0.02) weights, measured (Q8_0 0.0054, Q4_0 0.086, Q4_1 0.079, Q5_0 0.043,
# Q5_1 0.038, Q4_K 0.072, Q5_K 0.036, Q6_K 0.018) with about 20 % headroom.
TOLERANCE = {"Q8_0": 0.007, "Q4_0": 0.10, "Q4_1": 0.095, "Q5_0": 0.052, "Q5_1": 0.046, "Q4_K": 0.086,
             "Q5_K": 0.044, "Q6_K": 0.022}


def test_round_trip_every_type(tmp_path):
    tensors = model_tensors(K_CONFIG)
    matrices = sorted(name for name, t in tensors.items() if t.dim() > 1)
    vectors = sorted(name for name, t in tensors.items() if t.dim() == 1)
    types = {name: SUPPORTED_TYPES[i % len(SUPPORTED_TYPES)].name for i, name in enumerate(matrices)}
    types.update({name: ("F32", "F16", "BF16")[i % 3] for i, name in enumerate(vectors)})
    assert {T[name] for name in types.values()} == set(SUPPORTED_TYPES)
    generation = {"max_denoising_steps": 32, "t_min": 0.3, "t_max": 0.9, "sampler_config": {"entropy_bound": 8.0},
                  "stability_threshold": 2, "confidence_threshold": 0.3}
    path = write_gguf(tmp_path / "mixed.gguf", K_CONFIG, tensors, types=types, generation=generation)

    ck = read_gguf(path)
    assert ck.path == path
    assert ck.tensor_types == types
    assert sorted(ck.tensor_names()) == sorted(tensors)
    original = ModelConfig.from_dict(K_CONFIG)
    back = ModelConfig.from_dict(ck.config)
    assert back == original  # every modelled field; below the derived values the model runs on
    assert back.layers == original.layers and back.layer_types == original.layer_types
    assert back.sliding_window == original.sliding_window
    for kind in (S, F):
        assert torch.equal(back.rope_inv_freq(kind), original.rope_inv_freq(kind))
    assert ck.generation == {**generation, "eos_token_id": [1], "pad_token_id": 0, "bos_token_id": 2}
    GenerationConfig.from_dict(ck.generation)

    for name, tensor in tensors.items():
        data, qtype, shape = ck.raw(name)
        assert qtype.name == types[name] and shape == tuple(tensor.shape)
        values = ck.dequantized(name)
        assert values.dtype == torch.float32 and values.shape == tensor.shape
        assert torch.equal(values, torch.from_numpy(dequantize(np.array(data), qtype).reshape(shape)))
        if qtype == T.F32:
            assert torch.equal(values, tensor)
        elif qtype in (T.F16, T.BF16):
            rounded = tensor.to(torch.float16 if qtype == T.F16 else torch.bfloat16).float()
            assert torch.equal(values, rounded)
        else:
            error = ((values - tensor).norm() / tensor.norm()).item()
            assert error < TOLERANCE[qtype.name], (name, qtype.name, error)
    assert ck.dequantized(matrices[0], torch.bfloat16).dtype == torch.bfloat16


def known_input() -> np.ndarray:
    """64 blocks of 256 values from integer arithmetic (identical on every platform): scales from 2^-9 to 2^3, a zero
    block, a constant block, an all-positive block and a half-zero block."""
    codes = (np.arange(64 * 256, dtype=np.int64) * 2654435761) % 65521 - 32760
    x = codes.astype(np.float32).reshape(64, 256) / np.float32(32768)
    x *= np.float32(2.0) ** (np.arange(64) % 13 - 9).astype(np.float32)[:, None]
    x[1] = 0
    x[2] = 0.75
    x[3] = np.abs(x[3])
    x[4, ::2] = 0
    return x


# sha256 of ggml's quantize_row_q4_K_ref / q5_K_ref / q6_K_ref output on known_input() (built without FMA contraction).
GGML_REFERENCE = {
    T.Q4_K: "6f45914cef213ffdba0651041cd8a1fff8504bf228c23e2b913dd2d5d1c94530",
    T.Q5_K: "95f09cc2c63b3dfc53170d2d45aa54da2a6e811bf9a46a09ae4738bc8821a04b",
    T.Q6_K: "53fef2159501cd6156e9543fba8127251c9b9f0ca59a9be89dc8fb7c38ddbad9",
}


@pytest.mark.parametrize("qtype", list(GGML_REFERENCE), ids=lambda t: t.name)
def test_k_quants_are_ggml_reference_bytes(qtype):
    x = known_input()
    blocks = quantize_blocks(x, qtype)
    assert hashlib.sha256(blocks.tobytes()).hexdigest() == GGML_REFERENCE[qtype]
    values = dequantize(blocks, qtype)
    assert values.shape == x.shape
    assert not values[1].any()  # a zero block decodes to exact zeros
    assert np.abs(values[2] - 0.75).max() < 0.01


# ---- the published layout --------------------------------------------------------------------------------------------

RELEASE = {"model_type": "diffusion_gemma", "canvas_length": 256, "text_config": dict(
    vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, num_attention_heads=16,
    num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2, sliding_window=1024,
    max_position_embeddings=262144, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
    final_logit_softcapping=30.0, rms_norm_eps=1e-6, layer_types=[F if i % 6 == 5 else S for i in range(30)])}


def test_release_metadata_is_the_published_layout():
    config = ModelConfig.from_dict(RELEASE)
    meta, rope_freqs = _model_metadata(config, "release")
    full = [5, 11, 17, 23, 29]
    a = "diffusion-gemma."
    assert meta == {
        a + "block_count": 30, a + "context_length": 262144, a + "embedding_length": 2816,
        a + "feed_forward_length": 2112, a + "vocab_size": 262144, a + "attention.head_count": 16,
        a + "attention.head_count_kv": [2 if i in full else 8 for i in range(30)],
        a + "rope.freq_base": 1e6, a + "rope.freq_base_swa": 1e4, a + "attention.layer_norm_rms_epsilon": 1e-6,
        a + "expert_count": 128, a + "expert_used_count": 8, a + "expert_feed_forward_length": 704,
        a + "attention.key_length": 512, a + "attention.value_length": 512,
        a + "attention.key_length_swa": 256, a + "attention.value_length_swa": 256,
        a + "rope.dimension_count": 512, a + "rope.dimension_count_swa": 256, a + "final_logit_softcapping": 30.0,
        a + "attention.sliding_window": 1024,
        a + "attention.sliding_window_pattern": [i not in full for i in range(30)],
        a + "attention.causal": False, a + "attention.shared_kv_layers": 0,
        a + "embedding_length_per_layer_input": 0, "diffusion.canvas_length": 256,
    }
    # Proportional RoPE over 512 dims with partial factor 0.25: 64 rotated pairs, 192 left in place.
    assert rope_freqs.dtype == np.float32 and rope_freqs.tolist() == [1.0] * 64 + [np.float32(1e30)] * 192
    back = ModelConfig.from_dict(_config_from_metadata(meta, rope_freqs, 262144, "release"))
    assert back == config
    for kind in (S, F):
        assert torch.equal(back.rope_inv_freq(kind), config.rope_inv_freq(kind))
    # gguf.md: 692 tensors in the published files, 423 of them F32 (1-D tensors, router projections, rope_freqs).
    shapes = _expected_shapes(config)
    assert len(shapes) + 1 == 692
    assert sum(len(s) == 1 or n.endswith("router.proj.weight") for n, s in shapes.items()) + 1 == 423
    assert shapes["model.decoder.layers.0.experts.gate_up_proj"] == (128, 1408, 2816)
    assert shapes["model.decoder.layers.0.experts.down_proj"] == (128, 2816, 704)
    assert "model.decoder.layers.5.self_attn.v_proj.weight" not in shapes


# ---- names -------------------------------------------------------------------------------------------------------

LAYER_TENSORS = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm",
                 "post_attention_norm", "ffn_norm", "post_ffw_norm", "ffn_gate", "ffn_up", "ffn_down",
                 "layer_output_scale", "enc_layer_output_scale"]
EXPERT_TENSORS = ["pre_ffw_norm_2", "post_ffw_norm_1", "post_ffw_norm_2", "ffn_gate_inp", "ffn_gate_up_exps",
                  "ffn_down_exps"]


@pytest.mark.parametrize("experts", [True, False], ids=["moe", "dense"])
def test_names_cover_every_tensor_once(tmp_path, experts):
    config = config_dict() if experts else config_dict(num_experts=None, top_k_experts=None,
                                                       moe_intermediate_size=None)
    tensors = model_tensors(config)
    path = write_gguf(tmp_path / "m.gguf", config, tensors)
    ck = read_gguf(path)
    names = ck.tensor_names()
    assert len(names) == len(set(names)) == len(tensors) and set(names) == set(tensors)
    for name in names:
        assert torch.equal(ck.dequantized(name), tensors[name]), name

    expected = {"token_embd.weight", "output_norm.weight", "rope_freqs.weight", "self_cond_pre_norm.weight",
                "self_cond_gate.weight", "self_cond_up.weight", "self_cond_down.weight"}
    for layer, kind in enumerate((S, F)):
        parts = LAYER_TENSORS + (EXPERT_TENSORS if experts else [])
        expected |= {f"blk.{layer}.{part}.weight" for part in parts if not (part == "attn_v" and kind == F)}
        if experts:
            expected |= {f"blk.{layer}.ffn_gate_inp.scale", f"blk.{layer}.ffn_down_exps.scale"}
    stored = {t.name: t for t in GGUFReader(path).tensors}
    assert set(stored) == expected
    # The encoder keeps its own layer scalars; every other encoder tensor is the decoder's.
    for layer in range(2):
        encoder = tensors[f"model.encoder.language_model.layers.{layer}.layer_scalar"]
        decoder = tensors[f"model.decoder.layers.{layer}.layer_scalar"]
        assert not torch.equal(encoder, decoder)
        assert np.array_equal(stored[f"blk.{layer}.enc_layer_output_scale.weight"].data, encoder.numpy())
        assert np.array_equal(stored[f"blk.{layer}.layer_output_scale.weight"].data, decoder.numpy())
    if experts:  # ggml dimensions are the checkpoint's reversed, with no transpose
        assert stored["blk.0.ffn_gate_up_exps.weight"].shape.tolist() == [64, 64, 4]
        assert np.array_equal(stored["blk.0.ffn_gate_up_exps.weight"].data,
                              tensors["model.decoder.layers.0.experts.gate_up_proj"].numpy())
        assert np.array_equal(stored["blk.0.ffn_down_exps.scale"].data,
                              tensors["model.decoder.layers.0.router.per_expert_scale"].numpy())


# ---- tokenizer -----------------------------------------------------------------------------------------------------

CORPUS = ["The quick brown fox jumps over the lazy dog.\n\nA second paragraph follows here.\n",
          "def main():\n    print('hello world')\n\n\n    return 0\n",
          "Les élèves étudient à l'école. Über Größe und Maße.\n"] * 20
SAMPLES = ["Hello world!  Two  spaces, and   three.", "line one\n\nline two\n\n\nthree\n", "\n", "\n\n",
           "émoji 😀 中文 € ▁ literal", "<|turn>user\nHi there<turn|>\n<|turn>model\n", "tabs\tand\r\nCRLF",
           "   leading and trailing   ", "def f(x):\n    return x\n", "Größe", ""]
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>", "<|tool_response>", "<|channel>",
            "<channel|>"]
NEWLINE_TOKENS = ["\n", "\n\n", "\n\n\n"]


def gemma_style_tokenizer(newline_runs_added: bool) -> str:
    """A small tokenizer.json in Gemma's shape: ▁ for spaces, byte-fallback BPE with <0xXX> tokens, special tokens
    first, newline runs as vocabulary tokens that no merge produces (added tokens or not)."""
    trainer_model = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    trainer_model.normalizer = normalizers.Replace(" ", "▁")
    trainer_model.pre_tokenizer = pre_tokenizers.Split(Regex("\n+"), behavior="isolated")
    trainer_model.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, show_progress=False))
    learned = json.loads(trainer_model.to_str())["model"]
    vocab = {token: i for i, token in enumerate(SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + NEWLINE_TOKENS)}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) for m in learned["merges"] if "\n" not in "".join(m)]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True,
                                     unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    if newline_runs_added:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in NEWLINE_TOKENS])
    return tokenizer.to_str()


def llama_cpp_gemma4(tokens: list[str], types: list[int], merges: list[str], text: str) -> list[int]:
    """llama.cpp's tokenization of a "gemma4" vocabulary, without BOS (src/llama-vocab.cpp): control and
    user-defined tokens split out first (longest first), spaces escaped to ▁, words "[^\\n]+|[\\n]+", a newline run
    that is a token kept whole, merges lowest rank first (leftmost on ties), <0xXX> for symbols that are no token."""
    ids = {token: i for i, token in enumerate(tokens)}
    ranks: dict[tuple[str, str], int] = {}
    for rank, merge in enumerate(merges):
        cut = merge.find(" ", 1)
        ranks.setdefault((merge[:cut], merge[cut + 1:]), rank)
    special = sorted((t for t, kind in zip(tokens, types) if kind in (3, 4)), key=len, reverse=True)
    out: list[int] = []
    for piece in re.split("(" + "|".join(map(re.escape, special)) + ")", text):
        if piece in special:
            out.append(ids[piece])
            continue
        for word in re.findall(r"[^\n]+|\n+", piece.replace(" ", "▁")):
            if not word.strip("\n") and word in ids:
                out.append(ids[word])
                continue
            symbols = list(word)
            while True:
                candidates = [(ranks[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in ranks]
                if not candidates:
                    break
                _, i = min(candidates)
                symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
            for symbol in symbols:
                out.extend([ids[symbol]] if symbol in ids else [ids[f"<0x{b:02X}>"] for b in symbol.encode()])
    return out


def metadata(path: Path) -> dict:
    return {name: _field_value(field) for name, field in GGUFReader(path).fields.items()}


def write_with_tokenizer(path: Path, tokenizer_json: str, tokenizer_config: dict, vocab_size: int) -> None:
    config = config_dict(vocab_size=vocab_size)
    write_gguf(path, config, model_tensors(config), tokenizer_json=tokenizer_json,
               tokenizer_config=tokenizer_config, chat_template="{{ bos_token }}{{ messages[0]['content'] }}")


GEMMA_TOKENIZER_CONFIG = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                          "add_bos_token": True}


@pytest.mark.parametrize("newline_runs_added", [True, False], ids=["newlines-added", "newlines-in-vocab"])
def test_gemma4_tokenizer_matches_llama_cpp(tmp_path, newline_runs_added):
    original_json = gemma_style_tokenizer(newline_runs_added)
    original = Tokenizer.from_str(original_json)
    path = tmp_path / "tok.gguf"
    write_with_tokenizer(path, original_json, GEMMA_TOKENIZER_CONFIG, original.get_vocab_size() + 8)
    meta = metadata(path)
    tokens, types, merges = (meta[f"tokenizer.ggml.{key}"] for key in ("tokens", "token_type", "merges"))
    assert meta["tokenizer.ggml.model"] == "gemma4"
    assert types[:5] == [3] * 5 and types[7:10] == [4] * 3  # control; the chat markers llama.cpp always renders
    assert types[10:266] == [6] * 256 and tokens[-8:] == [f"[PAD{i}]" for i in range(len(tokens) - 8, len(tokens))]

    ck = read_gguf(path)
    rebuilt = Tokenizer.from_str(ck.tokenizer_json)
    for text in SAMPLES:
        ids = rebuilt.encode(text).ids
        assert ids == llama_cpp_gemma4(tokens, types, merges, text), text
        if "<" not in text:
            assert rebuilt.decode(ids) == text.replace("▁", " ")
        if newline_runs_added:  # the original's semantics are llama.cpp's: the round trip changes nothing
            assert ids == original.encode(text).ids, text
            assert rebuilt.decode(ids) == original.decode(ids)
    if not newline_runs_added:  # plain BPE would split "\n\n"; llama.cpp and the rebuilt tokenizer keep it whole
        assert original.encode("\n\n").ids == [266, 266] and rebuilt.encode("\n\n").ids == [267]
    # The chat markers llama.cpp marks USER_DEFINED are rendered on decode (the original skips them as special).
    thought = "<|channel>thought\nhmm<channel|>"
    assert rebuilt.decode(rebuilt.encode(thought).ids) == thought != original.decode(original.encode(thought).ids)
    assert ck.tokenizer_config == GEMMA_TOKENIZER_CONFIG
    assert ck.chat_template == "{{ bos_token }}{{ messages[0]['content'] }}"
    assert ck.generation["eos_token_id"] == [1, 6, 7]  # <eos>, then <turn|> and <|tool_response> as in the release


def test_byte_level_tokenizer_round_trip(tmp_path):
    directory = train_tokenizer(CORPUS, 300, tmp_path / "tokenizer").parent
    original_json = (directory / "tokenizer.json").read_text()
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    path = tmp_path / "bpe.gguf"
    write_with_tokenizer(path, original_json, tokenizer_config, 320)
    meta = metadata(path)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"

    ck = read_gguf(path)
    original, rebuilt = Tokenizer.from_str(original_json), Tokenizer.from_str(ck.tokenizer_json)
    for text in SAMPLES:
        ids = original.encode(text).ids
        assert rebuilt.encode(text).ids == ids, text
        assert rebuilt.decode(ids) == original.decode(ids)
        assert rebuilt.decode(ids, skip_special_tokens=False) == original.decode(ids, skip_special_tokens=False)
    assert ck.tokenizer_config == {key: tokenizer_config[key] for key in
                                   ("bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token",
                                    "add_eos_token")}
    assert ck.generation["eos_token_id"] == [1, 5]  # this tokenizer's <turn|>, as the bundled model's config has it


def test_file_without_tokenizer(small):
    path, config, _ = small
    ck = read_gguf(path)
    assert ck.tokenizer_json is None and ck.tokenizer_config == {} and ck.chat_template is None
    assert ModelConfig.from_dict(ck.config) == ModelConfig.from_dict(config)
    assert ck.generation == {"max_denoising_steps": 48, "t_min": 0.4, "t_max": 0.8,
                             "sampler_config": {"entropy_bound": 0.1}, "stability_threshold": 1,
                             "confidence_threshold": 0.005, "eos_token_id": [1], "pad_token_id": 0, "bos_token_id": 2}


# ---- bad files -----------------------------------------------------------------------------------------------------

def rewrite(src: Path, dst: Path, *, drop: tuple[str, ...] = (), replace: dict | None = None,
            add: dict | None = None, drop_keys: tuple[str, ...] = (), architecture: str | None = None) -> Path:
    """A copy of a GGUF file with tensors or keys dropped, replaced or added, through gguf's own reader and writer."""
    reader = GGUFReader(src)
    writer = GGUFWriter(dst, architecture or _field_value(reader.fields["general.architecture"]))
    for name, field in reader.fields.items():
        if not (name.startswith("GGUF.") or name == "general.architecture" or name in drop_keys):
            # gguf infers array item types from the values: int32, float32, bool and string, as written
            writer.add_key_value(name, _field_value(field), field.types[0])
    for tensor in reader.tensors:
        if tensor.name not in drop:
            data = (replace or {}).get(tensor.name, np.array(tensor.data))
            writer.add_tensor(tensor.name, data, raw_dtype=tensor.tensor_type if data.dtype == np.uint8 else None)
    for name, data in (add or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(GGUFError, match=r"model\.safetensors is not a GGUF file"):
        read_gguf(path)
    with pytest.raises(GGUFError, match="no such file"):
        read_gguf(tmp_path / "absent.gguf")


@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.95])
def test_truncated_file(tmp_path, small, fraction):
    data = small[0].read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:int(len(data) * fraction)])
    with pytest.raises(GGUFError, match=r"cut\.gguf is truncated or corrupt"):
        read_gguf(path)


def test_another_architecture(tmp_path, small):
    path = rewrite(small[0], tmp_path / "other.gguf", architecture="gemma4")
    with pytest.raises(GGUFError, match=r"other\.gguf holds a 'gemma4' model; dgemma reads 'diffusion-gemma'"):
        read_gguf(path)


def test_missing_tensor(tmp_path, small):
    path = rewrite(small[0], tmp_path / "missing.gguf", drop=("blk.1.attn_k_norm.weight",))
    with pytest.raises(GGUFError, match=r"missing\.gguf.*\n.*missing tensor blk\.1\.attn_k_norm\.weight "
                                        r"\(model\.decoder\.layers\.1\.self_attn\.k_norm\.weight\) \(64,\)"):
        read_gguf(path)


def test_misshaped_and_unexpected_tensors(tmp_path, small):
    path = rewrite(small[0], tmp_path / "shape.gguf", replace={"blk.0.attn_q_norm.weight": np.ones(16, np.float32)},
                   add={"output.weight": np.zeros((512, 64), np.float32)})
    with pytest.raises(GGUFError) as error:
        read_gguf(path)
    message = str(error.value)
    assert ("wrong shape: blk.0.attn_q_norm.weight (model.decoder.layers.0.self_attn.q_norm.weight) is (16,), "
            "the config implies (32,)") in message
    assert "unexpected tensor output.weight" in message


def test_unsupported_type(tmp_path, small):
    path = tmp_path / "iq.gguf"
    path.write_bytes(small[0].read_bytes())
    reader = GGUFReader(path, "r+")  # retype blk.0.attn_q.weight in place: IQ4_NL blocks are smaller than F32 rows
    info = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight").field
    info.parts[4][0] = T.IQ4_NL
    reader.data.flush()
    del reader, info
    with pytest.raises(GGUFError, match=r"unsupported type: blk\.0\.attn_q\.weight \(model\.decoder\.layers\.0\."
                                        r"self_attn\.q_proj\.weight\) is stored as IQ4_NL"):
        read_gguf(path)


def test_missing_metadata_and_bad_rope_freqs(tmp_path, small):
    path = rewrite(small[0], tmp_path / "keys.gguf", drop_keys=("diffusion.canvas_length",))
    with pytest.raises(GGUFError, match=r"keys\.gguf: required metadata key 'diffusion\.canvas_length' is missing"):
        read_gguf(path)
    freqs = np.array([1.0] * 8 + [1e30] * 23 + [1.0], np.float32)
    path = rewrite(small[0], tmp_path / "rope.gguf", replace={"rope_freqs.weight": freqs})
    with pytest.raises(GGUFError, match="rope_freqs.weight is not the pattern"):
        read_gguf(path)


# ---- what the writer refuses ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("config", "types", "match"), [
    (config_dict(), {"model.decoder.layers.0.self_attn.q_proj.weight": "Q4_K"},
     r"cannot be stored as Q4_K: its rows of 64 values are not a multiple of the 256-value blocks"),
    (config_dict(), {"model.decoder.norm.weight": "Q8_0"}, "is 1-D; it must be F32, F16 or BF16, not Q8_0"),
    (config_dict(), {"model.decoder.norm.weight": "Q3_XL"}, "type 'Q3_XL' for model.decoder.norm.weight"),
    (config_dict(), {"model.decoder.layers.0.self_attn.bias": "F32"}, "not a tensor of this model"),
    (config_dict(attention_bias=True), {}, "cannot hold attention biases"),
    (config_dict(hidden_activation="silu"), {}, "cannot hold activation 'silu'"),
])
def test_writer_refuses(tmp_path, config, types, match):
    tensors = model_tensors(config_dict())
    with pytest.raises(GGUFError, match=match):
        write_gguf(tmp_path / "refused.gguf", config, tensors, types=types)
    assert list(tmp_path.iterdir()) == []


def test_writer_checks_tensors_and_leaves_no_partial_file(tmp_path):
    tensors = model_tensors(config_dict())
    del tensors["model.decoder.norm.weight"]
    with pytest.raises(GGUFError, match=r"missing tensor model\.decoder\.norm\.weight \(64,\)"):
        write_gguf(tmp_path / "m.gguf", config_dict(), tensors)
    tensors = model_tensors(config_dict())
    tensors["model.decoder.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    with pytest.raises(GGUFError, match=r"up_proj\.weight holds NaN"):  # found mid-write, after the header
        write_gguf(tmp_path / "m.gguf", config_dict(), tensors)
    assert list(tmp_path.iterdir()) == []
    generation = {"max_denoising_steps": 48, "t_min": None, "t_max": 0.8, "sampler_config": {"entropy_bound": 0.1},
                  "stability_threshold": 1, "confidence_threshold": 0.005}
    with pytest.raises(GGUFError, match=r"generation t_min is missing or None"):
        write_gguf(tmp_path / "m.gguf", config_dict(), model_tensors(config_dict()), generation=generation)


def test_writer_takes_tensors_already_encoded_as_blocks(tmp_path):
    tensors = model_tensors(config_dict())
    name = "model.decoder.layers.0.experts.gate_up_proj"
    types = {name: "Q4_0"}
    encoded = quantize_blocks(tensors[name].numpy(), T.Q4_0)
    direct = write_gguf(tmp_path / "direct.gguf", config_dict(), tensors, types=types)
    shapes_only = dict(tensors, **{name: torch.empty(tensors[name].shape, device="meta")})
    given = write_gguf(tmp_path / "given.gguf", config_dict(), shapes_only, types=types, blocks={name: encoded})
    assert direct.read_bytes() == given.read_bytes()
    with pytest.raises(GGUFError, match=r"gate_up_proj as Q4_0 needs uint8 block bytes of shape \(4, 64, 36\)"):
        write_gguf(tmp_path / "bad.gguf", config_dict(), shapes_only, types=types, blocks={name: encoded[..., :-2]})
    assert not (tmp_path / "bad.gguf").exists()
