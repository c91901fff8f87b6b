"""The block-diffusion training objective (the public SFT recipe).

For each example (prompt, response):
- the encoder reads prompt + response clean and causally; its keys/values are the decoder's prefix;
- the response is cut into canvases of `canvas_length`; the last partial canvas is filled with EOS to its end;
  canvases past it are padding and ignored;
- one canvas is chosen uniformly; each of its tokens is replaced by a uniform random token with probability t,
  t ~ U(eps, 1) per example (the network is not told t); `t_power` p != 1 (dgemma's, not the recipe's) draws
  t = 1 - (1 - u)^p instead, u ~ U(eps, 1): p > 1 puts more canvases near pure noise, where generation starts
  (P(t > 0.9) = 0.1^(1/p));
- a first decoder pass without gradient gives logits; with probability `self_conditioning_prob` per example they
  become the second pass's self-conditioning input (zeros otherwise); the loss is taken on the second pass;
- `own_samples_prob` q > 0 (dgemma's, not the recipe's): with probability q per canvas, the second pass reads the
  canvas as the sampler's next step would: a share a ~ U(0, 1) of its corrupted positions, the lowest-entropy ones,
  hold tokens drawn from the first pass's logits at a temperature ~ U(0.1, 1) instead of uniform noise (the rest
  keep theirs). Uniform noise is easy to tell from text, the decoder's own wrong guesses are not; at generation
  time a step's accepted tokens are exactly those guesses, and the decoder trained on uniform noise alone takes
  them for text and builds on them;
- loss = diffusion_weight * cross-entropy over all positions of the chosen canvas (corrupted or not, EOS fill
  included, no 1/t weighting) + encoder_weight * the encoder's next-token cross-entropy on the clean sequence.

That is the recipe's rule, `canvases="one"`. `canvases="all"` trains every canvas of the response at once, each
corrupted with its own t ~ U(eps, 1) and its own self-conditioning coin, in one decoder pass whose block mask gives
each canvas exactly what it sees alone (the clean prefix before it, itself, no other canvas): the loss is the sum
of the single-canvas losses of those canvases, so one encoder pass teaches the decoder every canvas of the example
instead of one (about 4 to 7 times the decoder's targets per step on 256-token windows, for about 1.5 to 2 times
the compute).

Design choices: every rule above is a small function tested on its own (`canvas_layout`, `collate`, `corrupt`,
`draw_noise`); the noise is drawn per example from its own generator, so that how examples are grouped into
micro-batches or processes never changes them; `diffusion_loss` runs the model and returns sums, so that
micro-batches and processes add up to exact global means. The decoder sees, per row, exactly what it sees at
generation time: the prefix before its canvas (sliding layers: the last window - 1 positions) and the whole canvas,
at the same positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..cache import attention_masks
from ..config import FULL, SLIDING
from ..model import AttentionPlan, DiffusionGemma
from ..sampling import categorical_entropy


# (layer, keys, values) of the encoder pass -> None
KVHook = Callable[[int, torch.Tensor, torch.Tensor], None]

CANVAS_RULES = ("one", "all")  # train one canvas per example (the recipe), or every canvas of the response


@dataclass
class Batch:
    """Right-padded examples, each prompt + response laid out in whole canvases."""

    input_ids: torch.Tensor  # [B, S] prompt, then response canvases (last partial one EOS-filled), then padding
    valid: torch.Tensor  # [B, S] bool: real tokens (prompt and response canvases)
    prompt_lengths: torch.Tensor  # [B]
    num_canvases: torch.Tensor  # [B] response canvases (>= 1)
    encoder_targets: torch.Tensor  # [B, S] bool: positions whose token the encoder learns to predict


@dataclass
class Example:
    prompt: list[int]
    response: list[int]
    # Train the encoder's next-token loss on the prompt too (plain text), or on the response only (SFT).
    encoder_loss_on_prompt: bool = True
    # False: no encoder loss on this example at all (diffusion only: distillation samples, see distill.py).
    encoder_loss: bool = True


def canvas_layout(response: list[int], canvas_length: int, eos_id: int) -> list[int]:
    """The response cut into whole canvases: the last partial canvas is filled with EOS to its end."""
    if not response:
        raise ValueError("an example needs a non-empty response")
    fill = (-len(response)) % canvas_length
    return list(response) + [eos_id] * fill


def collate(examples: list[Example], canvas_length: int, eos_id: int, pad_id: int) -> Batch:
    rows, targets = [], []
    for ex in examples:
        if not ex.prompt:
            raise ValueError("an example needs a non-empty prompt (at least a BOS token)")
        laid_out = canvas_layout(ex.response, canvas_length, eos_id)
        rows.append(list(ex.prompt) + laid_out)
        # The encoder predicts every token of the response up to the end of the real response (its EOS, if it
        # has one); the EOS fill after that teaches nothing.
        start = 1 if ex.encoder_loss_on_prompt else len(ex.prompt)
        end = len(ex.prompt) + len(ex.response) if ex.encoder_loss else start
        targets.append((start, end))
    length = max(len(r) for r in rows)
    batch = len(rows)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    valid = torch.zeros(batch, length, dtype=torch.bool)
    encoder_targets = torch.zeros(batch, length, dtype=torch.bool)
    for i, (row, (start, end)) in enumerate(zip(rows, targets)):
        input_ids[i, :len(row)] = torch.tensor(row)
        valid[i, :len(row)] = True
        encoder_targets[i, start:end] = True
    prompt_lengths = torch.tensor([len(ex.prompt) for ex in examples])
    num_canvases = torch.tensor([(len(r) - len(ex.prompt)) // canvas_length for r, ex in zip(rows, examples)])
    return Batch(input_ids, valid, prompt_lengths, num_canvases, encoder_targets)


@dataclass
class OwnSamples:
    """Per canvas, whether and how the second pass reads the first pass's own samples (see the module docstring)."""

    use: torch.Tensor  # [B, K] bool
    temperature: torch.Tensor  # [B, K] the samples' temperature, U(0.1, 1)
    share: torch.Tensor  # [B, K] the share of the corrupted positions that take a sample, U(0, 1)
    uniforms: torch.Tensor  # [B, K, L] fp64: one uniform per position, for the draw (inverse CDF)


@dataclass
class Noise:
    """The objective's random choices for a batch, drawn per example (see `draw_noise`). K = 1 under the
    recipe's rule; under `canvases="all"` K is the most canvases of a row, and slots past a row's own are -1."""

    chosen: torch.Tensor  # [B, K] index of each trained response canvas (-1: an unused slot)
    noisy: torch.Tensor  # [B, K, L] those canvases, corrupted
    use_self_conditioning: torch.Tensor  # [B, K] bool
    t: torch.Tensor  # [B, K] corruption probability
    replaced: torch.Tensor  # [B, K, L] bool: the positions the corruption drew
    own: OwnSamples | None = None  # drawn only when own_samples_prob > 0


def corrupt(canvas: torch.Tensor, t: float, vocab_size: int, generator: torch.Generator | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each token by a uniform random one with probability t. Returns (noisy canvas, replaced mask).
    A replacement may draw the original token, as in the recipe."""
    replaced = torch.rand(canvas.shape, generator=generator) < t
    noise = torch.randint(0, vocab_size, canvas.shape, generator=generator)
    return torch.where(replaced, noise, canvas), replaced


def trained_canvases(example: Example, canvas_length: int, canvases: str = "one") -> int:
    """How many canvases of the example the objective trains on (each gives `canvas_length` loss positions)."""
    if canvases not in CANVAS_RULES:
        raise ValueError(f"canvases must be one of {CANVAS_RULES}, got {canvases!r}")
    return 1 if canvases == "one" else -(-len(example.response) // canvas_length)


def draw_noise(batch: Batch, canvas_length: int, vocab_size: int, generators: list[torch.Generator], eps: float,
               self_conditioning_prob: float, canvases: str = "one", t_power: float = 1.0,
               own_samples_prob: float = 0.0) -> Noise:
    """Per example, with its own generator. `canvases="one"`: a canvas uniformly among its canvases, t ~ U(eps, 1)
    (or 1 - (1 - t)^t_power), the corruption, and whether the first pass's logits feed the second pass.
    `canvases="all"`: for each canvas in order, its own t, corruption and coin. `own_samples_prob` > 0 also draws,
    after those, each canvas's `OwnSamples` (at 0 nothing more is drawn: the same noise as before it existed)."""
    if canvases not in CANVAS_RULES:
        raise ValueError(f"canvases must be one of {CANVAS_RULES}, got {canvases!r}")
    rows = []
    for row, gen in enumerate(generators):
        n = int(batch.num_canvases[row])
        if canvases == "one":
            ks = [min(int(torch.rand((), generator=gen) * n), n - 1)]
        else:
            ks = list(range(n))
        drawn = []
        for k in ks:
            start = int(batch.prompt_lengths[row]) + k * canvas_length
            t = eps + (1 - eps) * float(torch.rand((), generator=gen))
            if t_power != 1.0:
                t = 1 - (1 - t) ** t_power
            canvas, replaced = corrupt(batch.input_ids[row, start:start + canvas_length], t, vocab_size, gen)
            coin = bool(torch.rand((), generator=gen) < self_conditioning_prob)
            own = None
            if own_samples_prob > 0:
                own = (bool(torch.rand((), generator=gen) < own_samples_prob),
                       0.1 + 0.9 * float(torch.rand((), generator=gen)), float(torch.rand((), generator=gen)),
                       torch.rand(canvas_length, generator=gen, dtype=torch.float64))
            drawn.append((k, canvas, replaced, coin, t, own))
        rows.append(drawn)
    slots = max(len(r) for r in rows)
    chosen = torch.full((len(rows), slots), -1, dtype=torch.long)
    noisy = torch.zeros(len(rows), slots, canvas_length, dtype=torch.long)
    replaced_at = torch.zeros(len(rows), slots, canvas_length, dtype=torch.bool)
    use_sc = torch.zeros(len(rows), slots, dtype=torch.bool)
    ts = torch.zeros(len(rows), slots)
    own_samples = None
    if own_samples_prob > 0:
        own_samples = OwnSamples(use=torch.zeros(len(rows), slots, dtype=torch.bool),
                                 temperature=torch.ones(len(rows), slots), share=torch.zeros(len(rows), slots),
                                 uniforms=torch.zeros(len(rows), slots, canvas_length, dtype=torch.float64))
    for i, drawn in enumerate(rows):
        for j, (k, canvas, replaced, coin, t, own) in enumerate(drawn):
            chosen[i, j], noisy[i, j], replaced_at[i, j], use_sc[i, j], ts[i, j] = k, canvas, replaced, coin, t
            if own is not None:
                (own_samples.use[i, j], own_samples.temperature[i, j], own_samples.share[i, j],
                 own_samples.uniforms[i, j]) = own
    return Noise(chosen, noisy, use_sc, ts, replaced_at, own_samples)


def with_own_samples(noisy: torch.Tensor, logits: torch.Tensor, replaced: torch.Tensor, own: OwnSamples
                     ) -> torch.Tensor:
    """The canvases [B, K, L] the second pass reads under `own_samples_prob`: where `own.use`, the lowest-entropy
    share of each canvas's corrupted positions (round(share x their count)) take a token drawn from `logits`
    [B, K, L, V] at the canvas's temperature, by inverse CDF at `own.uniforms`; every other position is unchanged."""
    tempered = logits.float() / own.temperature.to(logits.device)[:, :, None, None]
    probs = torch.softmax(tempered, dim=-1)
    cumulative = probs.cumsum(dim=-1)
    targets = own.uniforms.to(logits.device)[..., None].to(cumulative.dtype) * cumulative[..., -1:]
    drawn = torch.searchsorted(cumulative, targets).squeeze(-1).clamp_max_(logits.shape[-1] - 1)
    entropy = categorical_entropy(tempered).masked_fill(~replaced, float("inf"))  # only corrupted positions take a sample
    rank = entropy.argsort(dim=-1).argsort(dim=-1)
    count = torch.round(own.share.to(logits.device) * replaced.sum(dim=-1))  # [B, K]
    take = (rank < count[..., None]) & own.use.to(logits.device)[..., None]
    return torch.where(take, drawn, noisy)


@dataclass
class LossSums:
    """Summed (not averaged) losses, so that micro-batches and processes combine into exact global means."""

    diffusion: torch.Tensor  # sum of cross-entropy over canvas tokens
    encoder: torch.Tensor  # sum of next-token cross-entropy over encoder targets
    canvas_tokens: int
    encoder_tokens: int


class _EncoderKV:
    """Keeps every layer's keys/values of the (gradient-carrying) encoder pass for the decoder to read."""

    def __init__(self, on_collect: KVHook | None = None):
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.on_collect = on_collect

    def collect(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.on_collect is not None:
            self.on_collect(layer, k, v)
        self.layers[layer] = (k, v)
        return k, v

    def prefix_then(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prefix_k, prefix_v = self.layers[layer]
        return torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)


def decoder_masks(config, positions: torch.Tensor, valid: torch.Tensor, starts: torch.Tensor, slot_ok: torch.Tensor,
                  canvas_length: int) -> dict[str, torch.Tensor]:
    """Boolean masks [B, 1, K*L, S + K*L] for K canvases decoded at once over the encoder's S keys.

    Canvas j (starting at starts[:, j]) sees the real prefix keys before its start (sliding layers: only the last
    window - 1 of them, as generation's cache keeps them) and its own L positions: what it sees decoded alone.
    An unused slot (slot_ok False) sees only itself."""
    rows, slots = starts.shape
    query_start = starts.repeat_interleave(canvas_length, dim=1)[:, None, :, None]  # [B, 1, K*L, 1]
    k = positions[:, None, None, :]  # [B, 1, 1, S]
    prefix = valid[:, None, None, :] & (k < query_start) & slot_ok.repeat_interleave(canvas_length, 1)[:, None, :, None]
    slot = torch.arange(slots, device=starts.device).repeat_interleave(canvas_length)
    own = (slot[:, None] == slot[None, :]).expand(rows, 1, -1, -1)
    full = torch.cat([prefix, own], dim=-1)
    sliding = torch.cat([prefix & (k > query_start - config.sliding_window), own], dim=-1)
    masks = {FULL: full, SLIDING: sliding}
    return {kind: m for kind, m in masks.items() if kind in config.layer_types}


def diffusion_loss(model: DiffusionGemma, batch: Batch, noise: Noise, on_encoder_kv: KVHook | None = None
                   ) -> LossSums:
    """Run the encoder and the two decoder passes; deterministic given the batch and its noise. `on_encoder_kv`
    sees each layer's encoder keys and values as they are made (sharded training hooks their backward). The
    noise's K canvases per row are decoded in one pass (see `decoder_masks`)."""
    config = model.config
    canvas_length, device = config.canvas_length, model.device
    ids, valid = batch.input_ids.to(device), batch.valid.to(device)
    rows, length = ids.shape
    positions = torch.arange(length, device=device).expand(rows, -1)

    kv = _EncoderKV(on_encoder_kv)
    encoder_plan = AttentionPlan(rope=model.rope(positions),
                                 masks=attention_masks(config, positions, positions, valid, encoder=True),
                                 join=kv.collect)
    encoder_hidden = model.encode(ids, encoder_plan)

    chosen = noise.chosen.to(device)  # [B, K]
    slot_ok = chosen >= 0
    starts = batch.prompt_lengths.to(device)[:, None] + chosen.clamp(min=0) * canvas_length  # [B, K]
    canvas_pos = (starts[:, :, None] + torch.arange(canvas_length, device=device)).reshape(rows, -1)  # [B, K*L]
    clean = torch.gather(ids, 1, canvas_pos)
    noisy = noise.noisy.to(device).reshape(rows, -1)
    # Each canvas sees the prefix before it (as generation's cache holds it) and itself.
    decoder_plan = AttentionPlan(rope=model.rope(canvas_pos),
                                 masks=decoder_masks(config, positions, valid, starts, slot_ok, canvas_length),
                                 join=kv.prefix_then)
    gate = noise.use_self_conditioning.to(device, model.dtype).repeat_interleave(canvas_length, dim=1)[:, :, None]

    with torch.no_grad():
        first_logits = model.logits(model.decode(noisy, decoder_plan))
        soft = model.soft_embeddings(first_logits) * gate
        if noise.own is not None:
            slots = noise.noisy.shape[1]
            noisy = with_own_samples(noisy.view(rows, slots, canvas_length),
                                     first_logits.view(rows, slots, canvas_length, -1),
                                     noise.replaced.to(device), noise.own).reshape(rows, -1)
    logits = model.logits(model.decode(noisy, decoder_plan, soft))
    trained = slot_ok.repeat_interleave(canvas_length, dim=1)  # [B, K*L]
    flat = trained.reshape(-1)
    diffusion = F.cross_entropy(logits.reshape(-1, logits.shape[-1])[flat], clean.reshape(-1)[flat], reduction="sum")

    targets = batch.encoder_targets.to(device)[:, 1:]
    encoder_logits = model.logits(encoder_hidden[:, :-1][targets])
    encoder = F.cross_entropy(encoder_logits, ids[:, 1:][targets], reduction="sum")
    return LossSums(diffusion=diffusion, encoder=encoder, canvas_tokens=int(trained.sum()),
                    encoder_tokens=int(targets.sum()))
