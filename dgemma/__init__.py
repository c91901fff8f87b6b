"""dgemma: DiffusionGemma-style block text diffusion in PyTorch."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoints import save_model
from .config import ModelConfig
from .generation import GenerationOutput, generate
from .generation_config import EntropyBoundSamplerConfig, GenerationConfig
from .model import DiffusionGemma
from .pretrained import DiffusionGemmaForBlockDiffusion

__all__ = ["load", "save", "DiffusionGemma", "DiffusionGemmaForBlockDiffusion", "ModelConfig", "GenerationConfig",
           "EntropyBoundSamplerConfig", "GenerationOutput", "generate"]
__version__ = "0.2.0"


def load(path: str | Path | None = None, dtype: torch.dtype | None = None,
         device: str | torch.device = "cpu") -> DiffusionGemmaForBlockDiffusion:
    """Load a checkpoint: a directory (config.json, safetensors, optional generation_config.json), a Hugging Face
    repo id resolved from the local Hugging Face cache, or the bundled model when `path` is None."""
    return DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=dtype, device=device)


def save(model: DiffusionGemma, path: str | Path, max_shard_bytes: int = 5 * 2**30,
         generation_config: GenerationConfig | None = None) -> Path:
    """Save in transformers' layout (config.json, generation_config.json when the model or the call has one,
    safetensors)."""
    generation_config = generation_config or getattr(model, "generation_config", None)
    extra = {"generation_config.json": generation_config.to_json()} if generation_config is not None else {}
    return save_model(model, path, max_shard_bytes=max_shard_bytes, extra_files=extra)
