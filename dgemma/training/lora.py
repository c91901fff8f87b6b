"""Low-rank adapters on chosen projections, shared by the encoder and decoder when their weights are tied.

W x + (alpha / r) * B (A x), with A ~ N(0, 1/r) and B = 0 so training starts from the base model. The base weight
is frozen; `merge_lora` folds the adapters into the weights so that a saved checkpoint is a plain DiffusionGemma
that dgemma and transformers load without knowing about LoRA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..model import DiffusionGemma


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, lora_a: nn.Parameter, lora_b: nn.Parameter, scale: float):
        super().__init__()
        self.base = base
        self.lora_a, self.lora_b, self.scale = lora_a, lora_b, scale

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor, exact: bool = True) -> torch.Tensor:
        return self.base(x, exact) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale


def add_lora(model: DiffusionGemma, targets: list[str], rank: int, alpha: float,
             generator: torch.Generator | None = None) -> list[nn.Parameter]:
    """Wrap every Linear named in `targets` (e.g. ["q_proj", "v_proj", "o_proj"]) in both stacks; freeze all
    other parameters. Returns the adapter parameters."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    for param in model.parameters():
        param.requires_grad_(False)
    adapters: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # keyed by the base weight, so ties share
    for stack in (model.decoder, model.encoder):
        for name, module in list(stack.named_modules()):
            leaf = name.rpartition(".")[2]
            if leaf not in targets or not isinstance(module, nn.Linear):
                continue
            key = id(module.weight)
            if key not in adapters:
                out_features, in_features = module.weight.shape
                a = torch.randn(rank, in_features, generator=generator, dtype=module.weight.dtype) / math.sqrt(rank)
                adapters[key] = (nn.Parameter(a.to(module.weight.device)),
                                 nn.Parameter(module.weight.new_zeros(out_features, rank)))
            parent = stack.get_submodule(name.rpartition(".")[0])
            setattr(parent, leaf, LoRALinear(module, *adapters[key], scale=alpha / rank))
    if not adapters:
        raise ValueError(f"no Linear layer is named any of {targets}")
    return [p for pair in adapters.values() for p in pair]


@torch.no_grad()
def merge_lora(model: DiffusionGemma) -> None:
    """Fold every adapter into its base weight and unwrap it (once per shared weight). The merged weights are new
    tensors: the base weights the model held are left as they were (they may be a live model's)."""
    merged: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id(base weight) -> (base weight, merged weight)
    for stack in (model.decoder, model.encoder):
        for name, module in list(stack.named_modules()):
            if isinstance(module, LoRALinear):
                base = module.base.weight
                if id(base) not in merged:
                    delta = (module.lora_b @ module.lora_a) * module.scale
                    merged[id(base)] = (base, nn.Parameter(base + delta.to(base.dtype), requires_grad=False))
                module.base.weight = merged[id(base)][1]
                parent_name, _, leaf = name.rpartition(".")
                setattr(stack.get_submodule(parent_name), leaf, module.base)
