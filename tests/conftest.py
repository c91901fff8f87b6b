"""Shared fixtures: tiny random DiffusionGemma checkpoints, written by transformers itself (the oracle, for the
tests marked `oracle`) or by dgemma (for everything else, which runs without transformers installed)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# One thread per test process (and the processes tests start): the tests' models are tiny, one thread runs the suite
# as fast as two, and a thread that never waits for another cannot be slowed tenfold by a busy neighbour (see
# dgemma/threads.py). OMP_NUM_THREADS=N before pytest chooses otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

S, F = "sliding_attention", "full_attention"

# Each config exercises something: sliding + full layers with their own head dims and KV heads, MoE with
# top-k > 1, attention biases, untied weights, the `vision` attention flag (causal for text).
TINY_CONFIGS: dict[str, dict] = {
    "moe": dict(num_hidden_layers=4, layer_types=[S, F, S, F], num_experts=4, top_k_experts=2),
    "moe_top3_bias": dict(num_hidden_layers=3, layer_types=[S, S, F], num_experts=8, top_k_experts=3,
                          attention_bias=True, num_key_value_heads=1, global_head_dim=8),
    "untied": dict(num_hidden_layers=2, layer_types=[S, F], num_experts=4, top_k_experts=2,
                   tie_word_embeddings=False),
    "vision_flag": dict(num_hidden_layers=2, layer_types=[S, F], num_experts=4, top_k_experts=2,
                        use_bidirectional_attention="vision", sliding_window=6),
    # Untied, with a decoder that cannot tell canvas tokens apart: its predictions depend on the prefix and the
    # position only, so canvases become stable and confident and adaptive stopping really happens.
    "stable": dict(num_hidden_layers=2, layer_types=[S, F], num_experts=4, top_k_experts=2,
                   tie_word_embeddings=False),
}
TEXT_BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=8, global_head_dim=16, num_global_key_value_heads=1, sliding_window=8,
                 moe_intermediate_size=16, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def text_values(name: str) -> tuple[dict, bool]:
    """A tiny config's text_config values and whether its embeddings are tied."""
    values = dict(TEXT_BASE, **TINY_CONFIGS[name])
    return values, values.pop("tie_word_embeddings", True)


def counted_calls(monkeypatch, module, names: list[str]) -> dict[str, int]:
    """Each of `names`, functions of `module`, wrapped to count its calls (the counts, by name) and still run."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(module, name)

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)
        monkeypatch.setattr(module, name, counted)
    return calls


def test_devices() -> list[str]:
    """Every device this machine has (DGEMMA_TEST_DEVICES=cuda,... picks some: scripts/device_check.sh does)."""
    if os.environ.get("DGEMMA_TEST_DEVICES"):
        return os.environ["DGEMMA_TEST_DEVICES"].split(",")
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (
        ["mps"] if torch.backends.mps.is_available() else [])


@pytest.fixture(params=test_devices())
def device(request) -> str:
    """Runs a test once per available device."""
    return request.param


ROUNDING_ON_CUDA = ("on CUDA, cuBLAS and attention kernels are chosen by shape, so the same row computed in another "
                    "batch or call shape can round differently and sample another token (seen on an H200, "
                    "docs/performance.md); bit-exact on the CPU")


def exact_on_cpu_only(request, device: str) -> None:
    """Token identity that holds on the CPU and is expected, not promised, on CUDA: reported as xfail/xpass there."""
    if str(device).startswith("cuda"):
        request.applymarker(pytest.mark.xfail(reason=ROUNDING_ON_CUDA, strict=False))


def pytest_collection_modifyitems(items):
    # Tests that compare against transformers (they use its checkpoints) are the oracle tests.
    for item in items:
        if "checkpoint_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.oracle)


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """checkpoint_dir(name) -> path of a reference checkpoint saved by transformers' save_pretrained (built once)."""
    pytest.importorskip("transformers")
    from oracle import build_reference

    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            path = tmp_path_factory.mktemp(f"ckpt-{name}")
            build_reference(name).save_pretrained(path)
            made[name] = path
        return made[name]

    return make


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory):
    """random_checkpoint(name) -> path of a tiny random checkpoint saved by dgemma (no transformers needed)."""
    import dgemma

    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            values, tie = text_values(name)
            config = dgemma.ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": 16,
                                                   "tie_word_embeddings": tie, "text_config": values})
            model = dgemma.DiffusionGemmaForBlockDiffusion(config)
            model.init_weights(torch.Generator().manual_seed(0))
            with torch.no_grad():  # large enough weights that predictions are peaked, as the oracle's
                generator = torch.Generator().manual_seed(1)
                for param in model.parameters():
                    if param.dim() >= 2:
                        param.normal_(0.0, 1.0 / param.shape[-1] ** 0.5, generator=generator)
            path = tmp_path_factory.mktemp(f"random-{name}") / "model"
            dgemma.save(model, path)
            made[name] = path
        return made[name]

    return make


TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering a "
        "neighbourhood, this truth is so well fixed in the minds of the surrounding families. ") * 20

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
            "{{ m.content }}<turn|>\n{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}")


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory):
    """A small random model with a real BPE tokenizer and chat template, built without transformers."""
    import dgemma
    from dgemma.tokenizer import Tokenizer
    from dgemma.recipes.bpe import train_tokenizer

    tokenizer_dir = tmp_path_factory.mktemp("text-tokenizer")
    train_tokenizer([TEXT], 320, tokenizer_dir)
    (tokenizer_dir / "chat_template.jinja").write_text(TEMPLATE)
    tokenizer = Tokenizer.from_directory(tokenizer_dir)
    config = dgemma.ModelConfig.from_dict({
        "model_type": "diffusion_gemma", "canvas_length": 8,
        "text_config": dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                            layer_types=["sliding_attention", "full_attention"], sliding_window=16,
                            per_layer_config={"1": {"head_dim": 16, "num_key_value_heads": 1}},
                            num_experts=4, top_k_experts=2, moe_intermediate_size=16,
                            pad_token_id=0, eos_token_id=1, bos_token_id=2)})
    model = dgemma.DiffusionGemmaForBlockDiffusion(config)
    model.init_weights(torch.Generator().manual_seed(0))
    model.generation_config = model.generation_config.updated(eos_token_id=1, pad_token_id=0, max_new_tokens=16,
                                                              max_denoising_steps=4)
    directory = tmp_path_factory.mktemp("text-model") / "model"
    dgemma.save(model, directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory
