"""Shared fixtures: tiny random DiffusionGemma checkpoints written by transformers itself (the oracle)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion,  # noqa: E402
                          DiffusionGemmaTextConfig, Gemma4VisionConfig)

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


def _blind_decoder(model) -> None:
    embed = model.model.decoder.embed_tokens.weight
    embed.copy_(embed[0:1] + 0.01 * torch.randn_like(embed))
    model.lm_head.weight.mul_(2.0)


TWEAKS = {"stable": _blind_decoder}


def text_config(**overrides) -> DiffusionGemmaTextConfig:
    values = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, global_head_dim=16, num_global_key_value_heads=1, sliding_window=8,
                  moe_intermediate_size=16, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    values.update(overrides)
    tie = values.pop("tie_word_embeddings", True)
    return DiffusionGemmaTextConfig(**values), tie


def build_reference(name: str, canvas_length: int = 16, seed: int = 0) -> DiffusionGemmaForBlockDiffusion:
    """A reference model with every weight random and large enough that its predictions are peaked."""
    text, tie = text_config(**TINY_CONFIGS[name])
    vision = Gemma4VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=8)
    config = DiffusionGemmaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                  canvas_length=canvas_length, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "norm" in pname or pname.endswith(".scale") or "per_expert_scale" in pname:
                param.uniform_(0.5, 1.5)
            elif "bias" in pname:
                param.normal_(0.0, 0.1)
            else:
                param.normal_(0.0, 0.5 / param.shape[-1] ** 0.5 * 4)
        for bname, buf in model.named_buffers():
            if bname.endswith("layer_scalar"):
                buf.uniform_(0.5, 1.5)
        if name in TWEAKS:
            TWEAKS[name](model)
    return model


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """checkpoint_dir(name) -> path of a reference checkpoint saved with save_pretrained (built once)."""
    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            path = tmp_path_factory.mktemp(f"ckpt-{name}")
            build_reference(name).save_pretrained(path)
            made[name] = path
        return made[name]

    return make


def load_reference(path: Path, dtype: torch.dtype = torch.float32) -> DiffusionGemmaForBlockDiffusion:
    return DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=dtype).eval()


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
