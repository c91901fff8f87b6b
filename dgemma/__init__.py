"""dgemma: DiffusionGemma-style block text diffusion in PyTorch."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoints import load_model, save_model
from .config import ModelConfig
from .generation import EntropyBoundSamplerConfig, GenerationConfig, GenerationOutput, generate
from .model import DiffusionGemma

__all__ = ["load", "save", "DiffusionGemma", "ModelConfig", "GenerationConfig", "EntropyBoundSamplerConfig",
           "GenerationOutput", "generate"]
__version__ = "0.1.0"


def load(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> DiffusionGemma:
    """Load a checkpoint directory (config.json, safetensors, optional generation_config.json)."""
    model = load_model(path, dtype=dtype, device=device)
    model.generation_config = GenerationConfig.from_file(path)
    return model


def save(model: DiffusionGemma, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Save in transformers' layout (config.json, generation_config.json, safetensors)."""
    extra = {"generation_config.json": model.generation_config.to_json()}
    return save_model(model, path, max_shard_bytes=max_shard_bytes, extra_files=extra)
