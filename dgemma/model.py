"""The DiffusionGemma text network: one layer stack run two ways.

- `encode` runs the stack causally over new tokens (the prompt, then each committed canvas) and hands every
  layer's keys and values to a KV store, which appends them.
- `decode` runs the same weights over a canvas that attends bidirectionally to the cached prefix and to itself;
  it reads the store and never commits to it. It adds the self-conditioning block on its input.

Design choices:
- Module names follow the checkpoint (`layers.N.self_attn.q_proj`, ...), so loading is one key mapping.
- Attention does not know about caches or masks: an `AttentionPlan` built once per forward (or once per canvas,
  for all its denoising steps) carries the RoPE tables, the boolean masks per layer kind and the function that
  joins new keys/values with the stored prefix. Inference and training differ only in that plan.
- The encoder and decoder each keep their own `layer_scalar` per layer (the checkpoint stores both); with
  `tie_word_embeddings=False` the encoder also gets its own copy of the stack, as in the reference.
- Numerics follow the reference operation by operation (fp32 norms, RoPE tables cast to the activation dtype,
  fp32 router softmax, experts accumulated in expert order), so that fp32 logits agree to 1e-5 and bf16 ones
  to bf16 rounding. `exact=False` lets a forward pick kernels that are faster on its device but equal only up
  to float rounding (on a CPU the experts' padded batched matmul, or for large experts one matmul per expert and a
  compiled weighted sum; for a single token, `dgemma.one_row`'s compiled products and a float32 attention; a
  layer's norms, RoPE, router and experts' sum in one pass each, `dgemma.fused_ops`; for a token, the layer's
  same operations in one C++ object, `dgemma.token_layer`); sampling="fast" and autoregressive decoding run that way.
- This module is the network alone: generation, checkpoints and training build on it, never the reverse.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .compiling import compiled_under_own_name, compiling_allowed
from .config import LayerSpec, ModelConfig
from .fused_ops import rms_norm as fused_rms_norm, rms_norm_rope as fused_rms_norm_rope, route as fused_route
from .fused_ops import takes as fused_ops_take, weighted_sum as fused_weighted_sum
from .one_query_attention import one_query as kernel_one_query, takes as kernel_attention_takes
from .one_row import expert_products, row_product, rows_block_product, takes_experts, takes_row, takes_rows_block
from .token_layer import for_token as token_layer_for, forget as forget_token_layers
from .widening import bmm as widened_bmm, linear as widened_linear, widens

# (layer index, new keys, new values) -> (all visible keys, all visible values), each [B, H_kv, S, D]
KVJoin = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def activation_kind(name: str) -> str:
    """The activation a config names, as "gelu_tanh", "gelu", "silu" or "relu" (the names
    dgemma/kernels/token_layer.cpp knows)."""
    return {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu", "silu": "silu"}.get(name, "relu")


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "silu": F.silu, "relu": F.relu}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return _ACTIVATIONS[activation_kind(name)]


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, exact: bool = True,
             residual: torch.Tensor | None = None, multiplier: torch.Tensor | None = None) -> torch.Tensor:
    """(residual + x * (mean(x^2) + eps)^-1/2 * weight) * multiplier over the last dimension, the norm computed in
    fp32 as the reference does and each step rounded to x's dtype; residual and multiplier are optional. With
    exact=False on a CPU, one pass in `dgemma.fused_ops`, rounded once.

    On a CPU, torch's own `rms_norm` gives bit-identical results (tests/test_model.py) in one call from Python
    instead of eight: 12 against 16 us for a canvas of the bundled model (fp32 [32, 256]), 83 against 101 us for
    bf16 [256, 512] (best of 3 x 50; within 6 % from 0.5 M to 3 M elements, except bf16 at 2.9 M, 13 % slower)."""
    if not exact and fused_ops_take(x, weight, residual):
        return fused_rms_norm(x, weight, eps, residual, multiplier)
    if x.device.type == "cpu" and (weight is None or weight.dtype == x.dtype):
        out = F.rms_norm(x, (x.shape[-1],), weight, eps)
    else:
        out = rms_norm_as_reference(x, weight, eps)
    if residual is not None:
        out = residual + out
    return out if multiplier is None else out * multiplier


def rms_norm_as_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The reference's own sequence of operations (elsewhere than on a CPU, and the definition tests compare to)."""
    h = x.float()
    h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        h = h * weight  # a bf16 weight is widened inside the multiply: no fp32 copy, the same values
    return h.type_as(x)


class RMSNorm(nn.Module):
    """RMS norm in fp32 with a learned scale (see `rms_norm`)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, exact: bool = True, residual: torch.Tensor | None = None,
                multiplier: torch.Tensor | None = None) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, exact, residual, multiplier)

    def rotated(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, exact: bool = True) -> torch.Tensor:
        """Each head of x [B, T, H, D] normed, then its rotary embedding (cos, sin [B, 1, T, D]): [B, H, T, D]."""
        if not exact and fused_ops_take(x, self.weight, cos, sin):
            return fused_rms_norm_rope(x, self.weight, cos, sin, self.eps).transpose(1, 2)
        h = self(x).transpose(1, 2)
        return h * cos + rotate_half(h) * sin


def rms_norm_without_scale(x: torch.Tensor, eps: float, exact: bool = True) -> torch.Tensor:
    """The reference's scale-free RMS norm (v-norm, router input, self-conditioning output)."""
    return rms_norm(x, None, eps, exact)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, 1, T, D] for integer positions [B, T], computed in fp32 and cast like the reference."""
    freqs = positions[..., None].float() * inv_freq.to(device=positions.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


@dataclass
class RowAttention:
    """One row of a batch attending on its own, to exactly the keys (and with exactly the mask) it would have
    alone: rows whose prefixes differ in length see different key windows, and one batched call over a common
    window would round differently."""

    batch_index: int  # the row in the forward's batch
    store_row: int  # its row in what `join` returns
    queries: int  # its real queries (those past them are padding, left zero)
    windows: dict[str, slice]  # layer kind -> the key positions it sees
    masks: dict[str, torch.Tensor | None]  # layer kind -> bool [1, 1, queries, keys] or None for all


@dataclass
class AttentionPlan:
    """Everything attention needs besides the activations, built before the layer loop."""

    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer kind -> (cos, sin)
    masks: dict[str, torch.Tensor | None]  # layer kind -> bool [B, 1, T, S] (True = attend) or None for all
    join: KVJoin
    rows: list[RowAttention] | None = None  # set: one attention call per row, over the keys `join` returns


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, exact: bool = True) -> torch.Tensor:
    """x @ weight.T (+ bias): F.linear (a quantised weight answers it itself), or with exact=False, for a single row
    and a large bf16 or fp16 matrix on a CPU, the compiled one-row product (`dgemma.one_row`), and for more rows on a
    CPU without native half-precision matmuls, the product widened to float32 (`dgemma.widening`)."""
    if not exact and takes_row(x, weight):
        out = row_product(x, weight)
        return out if bias is None else out + bias
    if not exact and widens(x, weight):
        return widened_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose forward takes `exact` (see `linear`)."""

    def forward(self, x: torch.Tensor, exact: bool = True) -> torch.Tensor:
        return linear(x, self.weight, self.bias, exact)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
           exact: bool = True) -> torch.Tensor:
    """Attention of q [B, H, T, D] to keys and values [B, H_kv, S, D] under a boolean mask [B, 1, T, S] (None: all
    visible), scale 1: SDPA, or with exact=False on a CPU, `attend_one_query` for one query a row (a token) and
    `attend_with_matmuls` for more in bf16 or fp16 (a canvas, a prompt), or where the CPU has no native
    half-precision matmuls (`dgemma.widening`), float32's attention rounded once to q's dtype."""
    if not exact and q.device.type == "cpu":
        if q.shape[-2] == 1:
            return attend_one_query(q, keys, values, mask)
        if q.dtype in (torch.bfloat16, torch.float16):
            if widens(q, keys):
                return attend(q.float(), keys.float(), values.float(), mask, exact).to(q.dtype)
            return attend_with_matmuls(q, keys, values, mask)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=1.0,
                                          enable_gqa=keys.shape[1] != q.shape[1])


# The most float32 scores `attend_with_matmuls` holds at once (16 MiB; SDPA holds none): a canvas's (16 heads x 256
# queries x 512 keys of the released model, 2^21) in one go, a long prompt's a chunk of queries at a time.
SCORE_VALUES = 1 << 22


def attend_with_matmuls(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        mask: torch.Tensor | None) -> torch.Tensor:
    """`attend` as transformers' eager attention computes it in q's dtype: scores rounded to it by their matmul,
    softmax in float32, probabilities rounded to it, with the query heads that share a key head folded into one
    matrix (two matmuls per key head). CPU SDPA's fused kernel ran a canvas's 256 queries over 512 keys at 0.18
    TFLOP/s on a 2-core AMD EPYC (Zen 5), bf16: 11.8 / 23.5 ms for the released model's sliding / full layer against
    3.3 / 5.5 ms here. The rounded scores cost precision: 0.0064 against SDPA's 0.0013 from a float64 evaluation
    there; the bundled model's next-canvas distributions in bf16 differ from fp32's by a KL of 1.8e-4 / 3.1e-4 nats
    (first step / half noised) through the fast path, this attention included, and 0.7e-4 / 1.7e-4 through the
    reference's kernels, where int4 weights cost 1.5e-3 (scripts/quantization_quality.py, docs/performance.md)."""
    batch, heads, queries, dim = q.shape
    kv_heads = keys.shape[1]
    groups = heads // kv_heads  # the query heads sharing a key head
    chunk = max(1, SCORE_VALUES // (batch * heads * keys.shape[-2]))
    if queries > chunk:  # a long prompt: a chunk of queries at a time
        out = torch.empty_like(q)
        for first in range(0, queries, chunk):
            part = slice(first, first + chunk)
            rows = None if mask is None else mask[:, :, part]
            out[:, :, part] = attend_with_matmuls(q[:, :, part], keys, values, rows)
        return out
    folded = q.reshape(batch, kv_heads, groups * queries, dim)
    # [B, H_kv, H / H_kv * T, S], softmaxed in float32 at least
    scores = (folded @ keys.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32))
    if mask is not None:  # [B, 1, T, S], the same for every head
        scores = scores.view(batch, kv_heads, groups, queries, -1).masked_fill(~mask[:, :, None], float("-inf"))
        scores = scores.view(batch, kv_heads, groups * queries, -1)
    out = (scores.softmax(dim=-1).to(q.dtype) @ values).view(batch, heads, queries, dim)
    # A query that sees no key (a left pad's) gets zeros, as from SDPA, not the NaN of a softmax over -inf alone.
    return out if mask is None else torch.where(mask.any(dim=-1, keepdim=True), out, 0.0)


def attend_one_query(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """`attend` for one query a row, in float32: two batched matmuls and a softmax, rounded once to q's dtype. CPU
    SDPA's fused kernel has a fixed cost that dominates a single query: on a 2-core AMD EPYC, bf16, 16 heads of 256
    over 8 key heads, 0.20 / 1.08 / 6.9 ms for 70 / 320 / 2,000 keys against 0.06 / 0.15 / 1.1 ms here; and it
    rounds within (up to 4e-3 from a float64 evaluation there, where this is the float64 result rounded). In bf16 on
    a CPU with AVX-512 BF16, or with AVX2, it runs in dgemma's kernel (`dgemma.one_query_attention`), which reads the
    cache once instead of widening it to float32 copies first."""
    if kernel_attention_takes(q, keys, values):
        return kernel_one_query(q, keys, values, mask)
    batch, heads, _, dim = q.shape
    kv_heads = keys.shape[1]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, dim).float()  # the query heads sharing a key head
    scores = grouped @ keys.float().transpose(-1, -2)  # [B, H_kv, H / H_kv, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # [B, 1, 1, S] over every head
    return (scores.softmax(dim=-1) @ values.float()).reshape(batch, heads, 1, dim).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        self.eps = config.rms_norm_eps
        heads, kv_heads, dim, bias = config.num_attention_heads, spec.num_kv_heads, spec.head_dim, config.attention_bias
        self.q_proj = Linear(config.hidden_size, heads * dim, bias=bias)
        self.k_proj = Linear(config.hidden_size, kv_heads * dim, bias=bias)
        self.v_proj = Linear(config.hidden_size, kv_heads * dim, bias=bias) if spec.has_v_proj else None
        self.o_proj = Linear(heads * dim, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, layer: int, plan: AttentionPlan, exact: bool = True) -> torch.Tensor:
        batch, length, _ = x.shape
        dim = self.spec.head_dim
        cos, sin = plan.rope[self.spec.kind]
        q = self.q_norm.rotated(self.q_proj(x, exact).view(batch, length, -1, dim), cos, sin, exact)
        raw_k = self.k_proj(x, exact).view(batch, length, -1, dim)
        # Layers without v_proj use the raw key projection as values (before k-norm and RoPE).
        v = self.v_proj(x, exact).view(batch, length, -1, dim) if self.v_proj is not None else raw_k
        k = self.k_norm.rotated(raw_k, cos, sin, exact)
        v = rms_norm_without_scale(v, self.eps, exact).transpose(1, 2)
        keys, values = plan.join(layer, k, v)
        kind = self.spec.kind
        if plan.rows is None:
            out = attend(q, keys, values, plan.masks[kind], exact)
        else:
            out = torch.zeros_like(q)
            for row in plan.rows:
                b, r, n, window = row.batch_index, row.store_row, row.queries, row.windows[kind]
                out[b:b + 1, :, :n] = attend(q[b:b + 1, :, :n], keys[r:r + 1, :, window], values[r:r + 1, :, window],
                                             row.masks[kind], exact)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1), exact)


class MLP(nn.Module):
    """The gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)
        self.activation_kind = activation_kind(act)
        self.act = activation(act)

    def forward(self, x: torch.Tensor, exact: bool = True) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x, exact)) * self.up_proj(x, exact), exact)


class Router(nn.Module):
    """Top-k expert choice from the raw residual: scale-free norm, learned scale, softmax, renormalised top-k."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.top_k = config.top_k_experts
        self.root_size = config.hidden_size**-0.5
        self.proj = Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(config.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))

    def forward(self, x: torch.Tensor, exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        if exact:  # the reference's roundings: the norm, then each scale
            h = rms_norm_without_scale(x, self.eps) * self.scale * self.root_size
        else:
            h = rms_norm(x, self.scale, self.eps, exact) * self.root_size
        logits = self.proj(h)
        if not exact and fused_ops_take(logits, self.per_expert_scale):
            return fused_route(logits, self.top_k, self.per_expert_scale)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, index = torch.topk(probs, k=self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[index], index  # [N, K] fp32, [N, K]


# Experts whose gate/up matrix holds at least this many values run a step's rows on a CPU (exact=False) one matmul
# per expert (bf16; quantised experts always do), without padding every expert to the fullest one's rows, and their
# choices' weighted sum compiled. On a 2-core AMD EPYC (Zen 5), bf16, 256 tokens: the released model's experts (128
# of 1,408 x 2,816, top-8) 92 against 109 ms a layer with the padded batched matmul; the bench's small config (16 of
# 512 x 512, top-2) 1.9 against 1.5 ms, the padded batch ahead there (and not worth a compile).
LARGE_EXPERT = 1 << 20


class Experts(nn.Module):
    """All experts' weights as packed 3-D tensors, as the checkpoint stores them, run as grouped matmuls."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        e, h, m = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * m, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, m))
        self.act = activation(config.hidden_activation)

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, exact: bool = True) -> torch.Tensor:
        tokens, top_k = index.shape
        if not exact and tokens == 1 and self._read_by_index(x, top_k):
            # One token (autoregressive decoding): its top_k experts' matrices read in place, one kernel call each
            # for gate/up and down, instead of a grouped matmul that visits every expert or, for weights in a
            # kernel's layout, a sort of the token's choices into groups by expert.
            gate, up = self._by_index(x.expand(top_k, -1), self.gate_up_proj, index[0]).chunk(2, dim=-1)
            out = self._by_index(self.act(gate) * up, self.down_proj, index[0])  # (token, choice) order
            return self._combined(out, weights, x.dtype, exact)
        expert_of, order = torch.sort(index.reshape(-1))  # (token, choice) pairs grouped by expert
        position = torch.empty_like(order)  # the inverse: where each (token, choice) pair went
        position[order] = torch.arange(order.numel(), device=order.device)
        rows = x[order // top_k]
        counts = torch.bincount(expert_of, minlength=self.num_experts)
        stored_as_tensors = isinstance(self.gate_up_proj, torch.Tensor) and isinstance(self.down_proj, torch.Tensor)
        on_cpu_fast = not exact and x.device.type == "cpu" and tokens > 1
        large = self.large
        if on_cpu_fast and stored_as_tensors and not large:
            # Each expert's rows in a [E, capacity, H] batch: two batched matmuls instead of 2E small ones, faster
            # than grouped_mm on a CPU for small experts. (Reading the capacity back is free there; elsewhere
            # grouped_mm needs none. One token would have every expert's matrix read for it: it takes the grouped
            # path.) Quantised experts are dequantised one at a time instead (grouped_linear), never all at once.
            slot = torch.arange(expert_of.numel(), device=x.device) - (torch.cumsum(counts, 0) - counts)[expert_of]
            batch = x.new_zeros(self.num_experts, int(counts.max()), x.shape[-1])
            batch[expert_of, slot] = rows
            gate, up = batched_products(batch, self.gate_up_proj).chunk(2, dim=-1)
            out = batched_products(self.act(gate) * up, self.down_proj)
            return self._combined(out[index.reshape(-1), slot[position]], weights, x.dtype, exact)
        ends = torch.cumsum(counts, dim=0).to(torch.int32)
        # Large experts on a CPU: one matmul per expert, no padding to the fullest expert's rows.
        per_expert = on_cpu_fast and stored_as_tensors
        gate, up = grouped_linear(rows, self.gate_up_proj, ends, per_expert=per_expert).chunk(2, dim=-1)
        out = grouped_linear(self.act(gate) * up, self.down_proj, ends, per_expert=per_expert)
        if on_cpu_fast and large and compiling_allowed() and not torch.is_grad_enabled():
            # Gathered back into (token, choice) order inside the compiled sum: no [tokens x k, hidden] copies.
            return _gathered_combination_kernel()(out, position, weights)
        return self._combined(out[position], weights, x.dtype, exact)  # back in (token, choice) order

    def _read_by_index(self, x: torch.Tensor, top_k: int) -> bool:
        """Whether one token's experts can be read in place by their indices: large bf16 or fp16 matrices on a CPU
        (`dgemma.one_row.takes_experts`), or weights in a kernel's layout that multiply rows by index
        (`reads_by_index`, `dgemma.quantized.CpuInt4`)."""
        weights = (self.gate_up_proj, self.down_proj)
        return takes_experts(x, self.gate_up_proj, top_k) or all(getattr(w, "reads_by_index", False) for w in weights)

    @staticmethod
    def _by_index(rows: torch.Tensor, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """rows [R, K] @ weight[index[r]].T for each row r -> [R, N]."""
        if isinstance(weight, torch.Tensor):
            return expert_products(rows, weight, index)
        return weight.linear_by_index(rows, index)

    @property
    def large(self) -> bool:
        """Whether an expert's gate/up matrix holds LARGE_EXPERT values or more (the CPU's per-expert path)."""
        return math.prod(self.gate_up_proj.shape[-2:]) >= LARGE_EXPERT

    @staticmethod
    def _combined(out: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype, exact: bool = True) -> torch.Tensor:
        """Each token's k expert outputs (rows of `out` in (token, choice) order) weighted in fp32, summed in fp32 and
        rounded once, as the reference's grouped path does (with exact=False on a CPU, in one pass:
        `dgemma.fused_ops`)."""
        if not exact and out.dtype == dtype and weights.dtype == torch.float32 and fused_ops_take(out):
            return fused_weighted_sum(out, weights)
        tokens, top_k = weights.shape
        return (out.view(tokens, top_k, -1) * weights[..., None]).sum(dim=1).to(dtype)


def _gathered_combination(out: torch.Tensor, position: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`Experts._combined` of the rows of `out` (in expert order) taken in (token, choice) order by `position`
    [tokens * k]: the same fp32 products added in the same order, written choice by choice so that Inductor
    vectorises along the hidden size (the sum over a k-axis it vectorised along k, 16 lanes for 8 values)."""
    tokens, top_k = weights.shape
    chosen = position.view(tokens, top_k)
    total = out[chosen[:, 0]].float() * weights[:, :1]
    for choice in range(1, top_k):
        total = total + out[chosen[:, choice]].float() * weights[:, choice:choice + 1]
    return total.to(out.dtype)


@functools.cache
def _gathered_combination_kernel() -> Callable:
    """`_gathered_combination` compiled (at first use; every size dynamic): the gathers, the fp32 weighting and the
    sum in one pass. Eager, `_combined` of a released layer's step (256 tokens x 8 choices x 2,816) wrote a 23 MB
    fp32 product and summed it: 14 ms on a 2-core AMD EPYC (Zen 5), against 0.2 ms compiled."""
    return compiled_under_own_name(_gathered_combination, "experts_gathered_combination", dynamic=True,
                                   fullgraph=True)


def batched_products(batch: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """batch [E, C, K] @ weights[E, N, K].T -> [E, C, N] (the small experts' padded batch off the reference path):
    torch.bmm, or widened to float32 where the CPU has no native half-precision matmuls (`dgemma.widening`)."""
    if widens(batch, weights):
        return widened_bmm(batch, weights)
    return torch.bmm(batch, weights.transpose(-2, -1))


def grouped_linear(rows: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor,
                   per_expert: bool = False) -> torch.Tensor:
    """rows [S, in] grouped by expert (group e ends at ends[e]) times weight[e].T, [E, out, in] -> [S, out]. A
    quantised weight (`dgemma.quantized.GroupQuantized`) is dequantised one expert at a time; one in a CPU kernel's
    layout (`CpuInt4`, `dgemma.onednn.ReorderedExperts`) runs its experts through its own `grouped_linear` when no
    gradient is recorded.
    `per_expert`: a float weight takes one matmul per expert instead of grouped_mm (on a CPU, faster for large
    experts: see `LARGE_EXPERT`), widened to float32 where the CPU has no native half-precision matmuls, or for a few
    rows there in dgemma's AVX2 kernel (`dgemma.one_row.takes_rows_block`)."""
    if isinstance(weight, torch.Tensor) and not per_expert:
        weight_t = weight.transpose(-2, -1)
        # grouped_mm (what the reference runs) needs every non-unit stride to be a multiple of 16 bytes.
        strides = (*rows.stride(), *weight_t.stride())
        aligned = all(stride == 1 or stride * rows.element_size() % 16 == 0 for stride in strides)
        if aligned and rows.dtype == weight.dtype:
            return F.grouped_mm(rows, weight_t, offs=ends)
    elif hasattr(weight, "grouped_linear") and not (rows.requires_grad and torch.is_grad_enabled()):
        return weight.grouped_linear(rows, ends.tolist())
    # Odd sizes, quantised weights and `per_expert` take one matmul per expert.
    def product(group: torch.Tensor, expert: int) -> torch.Tensor:
        matrix = weight[expert]
        if per_expert and takes_rows_block(group, matrix):
            return rows_block_product(group, matrix)
        return widened_linear(group, matrix) if per_expert and widens(group, matrix) else F.linear(group, matrix)
    return each_expert(rows, ends.tolist(), weight.shape[1], product)


def each_expert(rows: torch.Tensor, ends: list[int], width: int,
                product: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """rows [S, K] grouped by expert (group e ends at ends[e]) -> [S, width]: each non-empty group's rows through
    product(group, e), one call per expert."""
    out = rows.new_empty(rows.shape[0], width)
    begin = 0
    for expert, end in enumerate(ends):
        if end > begin:
            out[begin:end] = product(rows[begin:end], expert)
        begin = end
    return out


class Block(nn.Module):
    def __init__(self, config: ModelConfig, spec: LayerSpec):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, spec)
        self.mlp = MLP(h, config.intermediate_size, config.hidden_activation)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.has_experts = config.has_experts
        if self.has_experts:
            self.router = Router(config)
            self.experts = Experts(config)
            self.post_feedforward_layernorm_1 = RMSNorm(h, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(h, eps)
            self.pre_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, x: torch.Tensor, layer: int, plan: AttentionPlan, exact: bool = True) -> torch.Tensor:
        if not exact and plan.rows is None and (token_layer := token_layer_for(self, x)) is not None:
            # One token: the same operations in one C++ object (dgemma.token_layer), the attention between its calls.
            kind = self.self_attn.spec.kind
            q, k, v = token_layer.attention_inputs(x, *plan.rope[kind])
            keys, values = plan.join(layer, k, v)
            return token_layer.finish(x, attend(q, keys, values, plan.masks[kind], exact))
        attended = self.self_attn(self.input_layernorm(x, exact), layer, plan, exact)
        residual = self.post_attention_layernorm(attended, exact, residual=x)
        h = self.mlp(self.pre_feedforward_layernorm(residual, exact), exact)
        if self.has_experts:
            # The router reads the raw residual; the experts read a separately normed copy.
            flat = residual.reshape(-1, residual.shape[-1])
            weights, index = self.router(flat, exact)
            moe = self.experts(self.pre_feedforward_layernorm_2(flat, exact), index, weights, exact)
            h = self.post_feedforward_layernorm_2(moe.reshape(residual.shape), exact,
                                                  residual=self.post_feedforward_layernorm_1(h, exact))
        return self.post_feedforward_layernorm(h, exact, residual=residual, multiplier=self.layer_scalar)


class ScaledEmbedding(nn.Embedding):
    """Token embeddings times sqrt(hidden), the scale rounded to the weight dtype as in the reference."""

    def __init__(self, vocab: int, hidden: int, padding_idx: int | None):
        super().__init__(vocab, hidden, padding_idx=padding_idx)
        self.scale = hidden**0.5

    def scale_as(self, dtype: torch.dtype) -> torch.Tensor:
        # fp32 -> weight dtype -> dtype: the roundings the reference's fp32 buffer goes through.
        return torch.tensor(self.scale, dtype=torch.float32).to(self.weight.dtype).to(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.scale_as(self.weight.dtype)


class SelfConditioning(nn.Module):
    """Adds an MLP of the previous step's soft embeddings to the canvas embeddings, then a scale-free norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h = config.hidden_size
        self.eps = config.rms_norm_eps
        self.pre_norm = RMSNorm(h, config.rms_norm_eps)
        self.gate_proj = Linear(h, config.intermediate_size, bias=False)
        self.up_proj = Linear(h, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, h, bias=False)
        self.act = activation(config.hidden_activation)

    def forward(self, embeds: torch.Tensor, soft_embeddings: torch.Tensor | None) -> torch.Tensor:
        if soft_embeddings is not None:
            h = self.pre_norm(soft_embeddings)
            embeds = embeds + self.down_proj(self.act(self.gate_proj(h)) * self.up_proj(h))
        # With no signal the MLP's output is exactly zero (no biases, act(0) = 0), so it is skipped.
        return rms_norm_without_scale(embeds, self.eps)


class Stack(nn.Module):
    """Embeddings, layers and final norm; the decoder's stack also holds the self-conditioning block."""

    def __init__(self, config: ModelConfig, self_conditioning: bool):
        super().__init__()
        self.embed_tokens = ScaledEmbedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([Block(config, spec) for spec in config.layers])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_conditioning = SelfConditioning(config) if self_conditioning else None

    def run(self, x: torch.Tensor, plan: AttentionPlan, exact: bool = True) -> torch.Tensor:
        for i, block in enumerate(self.layers):
            x = block(x, i, plan, exact)
        return self.norm(x, exact)


def attach(model: nn.Module, name: str, weight: object) -> None:
    """Put `weight` (a weight held in a kernel's own form: quantised, or in oneDNN's layout) where the parameter
    `name` (a module path) was: the network's calls on it then reach it."""
    owner_path, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_path)
    owner._parameters.pop(attr, None)  # a Parameter slot refuses anything but a Parameter
    setattr(owner, attr, weight)


def attached_weights(model: nn.Module, kinds: tuple[type, ...]) -> Iterator[tuple[str, object]]:
    """(module path, weight) of every attached weight of one of `kinds`, each once (an encoder tied to the decoder
    shares its objects: the first path found, the decoder's, names it)."""
    seen: set[int] = set()
    modules = sorted(model.named_modules(), key=lambda item: not item[0].startswith("decoder"))
    for path, module in modules:
        for attr, value in vars(module).items():
            if isinstance(value, kinds) and id(value) not in seen:
                seen.add(id(value))
                yield f"{path}.{attr}" if path else attr, value


class DiffusionGemma(nn.Module):
    """Encoder and decoder stacks named as in the checkpoint (`model.encoder.language_model.*`, `model.decoder.*`).

    With `tie_word_embeddings` (the released model) the encoder's parameters are the decoder's, except what the
    reference leaves untied: attention biases and the per-layer scalars (buffers). The head is the embedding.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not config.encoder_is_causal:
            # transformers 5.23 cannot run such a config either (its attention gets `is_causal` twice), so there
            # is no reference to be exact to; refuse rather than guess.
            raise ValueError("use_bidirectional_attention='all' (a bidirectional encoder) is not supported: the "
                             "encoder must be causal to build the KV cache the decoder reads")
        self.config = config
        self.encoder = Stack(config, self_conditioning=False)
        self.decoder = Stack(config, self_conditioning=True)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size,
                                                                     bias=False)
        self.tie_weights()
        self.rope_kinds = sorted(set(config.layer_types))
        self.reset_rope()

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)build the RoPE inverse frequencies, exact fp32, on `device` (default: where they are now, the CPU
        for a model built on the meta device)."""
        for kind in self.rope_kinds:
            current = getattr(self, f"inv_freq_{kind}", None)
            if device is None:
                device = "cpu" if current is None or current.is_meta else current.device
            self.register_buffer(f"inv_freq_{kind}", self.config.rope_inv_freq(kind).to(device), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        # Weights held in oneDNN's layout (`dgemma.onednn.ReorderedExperts`, a CPU bf16 form) are parameters again
        # before a move or a cast, which then applies to them as to the rest.
        self._restore_parameters()
        forget_token_layers(self.modules())
        # `model.to(device)` moves the RoPE buffers; a cast (`.to(torch.bfloat16)`) must not round them, so they
        # are rebuilt in fp32 where they landed. (Casting the reference's module does round its tables.)
        super()._apply(fn, recurse)
        if any(getattr(self, f"inv_freq_{kind}").dtype != torch.float32 for kind in self.rope_kinds):
            self.reset_rope()
        return self

    def _restore_parameters(self) -> None:
        """Every attached weight that gives its tensor back (`dense()`) made a parameter again where it was held (one
        parameter for the decoder's weight and the encoder's tied one)."""
        restored: dict[int, nn.Parameter] = {}
        for module in self.modules():
            for attr, value in list(vars(module).items()):
                if not isinstance(value, torch.Tensor) and callable(getattr(value, "dense", None)):
                    if id(value) not in restored:
                        restored[id(value)] = nn.Parameter(value.dense())
                    delattr(module, attr)
                    module.register_parameter(attr, restored[id(value)])

    def tied_parameter_names(self) -> list[str]:
        """Encoder parameters that are the decoder's (same name under `encoder.`), as the reference ties them."""
        if not self.config.tie_word_embeddings:
            return []
        return [name for name, _ in self.encoder.named_parameters(remove_duplicate=False)
                if not name.endswith(".bias")]

    def tie_weights(self) -> None:
        """Make the tied encoder parameters the decoder's objects (again, e.g. after loading by assignment)."""
        for name in self.tied_parameter_names():
            owner_path, _, attr = name.rpartition(".")
            setattr(self.encoder.get_submodule(owner_path), attr,
                    self.decoder.get_submodule(owner_path).get_parameter(attr))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Fresh weights as the reference initialises them: N(0, initializer_range) for matrices, embeddings (the
        padding row zero) and experts, ones for norm weights, router scales and layer scalars, zeros for biases."""
        std = self.config.initializer_range
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=generator)
        for name, buffer in self.named_buffers():
            if name.endswith("layer_scalar"):
                buffer.fill_(1.0)
        for stack in (self.encoder, self.decoder):
            if stack.embed_tokens.padding_idx is not None:
                stack.embed_tokens.weight[stack.embed_tokens.padding_idx].zero_()

    # ---- helpers ------------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def embedding_matrix(self) -> torch.Tensor:
        return self.decoder.embed_tokens.weight

    @property
    def head_matrix(self) -> torch.Tensor:
        return self.lm_head.weight if self.lm_head is not None else self.decoder.embed_tokens.weight

    def rope(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """RoPE tables for each layer kind at the given positions [B, T]."""
        return {kind: rope_tables(getattr(self, f"inv_freq_{kind}"), positions, self.dtype) for kind in self.rope_kinds}

    def soft_embeddings(self, logits: torch.Tensor) -> torch.Tensor:
        """Self-conditioning input from previous logits: softmax(logits) @ E * sqrt(hidden), as the reference."""
        embed = self.decoder.embed_tokens
        probs = logits.softmax(dim=-1, dtype=torch.float32).to(embed.weight.dtype)
        return (probs @ embed.weight) * embed.scale_as(embed.weight.dtype)

    def logits(self, hidden: torch.Tensor, exact: bool = True) -> torch.Tensor:
        """fp32 soft-capped logits from final hidden states (`exact`: as for a forward)."""
        logits = linear(hidden, self.head_matrix, exact=exact).float()
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ---- the two passes -----------------------------------------------------------------------------------

    def encode(self, input_ids: torch.Tensor, plan: AttentionPlan, exact: bool = True) -> torch.Tensor:
        """Run the encoder over new tokens [B, T]; the plan's join stores their keys/values. Returns normed hidden."""
        return self.encoder.run(self.encoder.embed_tokens(input_ids), plan, exact)

    def decode(self, canvas_ids: torch.Tensor, plan: AttentionPlan, soft_embeddings: torch.Tensor | None = None,
               exact: bool = True) -> torch.Tensor:
        """Run the decoder over a canvas [B, L] with the previous step's soft embeddings (None on the first step)."""
        x = self.decoder.self_conditioning(self.decoder.embed_tokens(canvas_ids), soft_embeddings)
        return self.decoder.run(x, plan, exact)
