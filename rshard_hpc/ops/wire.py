"""A CompNode's wire layout for one step (architecture.md §3): q, k, v rows into its send buffer, the returned
partials back to its rows; index arrays made once a step, one gather (NumPy) or one launch (CuPy) a layer.

Send buffer, for AttnNode (i, j) in order i = 0 … β-1, j = 0 … β-1: q of my rows of group i, then k and v
of my rows of group j (each in local row order), in the wire's element type (float32, or bf16 bits
rounded to nearest even). Receive buffer, in the same (i, j) order: one row of H * slots wire elements
per query of mine in group i (ops/precision.pack_partial: o, then lse), the partial of key group j.

Rows of q (H * D floats) and of k, v (Hkv * D floats) are gathered in units of gcd(H, Hkv) * D floats, so a
single index array over the units of q, k and v describes the whole send buffer: `send_units` over q's units, then
k's, then v's (the kernels' layout: passes_cuda.pack reads the three in place); on NumPy `fused_units`, the same
units in the rows of the fused (n, H + 2 Hkv, D) q/k/v product, which is where an encoder's q, k and v already lie
(Bert.pre's views): one gather, no copy before it.
"""
from __future__ import annotations

import math

import numpy as np

from rshard_hpc.ops.arrays import xp_of
from rshard_hpc.ops.attention import merge_partials
from rshard_hpc.ops.precision import partial_slots, to_bf16_bits, unpack_partial


class WireRoutes:
    """rows_of_group[g]: indices of my local rows in group g (every row in exactly one group; NumPy ints).
    n_local: my row count. xp: where the arrays live (the index arrays are copied there once)."""

    def __init__(self, rows_of_group: list, n_local: int, n_heads: int, n_kv_heads: int, head_dim: int, wire,
                 xp=np):
        self.beta, self.n = len(rows_of_group), int(n_local)
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wire, self.xp = np.dtype(wire), xp
        self.slots = partial_slots(head_dim, self.wire)
        self.unit = math.gcd(n_heads, n_kv_heads) * head_dim  # floats per gathered unit
        self.q_units, self.kv_units = n_heads * head_dim // self.unit, n_kv_heads * head_dim // self.unit
        rows = [np.asarray(r, dtype=np.int64) for r in rows_of_group]
        self.send_sizes = [[(len(rows[i]) * n_heads + 2 * len(rows[j]) * n_kv_heads) * head_dim
                            for j in range(self.beta)] for i in range(self.beta)]
        self.send_units = xp.asarray(self._send_units(rows, fused=False).astype(np.int32))
        self.fused_units = self._send_units(rows, fused=True) if xp is np else None
        self.recv_rows = xp.asarray(self._recv_rows(rows).astype(np.int32))

    def _send_units(self, rows: list, fused: bool) -> np.ndarray:
        """(send units,) source unit of each unit of the send buffer. fused: in the rows of (n, H + 2 Hkv, D), row r's
        units r * (gq + 2 gk) + (q's gq, then k's gk, then v's gk); else q units 0 … n*gq-1, then k's, then v's."""
        n, gq, gk = self.n, self.q_units, self.kv_units
        row_units = gq + 2 * gk
        (q_at, q_row), (k_at, k_row), (v_at, v_row) = (((0, row_units), (gq, row_units), (gq + gk, row_units)) if fused
                                                       else ((0, gq), (n * gq, gk), (n * (gq + gk), gk)))
        q_of = [(q_at + r[:, None] * q_row + np.arange(gq)).ravel() for r in rows]
        k_of = [(k_at + r[:, None] * k_row + np.arange(gk)).ravel() for r in rows]
        v_of = [(v_at + r[:, None] * v_row + np.arange(gk)).ravel() for r in rows]
        parts = [part for i in range(self.beta) for j in range(self.beta) for part in (q_of[i], k_of[j], v_of[j])]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def _recv_rows(self, rows: list) -> np.ndarray:
        """(β * n,) for part j of local row r (at j * n + r): its row in the receive buffer."""
        dest = [j * self.n + rows[i] for i in range(self.beta) for j in range(self.beta)]  # receive order
        dest = np.concatenate(dest) if dest else np.zeros(0, np.int64)
        if len(dest) != self.beta * self.n or (len(dest) and np.bincount(dest, minlength=len(dest)).max() != 1):
            raise ValueError("rows_of_group must hold every local row exactly once")
        src = np.empty(len(dest), dtype=np.int64)
        src[dest] = np.arange(len(dest))
        return src

    def pack(self, q, k, v):
        """q (n, H, D), k, v (n, Hkv, D) float -> the flat send buffer (wire dtype)."""
        xp = xp_of(q)
        if xp is not np:
            from rshard_hpc.ops import passes_cuda

            return passes_cuda.pack(q, k, v, self.send_units, self.unit, self.wire)
        qkv = _one_product(q, k, v)
        if qkv is None:
            qkv = np.concatenate([q, k, v], axis=1)  # (n, H + 2 Hkv, D)
        units = qkv.reshape(-1, self.unit)  # (n * (gq + 2 gk), unit)
        units = to_bf16_bits(units) if self.wire == np.uint16 else units.astype(np.float32, copy=False)
        return np.take(units, self.fused_units, axis=0).ravel()

    def merge(self, recv):
        """The flat receive buffer -> o (n, H, D) float32, the exact merge of each row's β partials."""
        xp = xp_of(recv)
        H, D, n = self.n_heads, self.head_dim, self.n
        if xp is not np:
            from rshard_hpc.ops import passes_cuda

            return passes_cuda.unpack_merge(recv, self.recv_rows, self.beta, n, H, D, self.slots, self.wire)
        packed = np.take(recv.reshape(-1, H * self.slots), self.recv_rows, axis=0)  # (β * n, H * slots)
        o_parts, lse_parts = unpack_partial(packed.reshape(self.beta, n, H, self.slots), self.wire)
        return merge_partials(o_parts, lse_parts)[0]


def _one_product(q, k, v):
    """q (n, H, D), k, v (n, Hkv, D) as the (n, H + 2 Hkv, D) array they are consecutive column slices of (one
    C-contiguous product, as Bert.pre gives them), or None where they lie elsewhere."""
    base = q.base
    if base is None or k.base is not base or v.base is not base or not base.flags.c_contiguous or q.size == 0:
        return None
    (n, n_heads, head_dim), n_kv, item = q.shape, k.shape[1], q.itemsize
    row = (n_heads + 2 * n_kv) * head_dim
    if base.dtype != q.dtype or base.size != n * row or k.dtype != q.dtype or v.dtype != q.dtype:
        return None
    start = base.__array_interface__["data"][0]
    at = [a.__array_interface__["data"][0] - start for a in (q, k, v)]
    strides = (row * item, head_dim * item, item)
    if at != [0, n_heads * head_dim * item, (n_heads + n_kv) * head_dim * item] or \
            any(a.strides != strides for a in (q, k, v)):
        return None
    return base.reshape(n, n_heads + 2 * n_kv, head_dim)


def recv_row_offsets(nq, nkv, q_width: int, kv_width: int):
    """An AttnNode's receive buffer, stacked over CompNodes k = 0 … α-1 (nq[k] q rows of q_width elements, then
    nkv[k] k rows and nkv[k] v rows of kv_width): the element offset of each q row, each k row and each v row, in
    that order (three (n,) int64 NumPy arrays)."""
    q_src, k_src, v_src, at = [], [], [], 0
    for n_q, n_kv in zip(nq, nkv):
        n_q, n_kv = int(n_q), int(n_kv)
        q_src.append(at + q_width * np.arange(n_q, dtype=np.int64))
        at += n_q * q_width
        k_src.append(at + kv_width * np.arange(n_kv, dtype=np.int64))
        v_src.append(at + n_kv * kv_width + kv_width * np.arange(n_kv, dtype=np.int64))
        at += 2 * n_kv * kv_width
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
    return cat(q_src), cat(k_src), cat(v_src)
