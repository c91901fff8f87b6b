"""The network with what transformers users call on it: `from_pretrained`, `generate`, `save_pretrained`.

`dgemma.load` returns this class. The network itself (model.py) knows nothing of generation or files; this
thin layer joins it to the generation API (generation.py), its settings (generation_config.json) and the
checkpoint format (checkpoints.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoints import is_gguf, load_gguf_model, load_model, reorder_experts, resolve_checkpoint, save_model
from .gguf import read_gguf
from .config import ModelConfig
from .generation import GenerationOutput, generate
from .generation_config import DECODE_MODES, GenerationConfig
from .model import DiffusionGemma


class DiffusionGemmaForBlockDiffusion(DiffusionGemma):
    """A DiffusionGemma with its generation settings, named after the reference's class."""

    def __init__(self, config: ModelConfig, generation_config: GenerationConfig | None = None):
        super().__init__(config)
        self.generation_config = generation_config or GenerationConfig()

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", keep_quantized: bool | str = True,
                        quantize: str | None = None, decode: str | None = "diffusion"
                        ) -> "DiffusionGemmaForBlockDiffusion":
        """Load a checkpoint directory, a GGUF file, a Hugging Face repo id (local cache first) or, with None, the
        bundled model. Safetensors weights are memory-mapped and converted to `dtype` (default: as stored), or with
        `quantize` ("int8", "int4", "q4_k_m") the scheme's matrices are quantised as they load. A GGUF file's
        quantised matrices stay quantised, or with `keep_quantized=False` are dequantised as the `gguf` library does
        (default dtype: bfloat16 for quantised files); `keep_quantized="experts"` keeps only the experts quantised
        (the CPU form of docs/cpu.md for a GGUF file). `decode` ("diffusion", "autoregressive" or "speculative"):
        the decoding the model is loaded for, which chooses the CPU layout of 4-bit experts computed in bf16 (the
        AMX kernel's for a canvas's rows, torch's kernel's for one token's with "autoregressive";
        `dgemma.quantized.cpu_int4_layout`). Every mode runs on either layout; this only decides which is fast.
        Loaded for canvases ("diffusion", "speculative"), large bf16 experts on the CPU are held in oneDNN's layout
        instead of as parameters (`dgemma.checkpoints.reorder_experts`); `decode=None` loads every weight as it
        would for "diffusion" but keeps floating-point weights parameters (to train or convert: the trainer loads
        so)."""
        if keep_quantized not in (True, False, "experts"):
            raise ValueError(f"keep_quantized must be True, False or 'experts', not {keep_quantized!r}")
        if decode is not None and decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, not {decode!r} (or None: no decoding "
                             "layout, every floating-point weight a parameter)")
        one_row = decode == "autoregressive"
        where = resolve_checkpoint(path)
        if not is_gguf(where) and keep_quantized == "experts":
            raise ValueError(f"{where} is not a GGUF file: keep_quantized='experts' chooses among a GGUF file's "
                             "quantised matrices (quantize='int4_experts' quantises a safetensors checkpoint's "
                             "experts)")
        if is_gguf(where):
            if quantize is not None:
                raise ValueError(f"{where} is a GGUF file: its weights are quantised as stored (quantize= is for "
                                 "safetensors checkpoints)")
            checkpoint = read_gguf(where)
            model = load_gguf_model(checkpoint, dtype=dtype, device=device, model_class=cls,
                                    keep_quantized=keep_quantized, one_row=one_row)
            model.generation_config = GenerationConfig.from_dict(checkpoint.generation)
        else:
            model = load_model(where, dtype=dtype, device=device, model_class=cls, quantize=quantize,
                               one_row=one_row)
            model.generation_config = GenerationConfig.from_file(where)
        if decode in ("diffusion", "speculative"):
            reorder_experts(model)
        return model

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> GenerationOutput:
        """See `dgemma.generation.generate`."""
        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> Path:
        """Write transformers' layout (config.json, generation_config.json, safetensors), atomically."""
        extra = {"generation_config.json": self.generation_config.to_json()}
        return save_model(self, path, max_shard_bytes=max_shard_bytes, extra_files=extra)
