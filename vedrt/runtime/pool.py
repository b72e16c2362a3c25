"""The engine's decoder state: self-attention cache rows and cross-attention image slots.

One pool per engine, allocated in the executor's memory (numpy on the host, torch tensors on a
device) and written over `ops`, so every backend shares this code:
- `cache` `[layers, 2, rows, heads, cache_len, head_dim]`: both K and V of every layer in one
  array. Requests own contiguous row ranges packed at the front, so `cache[i, j, :n]` (what the
  decoder graph reads as `self_key.i` / `self_value.i`) is a contiguous view. A step's new K/V are
  written at each row's own position; a beam reorder copies, within a request's range, only
  the positions where a row's new history differs from its old one.
- `cross` `[2 * layers, slots, heads, enc_len, head_dim]`: an image's K/V, computed once when it
  is admitted, and the `encoder_mask` `[slots, enc_len]` of its valid encoder positions.
- the step inputs `input_ids`, `past_lengths`, whose prefixes the graph reads, and the groups'
  cross K/V (`set_groups`, `group_inputs`): the slots themselves, in place, when group g reads
  slot g; else the groups' K/V gathered once per layout into `group_cross` (a copy the decoder
  graph used to make on every step).
Pools grow (more positions, more slots) by reallocation and copy; the engine asks for sizes it
knows are needed, so a steady state allocates nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class KVPool:
    """See the module docstring. `version` changes whenever a buffer is reallocated."""

    def __init__(
        self,
        ops: Any,
        dims: tuple[int, int, int],
        rows: int,
        slots: int,
        cache_len: int,
        enc_len: int,
        dtype: Any,
    ):
        self.ops = ops
        self.layers, self.heads, self.head_dim = dims
        self.dtype = dtype
        self.rows, self.slots, self.cache_len, self.enc_len = rows, slots, cache_len, enc_len
        self.version = 0
        # what an executor keeps per pool (ONNX Runtime IO bindings, captured CUDA graphs), so
        # it lives and dies with the buffers it points into
        self.bindings: dict[Any, Any] = {}
        self.cache = self._new_cache(rows, cache_len)
        self.cross = self._new_cross(slots, enc_len)
        self.encoder_mask = ops.zeros((slots, enc_len), ops.int64)
        self.input_ids = ops.zeros((rows, 1), ops.int64)
        self.past_lengths = ops.zeros((rows,), ops.int64)
        self.group_slots = ops.zeros((rows,), ops.int64)
        self.in_place = True  # do the groups read slots 0..G-1 in order (`set_groups`)
        self.group_cross: Any = None  # [2 * layers, G, heads, enc_len, head_dim] when gathered
        self.group_mask: Any = None

    def _new_cache(self, rows: int, cache_len: int):
        # zeros, not empty: masked positions are multiplied by a probability of exactly 0, and
        # 0 * NaN from uninitialised memory would poison the step
        shape = (self.layers, 2, rows, self.heads, cache_len, self.head_dim)
        return self.ops.zeros(shape, self.dtype)

    def _new_cross(self, slots: int, enc_len: int):
        shape = (2 * self.layers, slots, self.heads, enc_len, self.head_dim)
        return self.ops.zeros(shape, self.dtype)

    def ensure(self, cache_len: int, slots: int, enc_len: int, used_rows: int) -> None:
        """Grow to hold `cache_len` positions and `slots` images of `enc_len` states."""
        ops = self.ops
        if cache_len > self.cache_len:
            cache = self._new_cache(self.rows, cache_len)
            cache[:, :, :used_rows, :, : self.cache_len] = self.cache[:, :, :used_rows]
            self.cache, self.cache_len = cache, cache_len
            self.version += 1
        if slots > self.slots or enc_len > self.enc_len:
            slots, enc_len = max(slots, self.slots), max(enc_len, self.enc_len)
            cross = self._new_cross(slots, enc_len)
            cross[:, : self.slots, :, : self.enc_len] = self.cross
            mask = ops.zeros((slots, enc_len), ops.int64)
            mask[: self.slots, : self.enc_len] = self.encoder_mask
            self.cross, self.encoder_mask = cross, mask
            self.slots, self.enc_len = slots, enc_len
            self.group_cross = self.group_mask = None  # sized for the old encoder length
            self.version += 1

    def set_groups(self, slots: list[int]) -> int:
        """Group g reads image slot `slots[g]`; returns the group count. Call it after the
        images are in their slots and before the step. Groups that are the first slots in order
        read them in place; otherwise their K/V are gathered here, once for this layout."""
        ops, count = self.ops, len(slots)
        self.group_slots[:count] = ops.asarray(slots, ops.int64)
        self.in_place = list(slots) == list(range(count))
        if self.in_place:
            return count
        if self.group_cross is None or self.group_cross.shape[1] < count:
            # as many groups as slots at once: grown one group at a time, every new high in a
            # busy server reallocated it and made every binding stale (1 step in 12 rebound)
            size = max(count, self.slots)
            shape = (2 * self.layers, size, self.heads, self.enc_len, self.head_dim)
            self.group_cross = ops.zeros(shape, self.dtype)
            self.group_mask = ops.zeros((size, self.enc_len), ops.int64)
            self.version += 1  # what is bound to the old buffers must be bound again
        index = self.group_slots[:count]
        self.group_cross[:, :count] = self.cross[:, index]
        self.group_mask[:count] = self.encoder_mask[index]
        return count

    def group_inputs(self, groups: int) -> tuple[list, Any]:
        """The decoder's `cross_key.i` / `cross_value.i` ([groups, H, S, hd], k0, v0, k1, ...)
        and `encoder_mask` ([groups, S]) for the layout `set_groups` made."""
        cross, mask = (
            (self.cross, self.encoder_mask)
            if self.in_place
            else (self.group_cross, self.group_mask)
        )
        return [cross[j, :groups] for j in range(2 * self.layers)], mask[:groups]

    def cross_inputs(self, groups: int, gathers_in_graph: bool = False) -> dict[str, Any]:
        """The decoder graph's cross-attention inputs by name: each group's K/V and mask, or,
        for an export from before 2026-12-06 (`gathers_in_graph`), the whole slot pool and
        `group_slots`, which such a graph gathers from itself on every step."""
        if gathers_in_graph:
            cross, mask = list(self.cross), self.encoder_mask
            named = {"group_slots": self.group_slots[:groups]}
        else:
            cross, mask = self.group_inputs(groups)
            named = {}
        named["encoder_mask"] = mask
        for j, array in enumerate(cross):
            named[f"cross_{('key', 'value')[j % 2]}.{j // 2}"] = array
        return named

    def put_image(self, slot: int, cross: list, mask: Any, index: int) -> None:
        """Image `index` of an encoded batch (2 * layers arrays [b, H, S, hd]) into `slot`."""
        length = cross[0].shape[2]
        for j, array in enumerate(cross):
            self.cross[j, slot, :, :length] = array[index]
        self.encoder_mask[slot] = 0
        self.encoder_mask[slot, :length] = mask[index]

    def clear(self, rows: list[int], slots: list[int]) -> None:
        """Zero these cache rows (every position) and image slots: what a request whose step
        came out NaN or infinite leaves there would reach the next occupant through its masked
        positions, since 0 x NaN is NaN."""
        if rows:
            self.cache[:, :, self.ops.asarray(rows)] = 0
        if slots:
            self.cross[:, self.ops.asarray(slots)] = 0

    def _by_layer_kv(self):
        """The cache viewed as `[2 * layers, rows, heads, cache_len, head_dim]` (k0, v0, k1, ...),
        so one indexed read or write covers every layer's K and V."""
        shape = (2 * self.layers, self.rows, self.heads, self.cache_len, self.head_dim)
        return self.cache.reshape(shape)

    def write_new(self, new_kv: Any, rows: int) -> None:
        """A step's new K/V (2 * layers arrays [rows, H, 1, hd], or one array of them stacked
        [2 * layers, rows, H, 1, hd]) at each row's position."""
        row_idx = self.ops.arange(rows)
        positions = self.past_lengths[:rows]
        if not isinstance(new_kv, list):  # stacked: one indexed write for every layer
            self._by_layer_kv()[:, row_idx, :, positions] = new_kv[:, :, :, 0].transpose(1, 0, 2, 3)
            return
        for j, array in enumerate(new_kv):
            self.cache[j // 2, j % 2, row_idx, :, positions] = array[:, :, 0]

    def copy_positions(
        self, source: np.ndarray, target: np.ndarray, start: np.ndarray, length: int
    ) -> None:
        """Cache rows `target[i]` <- rows `source[i]` at positions [start[i], length) (host int64
        arrays; rows may overlap): a beam reorder, where rows differ only in their last few
        positions. One gather and one scatter of exactly those (row, position) pairs."""
        counts = np.maximum(length - start, 0)
        total = int(counts.sum())
        if total == 0:
            return
        first = np.cumsum(counts) - counts
        positions = np.arange(total) - np.repeat(first - start, counts)
        ops = self.ops
        src = ops.asarray(np.repeat(source, counts))
        dst = ops.asarray(np.repeat(target, counts))
        at = ops.asarray(positions)
        flat = self._by_layer_kv()
        flat[:, dst, :, at] = flat[:, src, :, at]

    def copy_rows(self, source: Any, target: Any, length: int) -> None:
        """cache rows `target` <- rows `source` (positions below `length`); may overlap."""
        self.cache[:, :, target, :, :length] = self.cache[:, :, source, :, :length]

    def move_rows(self, source: Any, target: Any, length: int) -> None:
        """Rows `source` to rows `target` (host index arrays; they may overlap) with their next
        input ids and lengths: for rows that change place, not beams that change history."""
        ops = self.ops
        source, target = ops.asarray(source, ops.int64), ops.asarray(target, ops.int64)
        self.copy_rows(source, target, length)
        self.input_ids[target] = self.input_ids[source]
        self.past_lengths[target] = self.past_lengths[source]

    def filled(self, start: int, count: int) -> int:
        """How many cache positions rows [start, start+count) hold (the most of any of them)."""
        return int(self.ops.to_numpy(self.past_lengths[start : start + count]).max())
