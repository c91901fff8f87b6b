"""The test oracle: transformers' DiffusionGemma built from the tiny configs of conftest.py. Only the tests that
compare against the reference import this module."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DiffusionGemmaTextConfig, \
    Gemma4VisionConfig

from conftest import text_values


def _blind_decoder(model) -> None:
    embed = model.model.decoder.embed_tokens.weight
    embed.copy_(embed[0:1] + 0.01 * torch.randn_like(embed))
    model.lm_head.weight.mul_(2.0)


TWEAKS = {"stable": _blind_decoder}


def build_reference(name: str, canvas_length: int = 16, seed: int = 0) -> DiffusionGemmaForBlockDiffusion:
    """A reference model with every weight random and large enough that its predictions are peaked."""
    values, tie = text_values(name)
    text = DiffusionGemmaTextConfig(**values)
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


def load_reference(path: Path, dtype: torch.dtype = torch.float32,
                   device: str = "cpu") -> DiffusionGemmaForBlockDiffusion:
    return DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=dtype).eval().to(device)
