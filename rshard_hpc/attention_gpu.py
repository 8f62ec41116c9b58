"""Partial attention and merge on CuPy arrays, through the CUDA sources in kernels/ (DESIGN §7).

Same functions, shapes and semantics as the NumPy path in attention.py:
  partial_attention(q, q_pos, q_seq, k, v, k_pos, k_seq, causal, scale) -> o (nq, Hq, D) f32, lse (nq, Hq) f32
  merge_partials(o_parts, lse_parts) -> o (n, H, D) f32, lse (n, H) f32

Inputs may be float32 or bf16. CuPy may have no bfloat16 dtype, so bf16 arrives either as an array whose
dtype is named "bfloat16" or as uint16 arrays of bf16 bit patterns (what `to_bf16_bits` makes); float16 and
float64 are converted to float32 first. bf16 inputs with a head dimension divisible by 16 run on the
tensor cores (mma.sync, fp32 accumulate); everything else runs on the fp32 CUDA-core kernel.

Rows are sorted by (sequence, position) on the device; each query tile then visits only the key range
its sequences can see, and the kernels skip key tiles that no query of the tile may see.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

import rshard_hpc

KERNEL_DIR = Path(rshard_hpc.__file__).resolve().parent.parent / "kernels"

MMA_BM, MMA_BN = 64, 64  # must match kernels/partial_attention.cu
SIMT_THREADS = 128
MAX_HEAD_DIM = 256


def _cupy():
    import cupy

    return cupy


# ---------------------------------------------------------------------------------------------- loading
@functools.lru_cache(maxsize=None)
def _module(source: str, preamble: str, device_id: int):
    """The compiled RawModule of kernels/<source> with `preamble` prepended, for one device (memoized)."""
    cupy = _cupy()
    path = KERNEL_DIR / source
    if not path.exists():
        raise FileNotFoundError(f"CUDA source {path} is missing (the kernels/ folder ships beside the package)")
    code = preamble + "\n" + path.read_text()
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=code, options=("--std=c++17",))
        module.compile()
    return module


def _kernel(source: str, name: str, preamble: str):
    return _module(source, preamble, _cupy().cuda.Device().id).get_function(name)


def _simt_tpr(head_dim: int) -> int:
    """Threads per query row in the CUDA-core kernel: at most 64 dimensions each, dividing head_dim."""
    tpr = 1
    while head_dim // tpr > 64 or head_dim % tpr:
        tpr *= 2
        if tpr > 32:
            raise ValueError(f"head dimension {head_dim} is not supported by the GPU kernel")
    return tpr


# ---------------------------------------------------------------------------------------------- dtypes
def is_bf16(a) -> bool:
    return a.dtype.name == "bfloat16" or a.dtype == np.uint16


def to_bf16_bits(x):
    """float array (NumPy or CuPy) -> uint16 bf16 bit patterns, round to nearest even (same module)."""
    xp = np if isinstance(x, np.ndarray) else _cupy()
    bits = xp.ascontiguousarray(x, dtype=xp.float32).view(xp.uint32)
    rounded = bits + xp.uint32(0x7FFF) + ((bits >> 16) & xp.uint32(1))
    out = (rounded >> 16).astype(xp.uint16)
    nan = xp.isnan(x)
    return xp.where(nan, xp.uint16(0x7FC0), out)


def bf16_bits_to_float(bits):
    xp = np if isinstance(bits, np.ndarray) else _cupy()
    return (bits.astype(xp.uint32) << 16).view(xp.float32)


def _prepare(x):
    """(array for the kernel, is_bf16): contiguous float32, or contiguous uint16 bf16 bits."""
    cupy = _cupy()
    if x.dtype.name == "bfloat16":
        x = x.view(cupy.uint16)
    if x.dtype == cupy.uint16:
        return cupy.ascontiguousarray(x), True
    return cupy.ascontiguousarray(x, dtype=cupy.float32), False


# ---------------------------------------------------------------------------------------------- attention
def partial_attention(q, q_pos, q_seq, k, v, k_pos, k_seq, causal: bool, scale: float):
    """q: (nq, Hq, D); k, v: (nk, Hkv, D); positions/seqs: (nq,), (nk,) ints (CuPy or NumPy).

    Returns o: (nq, Hq, D) float32 and lse: (nq, Hq) float32, CuPy arrays on the current device.
    """
    cupy = _cupy()
    q = cupy.asarray(q)
    k, v = cupy.asarray(k), cupy.asarray(v)
    nq, n_heads, head_dim = q.shape
    nk, n_kv = k.shape[0], k.shape[1]
    if k.shape != v.shape or k.shape[2] != head_dim or n_kv == 0 or n_heads % n_kv:
        raise ValueError(f"shape mismatch: q {q.shape}, k {k.shape}, v {v.shape}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dimension {head_dim} > {MAX_HEAD_DIM} is not supported on the GPU")
    o = cupy.zeros((nq, n_heads, head_dim), dtype=cupy.float32)
    lse = cupy.full((nq, n_heads), -cupy.inf, dtype=cupy.float32)
    if nq == 0 or nk == 0:
        return o, lse
    if q.dtype == cupy.float64:  # no fp64 kernel: callers wanting fp64 use a reference path
        q, k, v = (a.astype(cupy.float32) for a in (q, k, v))
    q, q_bf = _prepare(q)
    k, k_bf = _prepare(k)
    v, v_bf = _prepare(v)
    if not (q_bf == k_bf == v_bf):
        raise ValueError("q, k and v must all be bf16 or all be floating point")
    bf16 = q_bf
    use_mma = bf16 and head_dim % 16 == 0
    tpr = 1 if use_mma else _simt_tpr(head_dim)
    bm = MMA_BM if use_mma else SIMT_THREADS // tpr
    bn = MMA_BN if use_mma else (16 if head_dim > 128 else 32)

    order = _Order(q_pos, q_seq, k_pos, k_seq, causal, bm, bn)
    preamble = f"#define HEAD_DIM {head_dim}\n#define IN_BF16 {int(bf16)}\n#define SIMT_TPR {tpr}\n"
    scale_log2 = np.float32(scale * math.log2(math.e))
    args = (q, k, v, order.q_idx, order.k_idx, order.qs_pos, order.qs_seq, order.ks_pos, order.ks_seq,
            order.q_info, order.k_info, order.k_range, o, lse,
            np.int32(nq), np.int32(nk), np.int32(n_heads), np.int32(n_kv), scale_log2, np.int32(bool(causal)))
    grid = (order.n_q_tiles, n_heads)
    if use_mma:
        fn = _kernel("partial_attention.cu", "attn_fwd_mma", preamble)
        dp = head_dim + 8
        smem = (MMA_BM * dp + 4 * MMA_BN * dp) * 2 + 4 * MMA_BN * 4
        if smem > 48 * 1024:
            fn.max_dynamic_shared_size_bytes = smem
        fn(grid, (128,), args, shared_mem=smem)
    else:
        fn = _kernel("partial_attention.cu", "attn_fwd_simt", preamble)
        fn(grid, (SIMT_THREADS,), args)
    return o, lse


class _Order:
    """Sorted (sequence, position) order of queries and keys, and the per-tile summaries the kernels use."""

    def __init__(self, q_pos, q_seq, k_pos, k_seq, causal: bool, bm: int, bn: int):
        cupy = _cupy()
        q_pos, q_seq = cupy.asarray(q_pos, dtype=cupy.int64), cupy.asarray(q_seq, dtype=cupy.int64)
        k_pos, k_seq = cupy.asarray(k_pos, dtype=cupy.int64), cupy.asarray(k_seq, dtype=cupy.int64)
        nq, nk = len(q_pos), len(k_pos)
        # one int64 key per row: (seq, pos) lexicographic, offsets make both halves non-negative
        seq0 = min(int(q_seq.min()), int(k_seq.min()))
        pos0 = min(int(q_pos.min()), int(k_pos.min()))
        qc = ((q_seq - seq0) << 32) | (q_pos - pos0)
        kc = ((k_seq - seq0) << 32) | (k_pos - pos0)
        q_order = cupy.argsort(qc)
        k_order = cupy.argsort(kc)
        qc_s, kc_s = qc[q_order], kc[k_order]
        self.q_idx = q_order.astype(cupy.int32)
        self.k_idx = k_order.astype(cupy.int32)
        self.qs_pos = q_pos[q_order].astype(cupy.int32)
        self.qs_seq = q_seq[q_order].astype(cupy.int32)
        self.ks_pos = k_pos[k_order].astype(cupy.int32)
        self.ks_seq = k_seq[k_order].astype(cupy.int32)
        self.n_q_tiles = -(-nq // bm)
        self.q_info = _tile_info(self.qs_seq, self.qs_pos, bm)
        self.k_info = _tile_info(self.ks_seq, self.ks_pos, bn)
        first = cupy.arange(self.n_q_tiles) * bm
        last = cupy.minimum(first + bm, nq) - 1
        lo = cupy.searchsorted(kc_s, (qc_s[first] >> 32) << 32, side="left")  # first key of the tile's first seq
        if causal:
            hi = cupy.searchsorted(kc_s, qc_s[last], side="right")  # keys up to (seq, pos) of the last row
        else:
            hi = cupy.searchsorted(kc_s, ((qc_s[last] >> 32) + 1) << 32, side="left")
        self.k_range = cupy.stack([lo, hi], axis=1).astype(cupy.int32).ravel()


def _tile_info(seq_sorted, pos_sorted, tile: int):
    """(n_tiles * 4,) int32: seq_min, seq_max, pos_min, pos_max per tile of sorted rows."""
    cupy = _cupy()
    n = len(seq_sorted)
    n_tiles = -(-n // tile)
    pad = n_tiles * tile - n
    big, small = np.iinfo(np.int32).max, np.iinfo(np.int32).min

    def padded(a, fill):
        return cupy.concatenate([a, cupy.full(pad, fill, dtype=cupy.int32)]).reshape(n_tiles, tile)

    info = cupy.stack([padded(seq_sorted, big).min(axis=1), padded(seq_sorted, small).max(axis=1),
                       padded(pos_sorted, big).min(axis=1), padded(pos_sorted, small).max(axis=1)], axis=1)
    return cupy.ascontiguousarray(info.astype(cupy.int32)).ravel()


# ---------------------------------------------------------------------------------------------- merge
def merge_partials(o_parts, lse_parts):
    """Exact merge over the first axis. o_parts: (P, n, H, D); lse_parts: (P, n, H); any strides.

    Returns o: (n, H, D) float32, lse: (n, H) float32; rows whose partials are all -inf give (0, -inf).
    """
    cupy = _cupy()
    o_parts = cupy.asarray(o_parts)
    lse_parts = cupy.asarray(lse_parts)
    if o_parts.dtype != cupy.float32:
        o_parts = o_parts.astype(cupy.float32)
    if lse_parts.dtype != cupy.float32:
        lse_parts = lse_parts.astype(cupy.float32)
    n_parts, n, n_heads, head_dim = o_parts.shape
    if lse_parts.shape != (n_parts, n, n_heads):
        raise ValueError(f"shape mismatch: o_parts {o_parts.shape}, lse_parts {lse_parts.shape}")
    o = cupy.empty((n, n_heads, head_dim), dtype=cupy.float32)
    lse = cupy.empty((n, n_heads), dtype=cupy.float32)
    total = n * n_heads * head_dim
    if total == 0:
        return o, cupy.full((n, n_heads), -cupy.inf, dtype=cupy.float32)
    if n_parts == 0:
        o.fill(0)
        lse.fill(-cupy.inf)
        return o, lse
    so = [np.int64(s // 4) for s in o_parts.strides]
    sl = [np.int64(s // 4) for s in lse_parts.strides]
    fn = _kernel("merge.cu", "merge_partials", "")
    threads = 256
    blocks = min(-(-total // threads), 65535 * 8)
    fn((blocks,), (threads,), (o_parts, lse_parts, o, lse, np.int32(n_parts), np.int32(n), np.int32(n_heads),
                               np.int32(head_dim), *so, *sl))
    return o, lse
