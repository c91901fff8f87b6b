"""The KV cache and the attention masks of the encoder and the decoder.

Design choices:
- One preallocated key and value buffer per layer, [B, H_kv, capacity, D]; slot i holds sequence column i of
  every row (left padding included, as in the reference, where a padded row's tokens keep their column as
  position). `valid` marks which committed slots are real tokens.
- The encoder writes the new tokens' keys/values at [length, length + T) and `commit` makes them part of the
  prefix. The decoder writes the canvas's keys/values into the same scratch slots just past the prefix, so that
  prefix and canvas are one contiguous view (no concatenation per step), and never commits them.
- Masks are pure functions of query and key positions, computed once per encoder call and once per canvas.
  Sliding layers see, in both passes, only the keys the reference's sliding cache keeps: the last `window - 1`
  positions before the current chunk; the decoder's canvas attends to those and to the whole canvas.
"""

from __future__ import annotations

import torch

from .config import FULL, SLIDING, ModelConfig
from .model import AttentionPlan


def attention_masks(config: ModelConfig, query_pos: torch.Tensor, key_pos: torch.Tensor, key_ok: torch.Tensor,
                    encoder: bool) -> dict[str, torch.Tensor | None]:
    """Boolean masks [B, 1, T, S] per layer kind (None when every query sees every key).

    query_pos [B, T]: positions of the new tokens (a contiguous chunk starting at query_pos[:, 0]).
    key_pos [B, S]: positions of the visible keys; key_ok [B, S]: keys that are real tokens.
    """
    window = config.sliding_window
    q = query_pos[:, None, :, None]
    k = key_pos[:, None, None, :]
    ok = key_ok[:, None, None, :]
    chunk_start = query_pos[:, :1, None, None]
    # Keys the reference's sliding cache still holds: the last window - 1 before the chunk, and the chunk.
    retained = k > chunk_start - window
    if encoder:
        causal = k <= q
        full = ok & causal
        sliding = ok & causal & (k > q - window)
    else:
        full = ok
        sliding = ok & retained
    if encoder:
        # A padding query may see no key at all; let it see itself so its (unused) output stays finite.
        itself = k == q
        full, sliding = full | itself, sliding | itself
    masks = {FULL: full, SLIDING: sliding}
    return {kind: None if bool(m.all()) else m for kind, m in masks.items() if kind in config.layer_types}


class KVCache:
    """Keys and values of every committed token, plus scratch room for one canvas."""

    def __init__(self, config: ModelConfig, batch_size: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 capacity: int = 0):
        self.config = config
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.length = 0
        self.capacity = 0
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=self.device)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for spec in config.layers:
            shape = (batch_size, spec.num_kv_heads, 0, spec.head_dim)
            self.keys.append(torch.zeros(shape, dtype=dtype, device=self.device))
            self.values.append(torch.zeros(shape, dtype=dtype, device=self.device))
        self.reserve(capacity)

    def get_seq_length(self) -> int:
        return self.length

    @classmethod
    def over(cls, config: ModelConfig, keys: list[torch.Tensor], values: list[torch.Tensor], valid: torch.Tensor,
             length: int) -> "KVCache":
        """A cache over existing storage (e.g. one row of a `SlotCache`); it cannot grow."""
        cache = cls.__new__(cls)
        cache.config, cache.batch_size, cache.dtype = config, valid.shape[0], keys[0].dtype
        cache.device, cache.length, cache.capacity = keys[0].device, length, keys[0].shape[2]
        cache.keys, cache.values, cache.valid = keys, values, valid
        cache.growable = False
        return cache

    def reserve(self, capacity: int) -> None:
        """Grow the buffers to hold `capacity` slots (committed tokens plus scratch)."""
        if capacity <= self.capacity:
            return
        if not getattr(self, "growable", True):
            raise ValueError(f"the sequence needs {capacity} positions but its cache holds {self.capacity}")
        capacity = max(capacity, 2 * self.capacity)  # amortise repeated growth in multi-turn use
        for layer in range(len(self.keys)):
            for store in (self.keys, self.values):
                old = store[layer]
                new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
                new[:, :, :self.length] = old[:, :, :self.length]
                store[layer] = new
        valid = self.valid.new_zeros(self.batch_size, capacity)
        valid[:, :self.length] = self.valid[:, :self.length]
        self.valid = valid
        self.capacity = capacity

    def _key_start(self, kind: str) -> int:
        # Sliding layers never look further back than window - 1 positions before the chunk.
        return max(0, self.length - self.config.sliding_window + 1) if kind == SLIDING else 0

    def plan(self, rope: dict[str, tuple[torch.Tensor, torch.Tensor]], new_valid: torch.Tensor,
             encoder: bool, fast_kernels: bool = False) -> AttentionPlan:
        """Attention plan for T new tokens written at [length, length + T); `new_valid` [B, T]."""
        new_len = new_valid.shape[1]
        end = self.length + new_len
        self.reserve(end)
        device = self.device
        query_pos = torch.arange(self.length, end, device=device).expand(self.batch_size, -1)
        masks: dict[str, torch.Tensor | None] = {}
        for kind in set(self.config.layer_types):
            start = self._key_start(kind)
            key_pos = torch.arange(start, end, device=device).expand(self.batch_size, -1)
            key_ok = torch.cat([self.valid[:, start:self.length], new_valid.to(device)], dim=1)
            masks[kind] = attention_masks(self.config, query_pos, key_pos, key_ok, encoder)[kind]
        starts = [self._key_start(spec.kind) for spec in self.config.layers]
        write_at = self.length

        def join(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = self.keys[layer], self.values[layer]
            keys[:, :, write_at:end] = k
            values[:, :, write_at:end] = v
            return keys[:, :, starts[layer]:end], values[:, :, starts[layer]:end]

        return AttentionPlan(rope=rope, masks=masks, join=join, fast_kernels=fast_kernels)

    def commit(self, new_valid: torch.Tensor) -> None:
        """Make the tokens the last encoder plan wrote part of the prefix."""
        end = self.length + new_valid.shape[1]
        self.valid[:, self.length:end] = new_valid.to(self.device)
        self.length = end


class SlotCache:
    """A KV cache of `rows` independent sequences of different lengths, for batching decoder steps across them.

    Active sequences occupy rows 0 .. active - 1 (a freed row is filled by moving the last one into it), so a
    batched decoder step reads one contiguous slice. Each row is encoded through a single-row `KVCache` view of
    the same storage; canvases are written into each row's own scratch slots.
    """

    def __init__(self, config: ModelConfig, rows: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.config, self.rows, self.capacity = config, rows, capacity
        self.device = torch.device(device)
        self.keys = [torch.zeros(rows, s.num_kv_heads, capacity, s.head_dim, dtype=dtype, device=self.device)
                     for s in config.layers]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.valid = torch.zeros(rows, capacity, dtype=torch.bool, device=self.device)
        self.lengths = [0] * rows

    def row(self, index: int) -> KVCache:
        """A single-row view; `commit` on it must be followed by `sync(index, view)`."""
        return KVCache.over(self.config, [k[index:index + 1] for k in self.keys],
                            [v[index:index + 1] for v in self.values], self.valid[index:index + 1],
                            self.lengths[index])

    def sync(self, index: int, view: KVCache) -> None:
        self.lengths[index] = view.length

    def clear(self, index: int) -> None:
        self.lengths[index] = 0
        self.valid[index] = False

    def move(self, source: int, target: int) -> None:
        """Copy a row's sequence into another row (to keep active rows contiguous)."""
        length = self.lengths[source]
        for store in (self.keys, self.values):
            for buffer in store:
                buffer[target, :, :length] = buffer[source, :, :length]
        self.valid[target] = self.valid[source]
        self.lengths[target] = length
        self.clear(source)

    def decoder_plan(self, rope: dict[str, tuple[torch.Tensor, torch.Tensor]], active: int,
                     canvas_length: int, fast_kernels: bool = False) -> AttentionPlan:
        """Plan for one canvas per row 0 .. active - 1, each written just past its own prefix."""
        lengths = torch.tensor(self.lengths[:active], device=self.device)
        end = int(lengths.max()) + canvas_length
        if end > self.capacity:
            raise ValueError(f"a sequence needs {end} positions but the cache holds {self.capacity}")
        window = self.config.sliding_window
        offsets = torch.arange(canvas_length, device=self.device)
        query_pos = lengths[:, None] + offsets
        masks: dict[str, torch.Tensor | None] = {}
        starts: dict[str, int] = {}
        for kind in set(self.config.layer_types):
            start = max(0, int(lengths.min()) - window + 1) if kind == SLIDING else 0
            slots = torch.arange(start, end, device=self.device)
            in_prefix = slots[None] < lengths[:, None]
            in_canvas = (slots[None] >= lengths[:, None]) & (slots[None] < lengths[:, None] + canvas_length)
            key_ok = (self.valid[:active, start:end] & in_prefix) | in_canvas
            masks[kind] = attention_masks(self.config, query_pos, slots.expand(active, -1), key_ok, encoder=False)[kind]
            starts[kind] = start
        layer_starts = [starts[spec.kind] for spec in self.config.layers]
        rows = torch.arange(active, device=self.device)[:, None]
        write_slots = query_pos  # [R, L]

        def join(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = self.keys[layer], self.values[layer]
            # [R, H, L, D] -> the rows' own scratch slots, indexed as [R, L, H, D]
            keys[rows, :, write_slots] = k.transpose(1, 2)
            values[rows, :, write_slots] = v.transpose(1, 2)
            return keys[:active, :, layer_starts[layer]:end], values[:active, :, layer_starts[layer]:end]

        return AttentionPlan(rope=rope, masks=masks, join=join, fast_kernels=fast_kernels)
