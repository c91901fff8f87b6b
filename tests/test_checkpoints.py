"""Checkpoints: transformers loads what dgemma saves, sharding round-trips, and bad inputs get clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import dgemma
from dgemma.checkpoints import CheckpointError
from dgemma.config import ConfigError


@pytest.mark.parametrize("name", ["moe", "untied", "moe_top3_bias"])
def test_dgemma_save_loads_in_transformers_with_the_same_weights_and_logits(checkpoint_dir, tmp_path, name):
    from oracle import load_reference
    from test_model_parity import assert_logits_close, dgemma_pass, inputs, reference_pass
    ours = dgemma.load(checkpoint_dir(name))
    dgemma.save(ours, tmp_path / "saved")
    ref = load_reference(tmp_path / "saved")
    # What transformers reads back is the source checkpoint's text model bit for bit (copies, no arithmetic;
    # the vision tower is not saved, transformers initialises it).
    source_weights = load_reference(checkpoint_dir(name)).state_dict()
    loaded = {k: v for k, v in ref.state_dict().items() if "vision" not in k}
    assert loaded.keys() == {k for k in source_weights if "vision" not in k}
    for key, value in loaded.items():
        assert torch.equal(value, source_weights[key]), key
    # Computed logits agree within the fp32 parity tolerance (1e-5, as in test_model_parity), not bit for bit:
    # two implementations of the same sums may round differently with the thread count and the machine's load.
    ids, mask, canvas, sc = inputs(ours.config.vocab_size, 2, 14, ours.config.canvas_length, 0, torch.float32, True)
    with torch.no_grad():
        ref_enc, ref_dec, _ = reference_pass(ref, ids, mask, canvas, sc)
        our_enc, our_dec, _ = dgemma_pass(ours, ids, mask, canvas, sc)
    assert_logits_close(our_dec, ref_dec, None, torch.float32, "decoder")
    assert_logits_close(our_enc, ref_enc, mask, torch.float32, "encoder")
    # The vision config read from the source checkpoint is written back unchanged.
    source = json.loads((checkpoint_dir(name) / "config.json").read_text())
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["vision_config"] == source["vision_config"]


def test_tied_weights_are_shared_and_omitted_from_the_save(checkpoint_dir, tmp_path):
    ours = dgemma.load(checkpoint_dir("moe"))
    assert ours.encoder.layers[0].mlp.gate_proj.weight is ours.decoder.layers[0].mlp.gate_proj.weight
    assert ours.encoder.layers[0].layer_scalar is not ours.decoder.layers[0].layer_scalar
    dgemma.save(ours, tmp_path / "saved")
    from safetensors import safe_open
    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    with safe_open(checkpoint_dir("moe") / "model.safetensors", "pt") as f:
        text_names = {n for n in f.keys() if "vision" not in n}
    assert names == text_names


def test_sharded_save_round_trips(checkpoint_dir, tmp_path):
    from oracle import load_reference
    ours = dgemma.load(checkpoint_dir("moe"))
    dgemma.save(ours, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    again = dgemma.load(tmp_path / "sharded")
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    ref = load_reference(tmp_path / "sharded")  # transformers reads the same shards
    assert ref.model.decoder.layers[0].self_attn.q_proj.weight.shape == ours.decoder.layers[0].self_attn.q_proj.weight.shape


def test_dtype_is_converted_on_load_and_default_is_stored_dtype(random_checkpoint, tmp_path):
    ours = dgemma.load(random_checkpoint("moe"), dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    dgemma.save(ours, tmp_path / "bf16")
    assert dgemma.load(tmp_path / "bf16").dtype == torch.bfloat16
    assert dgemma.load(random_checkpoint("moe")).dtype == torch.float32


def test_weights_are_memory_mapped_not_copied(random_checkpoint):
    """At the stored dtype, parameters are views into one mapping of the file: their addresses are laid out
    exactly as the tensors' offsets in the file."""
    from dgemma.checkpoints import SafetensorsFile, checkpoint_name
    ours = dgemma.load(random_checkpoint("moe"))
    header = SafetensorsFile(random_checkpoint("moe") / "model.safetensors").entries
    pairs = [(p.data_ptr(), header[checkpoint_name(n)]["data_offsets"][0])
             for n, p in ours.named_parameters(remove_duplicate=False) if checkpoint_name(n) in header]
    assert len(pairs) > 40
    base_ptr, base_offset = pairs[0]
    assert all(ptr - base_ptr == offset - base_offset for ptr, offset in pairs)


def test_pickled_weights_are_refused(tmp_path, random_checkpoint):
    shutil.copy(random_checkpoint("moe") / "config.json", tmp_path / "config.json")
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled.*pytorch_model.bin.*safetensors only"):
        dgemma.load(tmp_path)


def test_missing_directory_and_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        dgemma.load(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no config.json"):
        dgemma.load(tmp_path)
    (tmp_path / "weights.pt").write_bytes(b"\0" * 8)
    with pytest.raises(CheckpointError, match="weights.pt is a file"):
        dgemma.load(tmp_path / "weights.pt")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        dgemma.load(tmp_path)


def test_unknown_model_type_is_refused(tmp_path, random_checkpoint):
    config = json.loads((random_checkpoint("moe") / "config.json").read_text())
    config["model_type"] = "gemma3"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="model_type 'gemma3'.*diffusion_gemma"):
        dgemma.load(tmp_path)


def test_missing_unexpected_and_misshaped_tensors_are_reported_together(tmp_path, random_checkpoint):
    from safetensors.torch import load_file, save_file
    shutil.copy(random_checkpoint("moe") / "config.json", tmp_path / "config.json")
    tensors = load_file(random_checkpoint("moe") / "model.safetensors")
    del tensors["model.decoder.layers.1.mlp.up_proj.weight"]
    tensors["model.decoder.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    tensors["model.decoder.layers.9.extra.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        dgemma.load(tmp_path)
    message = str(err.value)
    assert "missing: model.decoder.layers.1.mlp.up_proj.weight (64, 32)" in message
    assert "wrong shape: model.decoder.layers.0.self_attn.q_proj.weight: expected (32, 32), found (3, 3)" in message
    assert "unexpected: model.decoder.layers.9.extra.weight (2,)" in message


def test_truncated_safetensors_is_refused(tmp_path, random_checkpoint):
    shutil.copy(random_checkpoint("moe") / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        dgemma.load(tmp_path)


def write_safetensors(path, header, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize("header, fragment", [
    ([1, 2, 3], "header is a JSON list"),
    ({"w": [1]}, "'w': its header entry is not an object"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, "data_offsets [-8, 0] are not"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, "are not two non-negative integers"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}, "outside the file's 8 data bytes"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "outside the file"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "not a list of non-negative integers"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "8 bytes do not hold F32 (3,)"),
])
def test_malformed_safetensors_headers_are_refused_by_file_and_tensor(tmp_path, random_checkpoint, header,
                                                                      fragment):
    shutil.copy(random_checkpoint("moe") / "config.json", tmp_path / "config.json")
    write_safetensors(tmp_path / "model.safetensors", header, b"\0" * 8)
    with pytest.raises(CheckpointError) as err:
        dgemma.load(tmp_path)
    assert str(tmp_path / "model.safetensors") in str(err.value) and fragment in str(err.value)


@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside.safetensors", "sub/../../x.safetensors", ".."])
def test_an_index_naming_shards_outside_the_directory_is_refused(tmp_path, random_checkpoint, shard):
    shutil.copy(random_checkpoint("moe") / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        dgemma.load(tmp_path)


def test_a_malformed_checkpoint_is_one_error_line_from_the_command(tmp_path, random_checkpoint, capsys):
    from dgemma.cli import main
    shutil.copy(random_checkpoint("moe") / "config.json", tmp_path / "config.json")
    write_safetensors(tmp_path / "model.safetensors", [1])
    assert main(["generate", "x", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dgemma: error: ") and "Traceback" not in err and "model.safetensors" in err


def test_bidirectional_window_convention_round_trips(checkpoint_dir):
    """A stored window w means w // 2 + 1 with use_bidirectional_attention='all', and is written back as w."""
    config = json.loads((checkpoint_dir("moe") / "config.json").read_text())
    config["text_config"].update(use_bidirectional_attention="all", sliding_window=14)
    parsed = dgemma.ModelConfig.from_dict(config)
    assert parsed.sliding_window == 8
    assert parsed.to_dict()["text_config"]["sliding_window"] == 14
    from transformers import DiffusionGemmaConfig
    assert DiffusionGemmaConfig(**config).text_config.sliding_window == 8  # the reference agrees
    with pytest.raises(ValueError, match="bidirectional encoder"):
        dgemma.DiffusionGemma(parsed)


def test_image_tokens_are_refused(random_checkpoint):
    ours = dgemma.load(random_checkpoint("moe"))
    ours.config.image_token_id = 7
    with pytest.raises(ValueError, match="image tokens"):
        ours.generate(torch.tensor([[3, 7, 4]]), max_new_tokens=4)


def test_a_repo_id_resolves_from_the_local_hugging_face_cache(random_checkpoint, tmp_path):
    """`dgemma.load("org/name")` finds a checkpoint in the Hugging Face cache layout offline, and names the repo
    when it is not there. (A subprocess, so that the cache location and offline mode are read fresh.)"""
    snapshot = tmp_path / "hub" / "models--someone--tiny-dgemma" / "snapshots" / "0123abcd"
    shutil.copytree(random_checkpoint("moe"), snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    code = ("import dgemma, sys\n"
            "model = dgemma.load('someone/tiny-dgemma')\n"
            "print(model.config.num_hidden_layers)\n"
            "try:\n"
            "    dgemma.load('someone/missing-model')\n"
            "except ValueError as err:\n"
            "    print(err)\n")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "4"
    assert "someone/missing-model is not in the local Hugging Face cache" in lines[1] and "HF_HUB_OFFLINE" in lines[1]
