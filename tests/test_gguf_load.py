"""GGUF files as models: `dgemma.load("model.gguf", keep_quantized=False)` dequantises exactly as the gguf library does, runs token for
token as transformers does with the same weights, reads its tokenizer and generation settings from the metadata,
and every command takes `--model FILE.gguf`."""

from __future__ import annotations

import json

import pytest
import torch

import dgemma
from dgemma.checkpoints import bundled_model_dir, to_checkpoint_names
from dgemma.cli import main
from dgemma.gguf import GGUFError, read_gguf, write_gguf
from dgemma.tokenizer import Tokenizer

from test_gguf import K_CONFIG, model_tensors

TYPES = ("Q4_K", "Q8_0", "Q6_K", "Q4_0", "Q5_K", "BF16", "Q5_1")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A tiny model in a mix of quantised types, with the bundled model's tokenizer in its metadata."""
    tokenizer_dir = bundled_model_dir()
    config = dict(K_CONFIG, text_config=dict(K_CONFIG["text_config"], vocab_size=8192))
    tensors = model_tensors(config)
    types = {name: TYPES[i % len(TYPES)] for i, name in enumerate(sorted(n for n, t in tensors.items() if t.dim() > 1))}
    path = tmp_path_factory.mktemp("gguf") / "mixed.gguf"
    write_gguf(path, config, tensors, types=types,
               generation={"max_denoising_steps": 6, "t_min": 0.3, "t_max": 0.7, "sampler_config": {"entropy_bound": 2.0},
                           "stability_threshold": 1, "confidence_threshold": 0.2},
               tokenizer_json=(tokenizer_dir / "tokenizer.json").read_text(),
               tokenizer_config=json.loads((tokenizer_dir / "tokenizer_config.json").read_text()),
               chat_template=(tokenizer_dir / "chat_template.jinja").read_text())
    return path


def test_weights_are_the_gguf_librarys_dequantisation(quantized):
    model = dgemma.load(quantized, dtype=torch.float32, keep_quantized=False)
    checkpoint = read_gguf(quantized)
    ours = to_checkpoint_names(model)
    assert sorted(ours) == sorted(checkpoint.tensor_names())
    for name in checkpoint.tensor_names():
        assert torch.equal(ours[name], checkpoint.dequantized(name)), name
    assert model.generation_config.max_denoising_steps == 6 and model.generation_config.entropy_bound == 2.0
    assert dgemma.load(quantized).dtype == torch.bfloat16  # quantised files default to bf16 compute


@pytest.mark.oracle
def test_reference_mode_is_token_identical_to_transformers_on_the_dequantised_weights(quantized, tmp_path):
    pytest.importorskip("transformers")
    from oracle import load_reference
    ours = dgemma.load(quantized, dtype=torch.float32, keep_quantized=False)
    ours.save_pretrained(tmp_path / "dequantised")
    reference = load_reference(tmp_path / "dequantised")
    ids = torch.randint(3, 8192, (1, 12), generator=torch.Generator().manual_seed(0))
    for seed in range(2):
        torch.manual_seed(seed)
        expected = reference.generate(ids, max_new_tokens=16, max_denoising_steps=4)
        torch.manual_seed(seed)
        got = ours.generate(ids, max_new_tokens=16, max_denoising_steps=4, sampling="reference")
        assert torch.equal(got.sequences, expected.sequences[:, :got.sequences.shape[1]])


def test_commands_take_a_gguf_file(quantized, capsys):
    tokenizer = Tokenizer.from_checkpoint(quantized)
    reference = Tokenizer.from_directory(bundled_model_dir())
    text = "It is a truth universally acknowledged"
    assert tokenizer.encode(text) == reference.encode(text)
    assert main(["generate", "--model", str(quantized), text, "--max-new-tokens", "8", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith(text)
    assert main(["info", str(quantized), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["hidden_size"] == 256 and "Q4_K" in info["dtype"] and info["weights_bytes"] == quantized.stat().st_size


def test_a_file_that_is_not_a_dgemma_gguf_is_named(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(GGUFError, match="model.gguf"):
        dgemma.load(bad)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="weights.bin is a file"):
        dgemma.load(other)
