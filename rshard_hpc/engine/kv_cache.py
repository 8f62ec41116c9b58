"""An AttnNode's key/value cache for one batch (architecture.md §3): sized once at the batch's start from the plans,
every layer's rows written in place, the rows' positions kept once for all layers. No MPI here.

A step appends its new key rows (the same rows in every layer): `begin_step(pos, seq)` reserves them and returns
the positions of every cached row so far; `write(layer, k, v)` fills the layer's new rows and returns views of
all its rows; `end_step()` commits them. Nothing is concatenated, so a decode step costs O(new rows) to store,
not O(all rows) a layer as a growing concatenation did.
"""
from __future__ import annotations

import numpy as np


def key_capacity(plans: list, key_group: int) -> int:
    """Rows the AttnNodes of column `key_group` can receive over a batch: every position of every sequence in
    that index group (a step computes each position at most once). plans[s] = (comp, group) of sequence s."""
    return int(sum(np.count_nonzero(group == key_group) for _, group in plans))


class _Rows:
    """What an AttnNode's layer functions read of a cache: k, v (layers, capacity, Hkv, D), pos, seq (capacity,),
    `filled` rows before the new ones, `new` rows being written."""

    def new_rows(self, layer: int):
        """Views of the layer's reserved rows, (m, Hkv, D) each: receive or copy the step's k, v into them."""
        a, b = self.filled, self.filled + self.new
        return self.k[layer, a:b], self.v[layer, a:b]

    def rows(self, layer: int):
        """Views of every row of the layer so far, the step's new rows included: (filled + m, Hkv, D) each."""
        end = self.filled + self.new
        return self.k[layer, :end], self.v[layer, :end]


class KVCache(_Rows):
    """k, v: (layers, capacity, Hkv, D) in the wire's element type; pos, seq: (capacity,) int32."""

    def __init__(self, xp, n_layers: int, capacity: int, n_kv_heads: int, head_dim: int, dtype):
        self.xp, self.capacity = xp, int(capacity)
        self.k = xp.empty((n_layers, self.capacity, n_kv_heads, head_dim), dtype=dtype)
        self.v = xp.empty_like(self.k)
        self.pos = xp.empty(self.capacity, dtype=xp.int32)
        self.seq = xp.empty(self.capacity, dtype=xp.int32)
        self.filled = 0  # rows of committed steps
        self.new = 0  # rows reserved by the step under way

    def begin_step(self, pos, seq):
        """Reserve the step's new rows at (pos, seq) ((m,) ints). Returns (pos, seq) of every row, (filled + m,)."""
        m = len(pos)
        end = self.filled + m
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} key rows for a batch planned for {self.capacity}")
        self.pos[self.filled:end] = self.xp.asarray(pos, dtype=self.xp.int32)
        self.seq[self.filled:end] = self.xp.asarray(seq, dtype=self.xp.int32)
        self.new = m
        return self.pos[:end], self.seq[:end]

    def end_step(self) -> None:
        self.filled += self.new
        self.new = 0

    def lane(self, start: int, new: int) -> "CacheLane":
        """The view a micro-batch's lane attends through (engine/micro.py): its `new` rows of the step's reserved
        ones begin `start` rows after the committed ones, and it sees every row before its own end."""
        if start < 0 or new < 0 or start + new > self.new:
            raise ValueError(f"lane rows {start} … {start + new} outside the step's {self.new} reserved rows")
        return CacheLane(self, self.filled + start, new)


class CacheLane(_Rows):
    """A lane's window on a KVCache during one step (KVCache.lane): the same arrays, its own filled and new."""

    def __init__(self, cache: KVCache, filled: int, new: int):
        self.xp, self.capacity = cache.xp, cache.capacity
        self.k, self.v, self.pos, self.seq = cache.k, cache.v, cache.pos, cache.seq
        self.filled, self.new = filled, new
