"""The sampler: from a denoising step's logits to the next canvas. Pure functions of tensors and a generator.

Two implementations of one step, chosen by `sampling=`:
- `reference_step` repeats the reference's operations and random draws one for one (fp32 [B, L, V] softmax,
  `torch.multinomial`, entropy through `torch.distributions.Categorical`), so that a seeded run is
  token-identical to transformers' `generate()`.
- `fast_step` never materialises fp32 [B, L, V]: it walks the canvas in row chunks, computing logits from the
  hidden states, soft-capping, temperature, log-sum-exp, entropy, argmax, an inverse-CDF sample (one uniform per
  position instead of one exponential per vocabulary entry) and the next step's self-conditioning embeddings
  in one pass per chunk. It samples the same distribution; the tests check that statistically.

The acceptance rule, renoising and stopping rule are shared: they only see [B, L] tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class StepResult:
    sampled: torch.Tensor  # [B, L] a token drawn at every position
    argmax: torch.Tensor  # [B, L] the most likely token at every position
    entropy: torch.Tensor  # [B, L] fp32 entropy of the tempered distribution
    # What the next step's self-conditioning needs: tempered logits in the model dtype (reference), or the soft
    # embeddings they produce, [B, L, H] (fast).
    self_conditioning: torch.Tensor


def temperature_at(step: int, max_steps: int, t_min: float, t_max: float) -> torch.Tensor:
    """Linear schedule over *remaining* steps (max_steps .. 1), computed as the reference does: fp32, int32 step."""
    remaining = torch.tensor(step, dtype=torch.int32)
    return t_min + (t_max - t_min) * (remaining / max_steps)


def categorical_entropy(logits: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Categorical(logits=logits).entropy()


def entropy_bound_acceptance(entropy: torch.Tensor, bound: float | torch.Tensor) -> torch.Tensor:
    """Accept the k lowest-entropy positions while sum(entropy) - max(entropy) <= bound (a number, or one per
    row [B, 1]). Returns bool [B, L]."""
    sorted_entropy, order = torch.sort(entropy, dim=-1)
    selected = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= bound
    return torch.scatter(torch.zeros_like(selected), dim=-1, index=order, src=selected)


def renoise(canvas: torch.Tensor, accepted: torch.Tensor, vocab_size: int,
            generator: torch.Generator | None) -> torch.Tensor:
    """Every position not accepted gets a fresh uniform random token. One full [B, L] draw, as the reference."""
    noise = torch.randint(0, vocab_size, canvas.shape, device=canvas.device, generator=generator)
    return torch.where(accepted, canvas, noise)


def reference_step(logits: torch.Tensor, temperature: torch.Tensor | None, model_dtype: torch.dtype,
                   generator: torch.Generator | None) -> StepResult:
    """logits: fp32 [B, L, V] soft-capped decoder logits."""
    processed = logits / temperature if temperature is not None else logits
    batch, length, vocab = processed.shape
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    sampled = torch.multinomial(probs.view(-1, vocab), num_samples=1, generator=generator).view(batch, length)
    return StepResult(sampled=sampled, argmax=torch.argmax(processed, dim=-1),
                      entropy=categorical_entropy(processed), self_conditioning=processed.to(model_dtype))


def draw_uniforms(rows: int, generator: torch.Generator | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """The fast step's randomness: one uniform per position, [rows, 1] fp64."""
    return torch.rand(rows, 1, dtype=torch.float64, device=device, generator=generator)


def fast_step(hidden: torch.Tensor, head: torch.Tensor, embedding: torch.Tensor, embed_scale: torch.Tensor,
              softcap: float | None, temperature: torch.Tensor | None, uniforms: torch.Tensor,
              chunk_elements: int = 1 << 24) -> StepResult:
    """hidden: final-normed decoder states [B, L, H]; head: [V, H]; embedding: [V, H] (tied: the same tensor);
    temperature: None, a scalar, or one per batch row [B]; uniforms: [B * L, 1] from `draw_uniforms`.

    Rows are processed `chunk_elements // V` at a time, so the largest temporary is about `chunk_elements` fp32.
    """
    batch, length, width = hidden.shape
    rows = hidden.reshape(-1, width)
    n, vocab = rows.shape[0], head.shape[0]
    chunk = max(1, min(n, chunk_elements // vocab))
    sampled = torch.empty(n, dtype=torch.long, device=hidden.device)
    argmax = torch.empty_like(sampled)
    entropy = torch.empty(n, dtype=torch.float32, device=hidden.device)
    soft = torch.empty(n, width, dtype=embedding.dtype, device=hidden.device)
    inv_temperature = None
    if temperature is not None:  # per position, float32 as the reference's schedule
        inv_temperature = (1.0 / temperature.float()).expand(batch).repeat_interleave(length)[:, None]
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        logits = F.linear(rows[start:end], head).float()  # [R, V]
        if softcap:
            logits.div_(softcap).tanh_().mul_(softcap)
        if inv_temperature is not None:
            logits.mul_(inv_temperature[start:end])
        peak, argmax[start:end] = logits.max(dim=-1)
        logits.sub_(peak[:, None])  # shifted: the largest is 0, so exp cannot overflow
        weights = torch.exp(logits)  # unnormalised probabilities
        total = weights.sum(dim=-1)
        # H = log Z - E_p[shifted logits]
        entropy[start:end] = torch.log(total) - torch.linalg.vecdot(weights, logits) / total
        soft[start:end] = (weights / total[:, None]).to(embedding.dtype) @ embedding
        sampled[start:end] = inverse_cdf_sample(weights, uniforms[start:end])
    return StepResult(sampled=sampled.view(batch, length), argmax=argmax.view(batch, length),
                      entropy=entropy.view(batch, length),
                      self_conditioning=(soft * embed_scale).view(batch, length, width))


def inverse_cdf_sample(weights: torch.Tensor, uniforms: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """One draw per row from unnormalised weights [R, V] given uniforms [R, 1] in [0, 1).

    Two levels, both summed in fp64: find the block of `block` entries the uniform falls in, then the entry in
    it. A single fp32 cumulative sum over 262k entries would drift by about a percent; fp64 over all of them
    would double the pass's memory traffic.
    """
    rows, vocab = weights.shape
    pad = (-vocab) % block
    blocks = F.pad(weights, (0, pad)).view(rows, -1, block)
    block_cdf = torch.cumsum(blocks.sum(dim=-1, dtype=torch.float64), dim=-1)  # [R, nb]
    target = uniforms * block_cdf[:, -1:]
    chosen = torch.searchsorted(block_cdf, target, right=True).clamp_max_(block_cdf.shape[1] - 1)  # [R, 1]
    before = torch.where(chosen > 0, block_cdf.gather(1, (chosen - 1).clamp_min(0)), 0.0)
    inner = blocks[torch.arange(rows, device=weights.device), chosen.squeeze(1)]  # [R, block]
    inner_cdf = torch.cumsum(inner, dim=-1, dtype=torch.float64) + before
    offset = torch.searchsorted(inner_cdf, target, right=True).clamp_max_(block - 1)
    return (chosen * block + offset).squeeze(1).clamp_max_(vocab - 1)


class StableAndConfident:
    """Adaptive stopping: the argmax canvas equals the last `stability_threshold` ones and the mean entropy is
    below `confidence_threshold`. Stateful per canvas; `reset` between canvases."""

    def __init__(self, stability_threshold: int, confidence_threshold: float):
        self.stability_threshold = stability_threshold
        self.confidence_threshold = confidence_threshold
        self.history: torch.Tensor | None = None

    def reset(self) -> None:
        self.history = None

    def __call__(self, argmax: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        if self.stability_threshold == 0:
            stable = torch.ones(argmax.shape[0], dtype=torch.bool, device=argmax.device)
        else:
            if self.history is None:
                self.history = torch.full((self.stability_threshold, *argmax.shape), -1, dtype=argmax.dtype,
                                          device=argmax.device)
            stable = (self.history == argmax[None]).all(dim=-1).all(dim=0)
            self.history = torch.roll(self.history, shifts=-1, dims=0)
            self.history[-1] = argmax
        return stable & (entropy.mean(dim=-1) < self.confidence_threshold)
