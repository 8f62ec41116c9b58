"""An AttnNode's layer of a small step in two launches of kernels/decode.cu (architecture.md §7, issue 13).

A decode step gives an AttnNode a few rows, and the general path (unpack, sort, tile summaries, attend, merge the
key shares, pack) spent most of a layer in host-side launches: 0.3-1 ms a layer on the H200, the largest part of a
decode step (RSHARD_TRACE). DecodeLayers takes the step's receive-buffer layout once a step (where each q, k and v
row lies) and then runs each layer as decode_append (the new k, v rows into the cache) and decode_attend (every
query row against every cached row it may see, written straight into the packed send buffer).

Same result as ops/attention.prepare_attention(...)(q, k, v) + precision.pack_partial, within fp32 rounding (a
different summation order). Taken for steps of at most transport.SMALL_STEP_TOKENS tokens (decode) and head
dims up to MAX_HEAD_DIM. Larger steps attend through the general plan; PlanLayers unpacks their receive buffer
and packs their partials with decode.cu's helpers (unpack_rows: q's rows and the new k, v rows; pack_partial), a
launch each.
"""
from __future__ import annotations

import functools
import math
import os

import numpy as np

from rshard_hpc.ops.cuda_build import _blocks, _cupy, _kernel, _sm_count
from rshard_hpc.ops.precision import BF16_NAN, partial_slots
from rshard_hpc.ops.wire import recv_row_offsets

SOURCE = "decode.cu"
DECODE_THREADS = 256  # threads a block of decode_attend (one block of 8 warps per query row and head), decode_append
MAX_HEAD_DIM = 128  # decode_attend: a lane holds HEAD_DIM / 32 dims of q and o in registers
KEYS_PER_SHARE = 256  # fewest keys a block of decode_attend takes when the keys are split among blocks
SHARES_MAX = 64  # most blocks sharing one (query row, head)
SPLIT = None  # tests: force this many key shares (else key_shares decides)
ENV_VAR = "RSHARD_SMALL_STEP_KERNELS"  # "0": small steps take the general path too (benchmarks' before/after)
ENABLED = os.environ.get(ENV_VAR, "1") != "0"
PLAN_LAYERS_ENV = "RSHARD_PLAN_LAYERS"  # "0": larger steps unpack and pack with array operations (before/after)
PLAN_LAYERS = os.environ.get(PLAN_LAYERS_ENV, "1") != "0"


def supports(head_dim: int) -> bool:
    return ENABLED and 1 <= head_dim <= MAX_HEAD_DIM


def plan_layers_support(head_dim: int) -> bool:
    """Whether PlanLayers takes a larger step's layers at this head dim (decode.cu's helpers, compiled with it)."""
    return PLAN_LAYERS and 1 <= head_dim <= MAX_HEAD_DIM


def defines(head_dim: int, bf16: bool) -> dict:
    """The preamble decode.cu requires (every name is #error-checked there)."""
    return {"HEAD_DIM": head_dim, "WIRE_BF16": int(bf16), "DECODE_THREADS": DECODE_THREADS, "BF16_NAN": BF16_NAN}


@functools.cache
def _function(name: str, head_dim: int, bf16: bool, device_id: int):
    return _kernel(SOURCE, name, defines(head_dim, bf16))


class _StepRows:
    """An AttnNode step's receive-buffer layout, once a step. Receive buffer, stacked over CompNodes k = 0 … α-1: q of
    its nq[k] rows (H * D each), then k and v of its nkv[k] rows (Hkv * D each); the queries are numbered in that
    order. cache: the KVCache with this step's rows reserved (begin_step)."""

    def __init__(self, cache, nq, nkv, n_heads: int, n_kv_heads: int, head_dim: int, wire):
        cupy = _cupy()
        self.cache, self.n_heads, self.n_kv, self.head_dim = cache, n_heads, n_kv_heads, head_dim
        self.bf16 = np.dtype(wire) == np.uint16
        self.wire = np.dtype(wire)
        self.slots = partial_slots(head_dim, self.wire)
        q_src, k_src, v_src = recv_row_offsets(nq, nkv, n_heads * head_dim, n_kv_heads * head_dim)
        self.n_q, self.n_new = len(q_src), len(k_src)
        offsets = cupy.asarray(np.concatenate([q_src, k_src, v_src]))  # one copy to the device a step
        self.q_src = offsets[:self.n_q]
        self.k_src = offsets[self.n_q:self.n_q + self.n_new]
        self.v_src = offsets[self.n_q + self.n_new:]
        self.device = cupy.cuda.Device().id
        self._append = self._function("decode_append")

    def _function(self, name: str):
        return _function(name, self.head_dim, self.bf16, self.device)

    def _append_rows(self, recv, slot: int) -> None:
        """The step's new k, v rows from recv into the cache's layer `slot` (one launch)."""
        cache = self.cache
        row_width = self.n_kv * self.head_dim
        if self.n_new:
            self._append(_blocks(self.n_new * row_width, DECODE_THREADS), (DECODE_THREADS,),
                         (recv, self.k_src, self.v_src, cache.k[slot], cache.v[slot], np.int32(self.n_new),
                          np.int32(cache.filled), np.int32(row_width)))


class DecodeLayers(_StepRows):
    """One small step's layers on an AttnNode (_StepRows: the receive buffer). q_pos, q_seq: (sum nq,) device ints."""

    def __init__(self, cache, nq, nkv, q_pos, q_seq, n_heads: int, n_kv_heads: int, head_dim: int, wire,
                 causal: bool, scale: float):
        super().__init__(cache, nq, nkv, n_heads, n_kv_heads, head_dim, wire)
        cupy = _cupy()
        self.causal, self.scale_log2 = bool(causal), np.float32(scale * math.log2(math.e))
        self.q_pos = cupy.ascontiguousarray(q_pos, dtype=cupy.int32)
        self.q_seq = cupy.ascontiguousarray(q_seq, dtype=cupy.int32)
        self.n_keys = cache.filled + cache.new
        self.shares = key_shares(self.n_q * n_heads, self.n_keys)
        # a share's unnormalized (o, (m, l)) and the per-(row, head) count of finished shares (zero between layers)
        self.part_o = cupy.empty((self.shares, self.n_q, n_heads, head_dim), dtype=cupy.float32)
        self.part_ml = cupy.empty((self.shares, self.n_q, n_heads, 2), dtype=cupy.float32)
        self.counters = cupy.zeros(self.n_q * n_heads, dtype=cupy.int32)
        self._attend = self._function("decode_attend")

    def layer(self, recv, slot: int):
        """recv: the layer's flat receive buffer (wire type) -> the flat send buffer of packed partials,
        (n_q * H * slots,) wire elements. Writes the step's new k, v rows into the cache's layer `slot`."""
        cupy = _cupy()
        cache = self.cache
        self._append_rows(recv, slot)
        out = cupy.empty(self.n_q * self.n_heads * self.slots, dtype=self.wire)
        if self.n_q:
            self._attend((self.n_q, self.n_heads, self.shares), (DECODE_THREADS,),
                         (recv, self.q_src, self.q_pos, self.q_seq, cache.k[slot], cache.v[slot], cache.pos,
                          cache.seq, out, self.part_o, self.part_ml, self.counters, np.int32(self.n_keys),
                          np.int32(self.n_heads), np.int32(self.n_kv), np.int32(self.slots), self.scale_log2,
                          np.int32(self.causal)))
        return out


class PlanLayers(_StepRows):
    """A larger step's layers on an AttnNode (_StepRows: the receive buffer): attention through the general plan
    (ops/attention prepare_attention, made once a step), with the receive buffer unpacked in one launch
    (unpack_rows: the q rows, contiguous, and the new k, v rows into the cache) and the partial packed in one
    (pack_partial), where the array code took a copy per CompNode for k and for v, a concatenation of the q rows and
    two or three launches to pack: 3-4 launches a layer in place of 9-11 at alpha = 3 (RSHARD_TRACE showed an
    AttnNode's host time, 0.4-1 ms a layer, on a 512-token prefill's critical path; the unpack was two launches
    until tools/op_marks.py showed each launch's 30-50 us there). Same values: the copies and the pack move bits
    (bf16 rounding as precision.to_bf16_bits)."""

    def __init__(self, cache, nq, nkv, plan, n_heads: int, n_kv_heads: int, head_dim: int, wire):
        super().__init__(cache, nq, nkv, n_heads, n_kv_heads, head_dim, wire)
        self.plan = plan
        self._unpack = self._function("unpack_rows")
        self._pack = self._function("pack_partial")

    def layer(self, recv, slot: int):
        """As DecodeLayers.layer: recv (wire type, flat) -> the flat send buffer of packed partials."""
        cupy = _cupy()
        cache = self.cache
        q_width, row_width = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        q = cupy.empty((self.n_q, self.n_heads, self.head_dim), dtype=self.wire)
        total = self.n_q * q_width + self.n_new * row_width
        if total:  # q's rows gathered and the new k, v rows appended to the cache: one launch
            self._unpack(_blocks(total, DECODE_THREADS), (DECODE_THREADS,),
                         (recv, self.q_src, q, np.int32(self.n_q), np.int32(q_width), self.k_src, self.v_src,
                          cache.k[slot], cache.v[slot], np.int32(self.n_new), np.int32(cache.filled),
                          np.int32(row_width)))
        o, lse = self.plan(q, *self.cache.rows(slot))  # (n_q, H, D), (n_q, H) float32
        n = self.n_q * self.n_heads
        out = cupy.empty(n * self.slots, dtype=self.wire)
        if n:
            self._pack(_blocks(n * self.slots, DECODE_THREADS), (DECODE_THREADS,),
                       (cupy.ascontiguousarray(o), cupy.ascontiguousarray(lse), out, np.int32(n),
                        np.int32(self.slots)))
        return out


def key_shares(n_blocks: int, n_keys: int) -> int:
    """How many blocks share each (query row, head)'s keys: enough for about two blocks an SM, each of at least
    KEYS_PER_SHARE keys, at most SHARES_MAX (1: no split)."""
    if SPLIT is not None:
        return int(SPLIT)
    wanted = -(-2 * _sm_count() // max(n_blocks, 1))
    return max(1, min(wanted, -(-n_keys // KEYS_PER_SHARE), SHARES_MAX))
