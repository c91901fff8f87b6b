"""The network with what transformers users call on it: `from_pretrained`, `generate`, `save_pretrained`.

`dgemma.load` returns this class. The network itself (model.py) knows nothing of generation or files; this
thin layer joins it to the generation API (generation.py), its settings (generation_config.json) and the
checkpoint format (checkpoints.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoints import load_model, resolve_checkpoint, save_model
from .config import ModelConfig
from .generation import GenerationOutput, generate
from .generation_config import GenerationConfig
from .model import DiffusionGemma


class DiffusionGemmaForBlockDiffusion(DiffusionGemma):
    """A DiffusionGemma with its generation settings, named after the reference's class."""

    def __init__(self, config: ModelConfig, generation_config: GenerationConfig | None = None):
        super().__init__(config)
        self.generation_config = generation_config or GenerationConfig()

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> "DiffusionGemmaForBlockDiffusion":
        """Load a checkpoint directory, a Hugging Face repo id (local cache first) or, with None, the bundled
        model. Weights are memory-mapped safetensors, converted to `dtype` (default: as stored)."""
        directory = resolve_checkpoint(path)
        model = load_model(directory, dtype=dtype, device=device, model_class=cls)
        model.generation_config = GenerationConfig.from_file(directory)
        return model

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> GenerationOutput:
        """See `dgemma.generation.generate`."""
        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> Path:
        """Write transformers' layout (config.json, generation_config.json, safetensors), atomically."""
        extra = {"generation_config.json": self.generation_config.to_json()}
        return save_model(self, path, max_shard_bytes=max_shard_bytes, extra_files=extra)
