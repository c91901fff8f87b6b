"""dgemma: DiffusionGemma-style block text diffusion in PyTorch.

Importing the package is cheap: torch and the modules below are imported when first used, so that the `dgemma`
command can set up the process (thread and OpenMP settings) before torch starts, and `dgemma --version` is quick.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .config import ModelConfig
    from .generation import GenerationOutput, generate
    from .generation_config import EntropyBoundSamplerConfig, GenerationConfig
    from .model import DiffusionGemma
    from .pretrained import DiffusionGemmaForBlockDiffusion

__all__ = ["load", "save", "DiffusionGemma", "DiffusionGemmaForBlockDiffusion", "ModelConfig", "GenerationConfig",
           "EntropyBoundSamplerConfig", "GenerationOutput", "generate"]
__version__ = "0.2.0"

_EXPORTS = {"DiffusionGemma": "model", "DiffusionGemmaForBlockDiffusion": "pretrained", "ModelConfig": "config",
            "GenerationConfig": "generation_config", "EntropyBoundSamplerConfig": "generation_config",
            "GenerationOutput": "generation", "generate": "generation"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    try:  # submodules, as `dgemma.generation` after a plain `import dgemma`
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def load(path: str | Path | None = None, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
         keep_quantized: bool | str = True, quantize: str | None = None,
         decode: str | None = "diffusion") -> DiffusionGemmaForBlockDiffusion:
    """Load a checkpoint: a directory (config.json, safetensors, optional generation_config.json), a GGUF file
    (its quantised matrices kept quantised unless `keep_quantized=False`; only its experts with "experts"), a
    Hugging Face repo id resolved from the local Hugging Face cache, or the bundled model when `path` is None.
    `quantize` (a scheme of `dgemma.quantized.SCHEMES`) quantises a safetensors checkpoint's matrices as they load.
    `decode="autoregressive"` lays 4-bit experts out for one token at a time on the CPU; `decode=None` keeps every
    floating-point weight a parameter, to train or convert (see `from_pretrained`)."""
    from .pretrained import DiffusionGemmaForBlockDiffusion

    return DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=dtype, device=device,
                                                           keep_quantized=keep_quantized, quantize=quantize,
                                                           decode=decode)


def save(model: DiffusionGemma, path: str | Path, max_shard_bytes: int = 5 * 2**30,
         generation_config: GenerationConfig | None = None) -> Path:
    """Save in transformers' layout (config.json, generation_config.json when the model or the call has one,
    safetensors)."""
    from .checkpoints import save_model

    generation_config = generation_config or getattr(model, "generation_config", None)
    extra = {"generation_config.json": generation_config.to_json()} if generation_config is not None else {}
    return save_model(model, path, max_shard_bytes=max_shard_bytes, extra_files=extra)
