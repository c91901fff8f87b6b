"""The KV cache and the attention masks of the encoder and the decoder.

Design choices:
- One preallocated key and value buffer per layer, [rows, H_kv, capacity, D]; slot i of a row holds that row's
  position i (left padding included, as in the reference, where a padded row's tokens keep their column as
  position). `valid` marks which committed slots are real tokens.
- Each row has its own committed length, kept on the host (the caller decides every length, so reading one
  never waits for the device). The library's batch is rows of one length; the server's rows are independent
  sequences of different lengths. One class serves both; the equal-length case takes plain slices.
- The encoder writes new tokens' keys/values at [length, length + n) of each row and `commit` makes them part
  of the prefix. Rows may bring different numbers of new tokens (batched prefill): the shorter ones are padded,
  and a padding query writes nothing.
- Rows of one length attend in one call; rows of different lengths attend one by one, each to exactly the key
  window and mask it would have alone (`RowAttention`), so that a row's results do not depend on which other
  rows share its batch (a common window would be longer and round differently).
- The decoder writes the canvas's keys/values into each row's scratch slots just past its prefix, so that
  prefix and canvas are one contiguous view (no concatenation per step), and never commits them.
- Masks are pure functions of query and key positions, computed once per encoder call and once per canvas.
  Sliding layers see, in both passes, only the keys the reference's sliding cache keeps: the last `window - 1`
  positions before the current chunk; the decoder's canvas attends to those and to the whole canvas.
"""

from __future__ import annotations

from typing import Callable

import torch

from .config import FULL, SLIDING, ModelConfig
from .model import AttentionPlan, RowAttention

RopeTables = dict[str, tuple[torch.Tensor, torch.Tensor]]
Rope = Callable[[torch.Tensor], RopeTables]  # positions [B, T] -> tables per layer kind (the model's `rope`)


def attention_masks(config: ModelConfig, query_pos: torch.Tensor, key_pos: torch.Tensor, key_ok: torch.Tensor,
                    encoder: bool) -> dict[str, torch.Tensor | None]:
    """Boolean masks [B, 1, T, S] per layer kind (None when every query sees every key).

    query_pos [B, T]: positions of the new tokens (a chunk starting at query_pos[:, 0]).
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
        # A padding query may see no key at all; let it see itself so its (unused) output stays finite.
        itself = k == q
        full, sliding = full | itself, sliding | itself
    else:
        full = ok
        sliding = ok & retained
    masks = {FULL: full, SLIDING: sliding}
    return {kind: None if bool(m.all()) else m for kind, m in masks.items() if kind in config.layer_types}


def _as_range(rows: list[int]) -> slice | None:
    """`rows` as a slice when they are consecutive and ascending (then their storage is a view)."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return None


class KVCache:
    """Keys and values of every committed token of `batch_size` rows, plus scratch room for one canvas per row."""

    def __init__(self, config: ModelConfig, batch_size: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 capacity: int = 0, growable: bool = True):
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.growable = True  # while the buffers are first allocated
        self.lengths = [0] * batch_size
        self.capacity = 0
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=self.device)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for spec in config.layers:
            shape = (batch_size, spec.num_kv_heads, 0, spec.head_dim)
            self.keys.append(torch.zeros(shape, dtype=dtype, device=self.device))
            self.values.append(torch.zeros(shape, dtype=dtype, device=self.device))
        self.reserve(capacity)
        self.growable = growable

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def length(self) -> int:
        """The committed length of a cache whose rows are all equally long (a library batch)."""
        if len(set(self.lengths)) > 1:
            raise ValueError(f"the cache's rows have different lengths {self.lengths}")
        return self.lengths[0] if self.lengths else 0

    def get_seq_length(self) -> int:
        return self.length

    def reserve(self, capacity: int) -> None:
        """Grow the buffers to hold `capacity` slots per row (committed tokens plus scratch)."""
        if capacity <= self.capacity:
            return
        if not self.growable:
            raise ValueError(f"the sequence needs {capacity} positions but its cache holds {self.capacity}")
        capacity = max(capacity, 2 * self.capacity)  # amortise repeated growth in multi-turn use
        used = max(self.lengths, default=0)
        for store in (self.keys, self.values):
            for layer, old in enumerate(store):
                new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
                new[:, :, :used] = old[:, :, :used]
                store[layer] = new
        valid = self.valid.new_zeros(self.batch_size, capacity)
        valid[:, :used] = self.valid[:, :used]
        self.valid = valid
        self.capacity = capacity

    def _key_start(self, kind: str, lengths: list[int]) -> int:
        # Sliding layers never look further back than window - 1 positions before the chunk.
        return max(0, min(lengths) - self.config.sliding_window + 1) if kind == SLIDING else 0

    def _column(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, device=self.device)[:, None]

    def _masks(self, valid: torch.Tensor, length: int, new_valid: torch.Tensor, encoder: bool
               ) -> tuple[dict[str, torch.Tensor | None], dict[str, int]]:
        """Masks and first key slot per layer kind for rows that all have `length` committed slots (validity
        `valid` [R, >= length]) and bring new_valid.shape[1] new tokens each."""
        device, width = self.device, new_valid.shape[1]
        query_pos = torch.arange(length, length + width, device=device).expand(new_valid.shape[0], -1)
        masks: dict[str, torch.Tensor | None] = {}
        starts: dict[str, int] = {}
        for kind in sorted(set(self.config.layer_types)):
            start = starts[kind] = self._key_start(kind, [length])
            key_pos = torch.arange(start, length + width, device=device).expand(new_valid.shape[0], -1)
            key_ok = torch.cat([valid[:, start:length], new_valid], dim=1)
            masks[kind] = attention_masks(self.config, query_pos, key_pos, key_ok, encoder)[kind]
        return masks, starts

    def _row_attention(self, rows: list[int], counts: list[int], new_valid: torch.Tensor,
                       encoder: bool) -> list[RowAttention]:
        """Rows of different lengths attend one by one, each exactly as it would alone."""
        plans = []
        for i, (row, count) in enumerate(zip(rows, counts)):
            length = self.lengths[row]
            masks, starts = self._masks(self.valid[row:row + 1], length, new_valid[i:i + 1, :count], encoder)
            windows = {kind: slice(start, length + count) for kind, start in starts.items()}
            plans.append(RowAttention(i, row, count, windows, masks))
        return plans

    # ---- the encoder ------------------------------------------------------------------------------------------

    def encoder_plan(self, rope: Rope, new_valid: torch.Tensor, rows: list[int] | None = None,
                     counts: list[int] | None = None) -> AttentionPlan:
        """Plan for new tokens written at [length, length + count) of each of `rows` (default: all rows, each
        bringing all T tokens). new_valid [R, T]: which new tokens are real (False for left padding and for the
        padding past a row's `count`)."""
        rows = list(range(self.batch_size)) if rows is None else rows
        width = new_valid.shape[1]
        counts = [width] * len(rows) if counts is None else counts
        lengths = [self.lengths[r] for r in rows]
        end = max(n + c for n, c in zip(lengths, counts))
        self.reserve(end)
        device, new_valid = self.device, new_valid.to(self.device)
        span = _as_range(rows)
        if len(set(lengths)) == 1 and all(c == width for c in counts):
            valid = self.valid[span] if span is not None else self.valid[torch.tensor(rows, device=device)]
            masks, starts = self._masks(valid, lengths[0], new_valid, encoder=True)
            layer_starts = [starts[spec.kind] for spec in self.config.layers]
            at = lengths[0]
            query_pos = torch.arange(at, end, device=device).expand(len(rows), -1)
            if span is not None:
                def join(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                    keys, values = self.keys[layer][span], self.values[layer][span]
                    keys[:, :, at:end] = k
                    values[:, :, at:end] = v
                    return keys[:, :, layer_starts[layer]:end], values[:, :, layer_starts[layer]:end]
            else:
                row_index = torch.tensor(rows, device=device)

                def join(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                    keys, values = self.keys[layer], self.values[layer]
                    keys[row_index, :, at:end] = k
                    values[row_index, :, at:end] = v
                    window = slice(layer_starts[layer], end)
                    return keys[row_index, :, window], values[row_index, :, window]
            return AttentionPlan(rope=rope(query_pos), masks=masks, join=join)

        # Ragged: real (row, token) pairs are written, indexed on the host, and each row attends on its own.
        pairs = [(i, t) for i, c in enumerate(counts) for t in range(c)]
        source = torch.tensor([i * width + t for i, t in pairs], device=device)
        target_rows = torch.tensor([rows[i] for i, _ in pairs], device=device)
        target_slots = torch.tensor([lengths[i] + t for i, t in pairs], device=device)

        def join(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = self.keys[layer], self.values[layer]
            keys[target_rows, :, target_slots] = k.transpose(1, 2).flatten(0, 1)[source]
            values[target_rows, :, target_slots] = v.transpose(1, 2).flatten(0, 1)[source]
            return keys, values

        # Padding queries mirror their row's last real token (finite, never read).
        query_pos = self._column(lengths) + torch.minimum(torch.arange(width, device=device),
                                                          self._column(counts) - 1)
        return AttentionPlan(rope=rope(query_pos), masks={}, join=join,
                             rows=self._row_attention(rows, counts, new_valid, encoder=True))

    def commit(self, new_valid: torch.Tensor, rows: list[int] | None = None, counts: list[int] | None = None) -> None:
        """Make the tokens the last encoder plan wrote part of each row's prefix."""
        rows = list(range(self.batch_size)) if rows is None else rows
        width = new_valid.shape[1]
        counts = [width] * len(rows) if counts is None else counts
        new_valid = new_valid.to(self.device)
        span = _as_range(rows)
        if span is not None and len(set(self.lengths[span])) == 1 and all(c == width for c in counts):
            at = self.lengths[rows[0]]
            self.valid[span, at:at + width] = new_valid
        else:
            for i, (row, count) in enumerate(zip(rows, counts)):
                at = self.lengths[row]
                self.valid[row, at:at + count] = new_valid[i, :count]
        for row, count in zip(rows, counts):
            self.lengths[row] += count

    # ---- the decoder ------------------------------------------------------------------------------------------

    def decoder_plan(self, rope: Rope, rows: int | list[int], canvas_length: int) -> AttentionPlan:
        """Plan for one canvas per row (rows 0 .. rows - 1, or the rows listed, in the forward's batch in that
        order), each written just past its own prefix."""
        rows = list(range(rows)) if isinstance(rows, int) else rows
        lengths = [self.lengths[r] for r in rows]
        end = max(lengths) + canvas_length
        self.reserve(end)
        device = self.device
        canvas_valid = torch.ones(len(rows), canvas_length, dtype=torch.bool, device=device)
        query_pos = self._column(lengths) + torch.arange(canvas_length, device=device)  # [R, L]
        span = _as_range(rows)
        if len(set(lengths)) == 1 and span is not None:
            at = lengths[0]
            masks, starts = self._masks(self.valid[span], at, canvas_valid, encoder=False)
            layer_starts = [starts[spec.kind] for spec in self.config.layers]

            def join(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                keys, values = self.keys[layer][span], self.values[layer][span]
                keys[:, :, at:end] = k
                values[:, :, at:end] = v
                return keys[:, :, layer_starts[layer]:end], values[:, :, layer_starts[layer]:end]
            return AttentionPlan(rope=rope(query_pos), masks=masks, join=join)

        row_index = torch.tensor(rows, device=device)[:, None]

        def join(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = self.keys[layer], self.values[layer]
            # [R, H, L, D] -> each row's own scratch slots, indexed as [R, L, H, D]
            keys[row_index, :, query_pos] = k.transpose(1, 2)
            values[row_index, :, query_pos] = v.transpose(1, 2)
            return keys, values

        return AttentionPlan(rope=rope(query_pos), masks={}, join=join,
                             rows=self._row_attention(rows, [canvas_length] * len(rows), canvas_valid, encoder=False))

    # ---- rows of a shared cache (the server's) ----------------------------------------------------------------

    def clear(self, row: int) -> None:
        self.lengths[row] = 0
        self.valid[row] = False

    def move(self, source: int, target: int) -> None:
        """Copy a row's sequence into another row (to keep the active rows contiguous), then clear the source."""
        length = self.lengths[source]
        for store in (self.keys, self.values):
            for buffer in store:
                buffer[target, :, :length] = buffer[source, :, :length]
        self.valid[target] = self.valid[source]
        self.lengths[target] = length
        self.clear(source)
