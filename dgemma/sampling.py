"""The sampler: from a denoising step's logits to the next canvas. Pure functions of tensors and a generator.

Two implementations of one step, chosen by `sampling=`:
- `reference_step` repeats the reference's operations and random draws one for one (fp32 [B, L, V] softmax,
  `torch.multinomial`, entropy through `torch.distributions.Categorical`), so that a seeded run is
  token-identical to transformers' `generate()`.
- `fast_step` never materialises fp32 [B, L, V]: it walks the canvas in row chunks, computing logits from the
  hidden states, soft-capping, temperature, log-sum-exp, entropy, argmax, an inverse-CDF sample (one uniform per
  position instead of one exponential per vocabulary entry) and the next step's self-conditioning embeddings
  in one pass per chunk. It samples the same distribution; the tests check that statistically.

The acceptance rule, the random draws and the stopping rule are shared: they only see [B, L] tensors (with
per-row settings as [B] tensors, so that rows of different requests are decided together).

Logits processors (`Controls`; dgemma's, the reference has none). The processed logits of a position are
    x = (softcap(l) + bias) / T,  then top_k, then top_p (tokens outside get probability 0),
with `bias` a per-row [V] vector (logit_bias plus the penalties, see engine.py) added to the soft-capped logits:
the logits the model outputs, as OpenAI and transformers' logits processors add theirs (added before the cap,
a bias of -100 would be squashed to -30 and ban nothing). Everything the step computes reads that processed
distribution: the sample, the argmax, the entropy (of the truncated distribution: acceptance and stopping see
what can be drawn) and the self-conditioning (the truncated distribution's expected embedding), just as the
reference's own processing (the temperature) reaches all of them.
- top_k keeps every token whose processed logit is at least the k-th largest (ties at the k-th value kept, as
  transformers' TopKLogitsWarper); top_p keeps the fewest most likely tokens whose probability (after top_k)
  reaches top_p, and every token tied with the least likely of them. The argmax is always kept.
- The fast path finds each position's threshold without sorting the vocabulary: the top M processed logits of
  the position (M = max(top_k + 1, 256)) hold the nucleus unless it is larger; only then is M raised (x16, up to the
  whole vocabulary). The weights are then computed with the threshold applied, in the same chunked pass as
  without controls. Rows without controls take the unchanged path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .compiling import compiling_allowed
from .widening import linear as widened_linear, mix, widens


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


def temperature_schedule(remaining: torch.Tensor, max_steps: torch.Tensor, t_min: torch.Tensor,
                         t_span: torch.Tensor) -> torch.Tensor:
    """`temperature_at` for many rows at once ([B] int32 steps, [B] fp32 t_min and t_max - t_min), bit for bit."""
    return t_min + t_span * (remaining / max_steps)


def categorical_entropy(logits: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Categorical(logits=logits).entropy()


def entropy_bound_acceptance(entropy: torch.Tensor, bound: float | torch.Tensor) -> torch.Tensor:
    """Accept the k lowest-entropy positions while sum(entropy) - max(entropy) <= bound (a number, or one per
    row [B, 1]). Returns bool [B, L]."""
    sorted_entropy, order = torch.sort(entropy, dim=-1)
    selected = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= bound
    return torch.scatter(torch.zeros_like(selected), dim=-1, index=order, src=selected)


def draw_tokens(rows: int, length: int, vocab_size: int, generator: torch.Generator | None,
                device: torch.device | str) -> torch.Tensor:
    """Uniform random tokens [rows, length]: a fresh canvas, or the renoising draw (one full draw per step, as the
    reference makes). Drawn where the generator lives (the model's device without one), then moved."""
    where = generator.device if generator is not None else device
    return torch.randint(0, vocab_size, (rows, length), device=where, generator=generator).to(device)


def truncate(processed: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """The processed logits [..., V] (fp32) with -inf outside the top_k / top_p set (see the module docstring):
    the definition, by sorting, that the fast path computes without sorting."""
    if top_k:
        kth = torch.topk(processed, min(top_k, processed.shape[-1]), dim=-1).values[..., -1:]
        processed = processed.masked_fill(processed < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        values = torch.sort(processed, dim=-1, descending=True).values
        cumulative = torch.softmax(values.double(), dim=-1).cumsum(dim=-1)
        # the first token at which the mass reaches top_p (the last one if rounding leaves the total below it)
        last = torch.searchsorted(cumulative, torch.full_like(cumulative[..., :1], top_p)).clamp_max_(
            values.shape[-1] - 1)
        processed = processed.masked_fill(processed < values.gather(-1, last), float("-inf"))
    return processed


def process_logits(logits: torch.Tensor, temperature: torch.Tensor | float | None, bias: torch.Tensor | None = None,
                   top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """The reference path's processed logits: (soft-capped logits [..., V] + bias [V] or [B, 1, V]) / T, then
    truncated. Without bias and truncation, exactly the reference's `logits / T`."""
    processed = logits + bias if bias is not None else logits
    processed = processed / temperature if temperature is not None else processed
    return truncate(processed, top_k, top_p)


def token_logprobs(processed: torch.Tensor, tokens: torch.Tensor, top: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under processed logits [N, V] (fp32, -inf outside a truncation) of `tokens` [N], and the
    `top` most likely tokens with theirs: (logprobs [N], top ids [N, top], top logprobs [N, top])."""
    logprobs = torch.log_softmax(processed.float(), dim=-1)
    chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    best = torch.topk(logprobs, min(top, logprobs.shape[-1]), dim=-1)
    return chosen, best.indices, best.values


def reference_step(logits: torch.Tensor, temperature: torch.Tensor | None, model_dtype: torch.dtype,
                   generator: torch.Generator | None, bias: torch.Tensor | None = None, top_k: int | None = None,
                   top_p: float | None = None) -> StepResult:
    """logits: fp32 [B, L, V] soft-capped decoder logits; bias: [B, V] fp32 or None; top_k, top_p: the group's.
    Without bias and truncation, the reference's own operations (`process_logits` is then `logits / T`)."""
    processed = process_logits(logits, temperature, None if bias is None else bias[:, None, :], top_k, top_p)
    batch, length, vocab = processed.shape
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    flat = probs.view(-1, vocab)
    if generator is not None and generator.device != flat.device:
        # A generator draws where it lives (a CPU generator for a CUDA model): the same numbers on any device.
        sampled = torch.multinomial(flat.to(generator.device), 1, generator=generator).to(flat.device)
    else:
        sampled = torch.multinomial(flat, num_samples=1, generator=generator)
    sampled = sampled.view(batch, length)
    return StepResult(sampled=sampled, argmax=torch.argmax(processed, dim=-1),
                      entropy=categorical_entropy(processed), self_conditioning=processed.to(model_dtype))


def draw_uniforms(rows: int, generator: torch.Generator | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """The fast step's randomness: one uniform per position, [rows, 1] fp64, drawn where the generator lives."""
    where = generator.device if generator is not None else device
    return torch.rand(rows, 1, dtype=torch.float64, device=where, generator=generator).to(device)


def processed(logits: torch.Tensor, inv_softcap: float | None, scale: torch.Tensor) -> torch.Tensor:
    """The fast sampler's processed logits, tanh(l / cap) * cap / T (or l / T), in fp32. tanh is written as
    1 - 2 / (exp(2u) + 1): within 2e-7 of torch.tanh (exact at saturation), and a third cheaper once compiled."""
    x = logits.float()
    if inv_softcap is None:
        return x * scale
    return (1 - 2 / (torch.exp(x * (2 * inv_softcap)) + 1)) * scale


# exp(-87) = 1.6e-38 is just above fp32's smallest normal number, 1.18e-38 = exp(-87.34).
NORMAL_EXP_FLOOR = -87.0


def normal_exp(shifted: torch.Tensor) -> torch.Tensor:
    """exp of processed logits minus their row maximum (<= 0), with every weight that would be subnormal (below
    1.2e-38 of the maximum's) set to 0. Such weights change no sum, draw or entropy in fp32, but arithmetic on
    subnormal numbers runs in microcode on x86 CPUs: at low temperatures, where a trained model's logits put much
    of the vocabulary there, the digest of 256 positions x 262k logits took 245 instead of 44 ms."""
    return torch.where(shifted >= NORMAL_EXP_FLOOR, torch.exp(shifted.clamp_min(NORMAL_EXP_FLOOR)), 0.0)


def block_maxima(logits: torch.Tensor, block: int) -> torch.Tensor:
    """The maximum of each block of `block` raw logits, [R, V / block]: one cheap pass over the model-dtype
    logits, from which the row maximum and argmax follow (the sampler's transforms are monotonic)."""
    return logits.view(logits.shape[0], -1, block).amax(dim=-1)


def digest_logits(logits: torch.Tensor, peak: torch.Tensor, inv_softcap: float | None, scale: torch.Tensor,
                  block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fusable pass over a chunk of raw logits [R, V] (V a multiple of `block`): the processed logits
    x = tanh(l / cap) * cap / T (or l / T) and their unnormalised probabilities w = exp(x - peak), returned in
    the logits' dtype (for the self-conditioning matmul), and per block of `block` entries the sums of w and of
    w * (x - peak), from which everything else the sampler needs follows. `scale` is [R, 1] (cap / T, or 1 / T
    without soft-capping), `peak` [R, 1] the row maximum of x."""
    rows, blocks = logits.shape[0], logits.shape[1] // block
    # Everything on one [R * V / block, block] view with per-block scale and peak: the form a compiler fuses into
    # a single loop nest (weights written once in the logits' dtype, block sums accumulated on the way).
    shifted = (processed(logits.view(rows * blocks, block), inv_softcap, scale.repeat_interleave(blocks, dim=0))
               - peak.repeat_interleave(blocks, dim=0))
    weights = normal_exp(shifted)
    return (weights.to(logits.dtype).view(rows, -1), weights.sum(dim=-1).view(rows, blocks),
            (weights * shifted).sum(dim=-1).view(rows, blocks))


_compiled: dict[str, Callable] = {}


def _kernel(name: str, function: Callable, large: bool) -> Callable:
    """The compiled, fused version of a sampler kernel for large vocabularies, the eager one otherwise."""
    if not large or not compiling_allowed():
        return function
    if name not in _compiled:
        _compiled[name] = torch.compile(function, dynamic=False, fullgraph=True)
    return _compiled[name]


class Workspace:
    """Buffers `fast_step` reuses from step to step: the logits and weights of a step, [rows, vocab] in the model
    dtype, are its largest tensors (128 MiB each at vocab 262k). Allocated afresh every step they are mapped
    anew, page fault by page fault; kept for a whole generation they are not. One per generation loop (not
    shared between threads)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, rows: int, columns: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A [rows, columns] tensor of uninitialised memory, the same storage on every call that fits in it."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < rows * columns or buffer.dtype != dtype or buffer.device != device:
            buffer = self._buffers[name] = torch.empty(rows * columns, dtype=dtype, device=device)
        return buffer[:rows * columns].view(rows, columns)


@dataclass
class Controls:
    """The fast step's logits processors, one setting per batch row (see the module docstring)."""

    bias: torch.Tensor | None  # [B, V] fp32 added to the soft-capped logits, or None (no row has one)
    top_k: torch.Tensor  # [B] int64; 0: off
    top_p: torch.Tensor  # [B] fp32; 1: off
    max_top_k: int = 0  # the largest top_k of the rows (host side: how many candidates to take)
    uses_top_p: bool = True  # whether any row has top_p < 1 (host side)

    @property
    def truncates(self) -> bool:
        return self.max_top_k > 0 or self.uses_top_p


CANDIDATES = 256  # processed logits per position taken first when looking for a top_p threshold


def truncation_threshold(x: torch.Tensor, peak: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                         max_top_k: int, uses_top_p: bool, block: int) -> torch.Tensor:
    """Per row of processed logits x [R, V] (fp32), the smallest processed logit that top_k and top_p keep,
    [R, 1] (-inf where neither truncates). Exact, without sorting the vocabulary: the threshold is found among
    the row's top M values, M raised only when the nucleus (or a tie at the k-th value) reaches past them."""
    rows, vocab = x.shape
    k = top_k.clamp(0, vocab)[:, None]
    active_p = (top_p < 1)[:, None]
    total = None
    if uses_top_p:  # the normaliser of rows without top_k; with it, the candidates hold the mass
        total = normal_exp(x - peak).view(rows, -1, block).sum(dim=-1).double().sum(dim=-1, keepdim=True)
    count = min(vocab, max(max_top_k + 1, CANDIDATES))  # one past the k-th: a tie there shows
    while True:
        values = torch.topk(x, count, dim=-1).values  # [R, M], descending
        kth = values.gather(1, (k.clamp(1, count) - 1))
        threshold = torch.where(k > 0, kth, float("-inf"))
        if not uses_top_p:
            return threshold
        weights = torch.exp((values - peak).double()) * (values >= threshold)
        mass = torch.where(k > 0, weights.sum(dim=-1, keepdim=True), total)
        cumulative = weights.cumsum(dim=-1)
        reached = cumulative >= top_p.double()[:, None] * mass
        found = reached.any(dim=-1, keepdim=True)
        nucleus = values.gather(1, reached.int().argmax(dim=-1, keepdim=True))
        # Ties at the k-th value past the candidates would be missing from the mass.
        incomplete = (k > 0) & (values[:, -1:] >= threshold)
        if count == vocab or not bool((active_p & (~found | incomplete)).any()):
            nucleus = torch.where(found, nucleus, threshold)  # rounding left the whole mass below top_p: keep all
            return torch.where(active_p, torch.maximum(threshold, nucleus), threshold)
        count = min(vocab, count * 16)


def controlled_digest(logits: torch.Tensor, inv_softcap: float | None, scale: torch.Tensor,
                      inv_temperature: torch.Tensor, bias: torch.Tensor | None, top_k: torch.Tensor,
                      top_p: torch.Tensor, controls: Controls, block: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                 torch.Tensor | None]:
    """`digest_logits` with logits processors, on a chunk of raw logits [R, V]: processed logits
    x = softcap(l) / T + bias / T (fp32, a chunk at a time), their maximum and argmax, the truncation threshold,
    and the weights exp(x - peak) (zero below the threshold) with their block sums. Returns (x, peak, argmax,
    weights in the logits' dtype, block sums of w, of w * (x - peak), threshold or None)."""
    rows = logits.shape[0]
    x = processed(logits, inv_softcap, scale)
    if bias is not None:
        x = x + bias * inv_temperature
    peak, argmax = x.max(dim=-1, keepdim=True)
    threshold = (truncation_threshold(x, peak, top_k, top_p, controls.max_top_k, controls.uses_top_p, block)
                 if controls.truncates else None)
    shifted = x - peak
    weights = normal_exp(shifted)
    if threshold is not None:
        weights = torch.where(x >= threshold, weights, 0.0)
    blocks = weights.view(rows, -1, block)
    return (x, peak, argmax.squeeze(1), weights.to(logits.dtype), blocks.sum(dim=-1),
            (blocks * shifted.view(rows, -1, block)).sum(dim=-1), threshold)


@torch.no_grad()  # a sampler: nothing to differentiate, and the out= matmul would refuse parameters needing grad
def fast_step(hidden: torch.Tensor, head: torch.Tensor, embedding: torch.Tensor, embed_scale: torch.Tensor,
              softcap: float | None, temperature: torch.Tensor | None, uniforms: torch.Tensor,
              workspace: Workspace | None = None, matmul_elements: int = 1 << 27, digest_elements: int = 1 << 22,
              block: int = 1024, controls: Controls | None = None) -> StepResult:
    """hidden: final-normed decoder states [B, L, H]; head: [V, H]; embedding: [V, H] (tied: the same tensor; either
    may be a `dgemma.quantized.GroupQuantized`, dequantised a tile of rows at a time);
    temperature: None, a scalar, or one per batch row [B]; uniforms: [B * L, 1] from `draw_uniforms`;
    workspace: buffers kept from the previous step (a fresh one when None); controls: logits processors per
    batch row (None: none, the unchanged path).

    The two vocabulary matmuls (logits, self-conditioning) run on up to `matmul_elements` logits at a time, in
    the model dtype, so the vocabulary matrix is read once per step. In between, `digest_elements` at a time are
    turned into weights (fewer, larger chunks measured faster than cache-sized ones: a 256-position step took 30.1
    against 31.7 ms at vocabulary 32k and 220 against 233 ms at 262k with 2^22 against 2^21; the results do not
    depend on the chunk sizes): the transforms are monotonic, so the argmax and maximum of the processed logits
    come from per-block maxima of the raw ones, and one pass gives the weights and their block sums (both compiled
    and fused for vocabularies of 16k and more; DGEMMA_COMPILE=0 disables it). The self-conditioning matmul is
    normalised afterwards, on [R, H] instead of [R, V]. No fp32 [B, L, V] tensor is ever built. With controls,
    each chunk's processed logits are built in fp32 (`digest_elements` at a time, eagerly) so that the bias and
    the truncation threshold can be applied; see `controlled_digest`.
    """
    batch, length, width = hidden.shape
    rows = hidden.reshape(-1, width)
    n, vocab = rows.shape[0], head.shape[0]
    sampled = torch.empty(n, dtype=torch.long, device=hidden.device)
    argmax = torch.empty_like(sampled)
    entropy = torch.empty(n, dtype=torch.float32, device=hidden.device)
    soft = torch.empty(n, width, dtype=embedding.dtype, device=hidden.device)
    inv_temperature = torch.ones(1, device=hidden.device) if temperature is None else 1.0 / temperature.float()
    # per position, fp32 as the reference's schedule: cap / T with soft-capping, 1 / T without
    scale = (inv_temperature.expand(batch).repeat_interleave(length)[:, None] * (softcap or 1.0)).to(hidden.device)
    inv_softcap = 1.0 / softcap if softcap else None
    block = block if vocab % block == 0 else vocab  # small or odd vocabularies: one block
    large = vocab >= 16_384
    maxima, digest = _kernel("maxima", block_maxima, large), _kernel("digest", digest_logits, large)
    outer, inner = max(1, matmul_elements // vocab), max(1, digest_elements // vocab)
    workspace = workspace or Workspace()
    weights = workspace.take("weights", min(outer, n), vocab, head.dtype, hidden.device)
    if controls is not None:
        row_of = torch.arange(batch, device=hidden.device).repeat_interleave(length)  # batch row of each position
        inv_t = inv_temperature.expand(batch).repeat_interleave(length)[:, None].to(hidden.device)
    for start in range(0, n, outer):
        end = min(start + outer, n)
        logits = workspace.take("logits", end - start, vocab, head.dtype, hidden.device)
        if widens(rows, head):  # no native half-precision matmuls here: in float32, a tile of the matrix at a time
            widened_linear(rows[start:end], head, out=logits)
        elif isinstance(head, torch.Tensor):
            torch.mm(rows[start:end], head.t(), out=logits)  # [R, V] in the model dtype
        else:  # a quantised vocabulary matrix, dequantised a tile of rows at a time
            head.linear(rows[start:end], out=logits)
        totals = torch.empty(end - start, 1, dtype=torch.float32, device=hidden.device)
        for first in range(0, end - start, inner):
            last = min(first + inner, end - start)
            span = slice(start + first, start + last)
            part, part_scale = logits[first:last], scale[span]
            if controls is not None:
                owners = row_of[span]
                bias = controls.bias.index_select(0, owners) if controls.bias is not None else None
                x, peak, argmax[span], part_weights, block_w, block_wx, threshold = controlled_digest(
                    part, inv_softcap, part_scale, inv_t[span], bias, controls.top_k[owners],
                    controls.top_p[owners], controls, block)
                weights[first:last] = part_weights
                total = block_w.sum(dim=-1, keepdim=True)
                totals[first:last] = total
                entropy[span] = (torch.log(total) - block_wx.sum(dim=-1, keepdim=True) / total).squeeze(1)
                sampled[span] = sample_from_blocks(x, block_w.double(), peak, None, torch.ones_like(peak),
                                                   uniforms[span], block, threshold)
                continue
            block_max = maxima(part, block)
            top_raw, top_block = block_max.max(dim=-1)
            within = part.view(last - first, -1, block)[torch.arange(last - first), top_block].argmax(dim=-1)
            argmax[span] = top_block * block + within
            peak = processed(top_raw[:, None], inv_softcap, part_scale)
            part_weights, block_w, block_wx = digest(part, peak, inv_softcap, part_scale, block)
            weights[first:last] = part_weights
            total = block_w.sum(dim=-1, keepdim=True)
            totals[first:last] = total
            # H = log Z - E_p[x - max]
            entropy[span] = (torch.log(total) - block_wx.sum(dim=-1, keepdim=True) / total).squeeze(1)
            sampled[span] = sample_from_blocks(part, block_w.double(), peak, inv_softcap, part_scale,
                                               uniforms[span], block)
        if widens(rows, embedding):
            mixed = mix(weights[:end - start], embedding)
        else:
            mixed = (weights[:end - start].to(embedding.dtype) @ embedding).float()
        soft[start:end] = (mixed / totals).to(embedding.dtype)
    return StepResult(sampled=sampled.view(batch, length), argmax=argmax.view(batch, length),
                      entropy=entropy.view(batch, length),
                      self_conditioning=(soft * embed_scale).view(batch, length, width))


def sample_from_blocks(logits: torch.Tensor, block_sums: torch.Tensor, peak: torch.Tensor, inv_softcap: float | None,
                       scale: torch.Tensor, uniforms: torch.Tensor, block: int,
                       threshold: torch.Tensor | None = None) -> torch.Tensor:
    """One draw per row by inverse CDF, in two levels summed in fp64: the block the uniform falls in (from the
    block sums of the weights), then the entry within it (its weights recomputed from the raw logits). A single
    fp32 cumulative sum over 262k entries would drift by about a percent. With a `threshold` [R, 1] (processed
    logits below it have weight 0), a uniform that rounding puts past the block's last weight takes the block's
    last kept entry, never one below the threshold."""
    block_cdf = torch.cumsum(block_sums, dim=-1)  # [R, nb]
    target = uniforms * block_cdf[:, -1:]
    chosen = torch.searchsorted(block_cdf, target, right=True).clamp_max_(block_cdf.shape[1] - 1)  # [R, 1]
    before = torch.where(chosen > 0, block_cdf.gather(1, (chosen - 1).clamp_min(0)), 0.0)
    columns = chosen * block + torch.arange(block, device=logits.device)  # [R, block]
    x = processed(logits.gather(1, columns), inv_softcap, scale)
    inner = normal_exp(x - peak)
    if threshold is not None:
        inner = torch.where(x >= threshold, inner, 0.0)
    inner_cdf = torch.cumsum(inner, dim=-1, dtype=torch.float64) + before
    offset = torch.searchsorted(inner_cdf, target, right=True).clamp_max_(block - 1)
    if threshold is not None:  # past the end by rounding: the first entry where the block's mass is complete
        end = torch.searchsorted(inner_cdf, inner_cdf[:, -1:].contiguous(), right=False)
        offset = torch.where(target >= inner_cdf[:, -1:], end, offset)
    return (chosen * block + offset).squeeze(1)


def stable_and_confident(argmax: torch.Tensor, previous: torch.Tensor, run: torch.Tensor, stability: torch.Tensor,
                         confidence: torch.Tensor, entropy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive stopping, per row: the argmax canvas [B, L] equals the previous `stability` ones and the mean
    entropy is below `confidence` ([B] each). `run` [B] counts the steps in a row with the same argmax up to the
    previous one (0 at a canvas start, where `previous` holds no token); returns (stop [B], the updated run).
    The reference keeps the last `stability` canvases and compares all of them; counting is the same rule."""
    run = torch.where((argmax == previous).all(dim=-1), run + 1, 1)
    return (run > stability) & (entropy.mean(dim=-1) < confidence), run
