"""Partial attention and merge on CuPy arrays, through the CUDA sources in kernels/ (DESIGN §7).

Same functions, shapes and semantics as the NumPy path in attention.py:
  partial_attention(q, q_pos, q_seq, k, v, k_pos, k_seq, causal, scale) -> o (nq, Hq, D) f32, lse (nq, Hq) f32
  merge_partials(o_parts, lse_parts) -> o (n, H, D) f32, lse (n, H) f32

Inputs may be float32 or bf16. CuPy may have no bfloat16 dtype, so bf16 arrives either as an array whose
dtype is named "bfloat16" or as uint16 arrays of bf16 bit patterns (what `precision.to_bf16_bits` makes); float16 and
float64 are converted to float32 first. bf16 inputs with a head dimension divisible by 16 run on the
tensor cores (mma.sync, fp32 accumulate); everything else runs on the fp32 CUDA-core kernel.

Rows are sorted by (sequence, position) on the device; each query tile then visits only the key range
its sequences can see, and the kernels skip key tiles that no query of the tile may see.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

import rshard_hpc

KERNEL_DIR = Path(rshard_hpc.__file__).resolve().parent.parent / "kernels"


class MmaConfig(NamedTuple):
    """One configuration of the tensor-core kernel (kernels/partial_attention.cu, preprocessor defines)."""

    mt: int = 1        # MMA_MT: 16-row slabs per warp (more reuse of each K/V fragment, more registers)
    q_regs: int = 1    # Q_IN_REGS: Q fragments kept in registers (else re-read from shared memory per tile)
    warps: int = 4     # MMA_WARPS: warps per block sharing each K/V tile (query tile = 16 * mt * warps rows)
    bn: int = 64       # MMA_BN: keys per tile
    stages: int = 2    # MMA_STAGES: shared-memory K/V stages (loads issued stages - 1 tiles ahead)
    minb: int = 1      # MMA_MINB: blocks per multiprocessor the register allocation must allow


# head dim -> configuration of the tensor-core kernel; a plain tuple is read as MmaConfig(*tuple)
# (bench.bench_variants measures the choices). D=64: 4 warps x 16 rows, 64-key tiles, 2 stages was the fastest
# of the configurations timed on the H200 (docs/bench_kernel_h200.md); D=128 was not re-timed after v4.
MMA_CONFIG = {16: (2, 1), 32: (2, 1), 64: (1, 1), 128: (2, 0)}
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


def _mma_config(head_dim: int) -> MmaConfig:
    return MmaConfig(*MMA_CONFIG.get(head_dim, (1, 1 if head_dim <= 64 else 0)))


def _simt_tpr(head_dim: int) -> int:
    """Threads per query row in the CUDA-core kernel: at most 64 dimensions each, dividing head_dim."""
    tpr = 1
    while head_dim // tpr > 64 or head_dim % tpr:
        tpr *= 2
        if tpr > 32:
            raise ValueError(f"head dimension {head_dim} is not supported by the GPU kernel")
    return tpr


# ---------------------------------------------------------------------------------------------- dtypes
def _prepare(x):
    """(array for the kernel, is_bf16): contiguous float32, or contiguous uint16 bf16 bits."""
    cupy = _cupy()
    if x.dtype.name == "bfloat16":
        x = x.view(cupy.uint16)
    bf16 = x.dtype == cupy.uint16
    x = cupy.ascontiguousarray(x, dtype=cupy.uint16 if bf16 else cupy.float32)
    if x.data.ptr % 16:  # a view at an odd offset: the tensor-core kernel loads 16-byte chunks
        x = x.copy()
    return x, bf16


# ---------------------------------------------------------------------------------------------- attention
POISON_OUTPUTS = False  # tests: fill outputs with NaN before the kernels run, so unwritten elements show


def partial_attention(q, q_pos, q_seq, k, v, k_pos, k_seq, causal: bool, scale: float, launches=None):
    """q: (nq, Hq, D); k, v: (nk, Hkv, D); positions/seqs: (nq,), (nk,) ints (CuPy or NumPy).

    Returns o: (nq, Hq, D) float32 and lse: (nq, Hq) float32, CuPy arrays on the current device.
    `launches`: a dict the caller keeps while the positions stay the same (an AttnNode: every layer of one
    step); the sorted order and tile summaries are then made once and reused.
    """
    cupy = _cupy()
    q, k, v = cupy.asarray(q), cupy.asarray(k), cupy.asarray(v)
    nq, n_heads, head_dim = q.shape
    nk, n_kv = k.shape[0], k.shape[1]
    if k.shape != v.shape or k.shape[2] != head_dim or n_kv == 0 or n_heads % n_kv:
        raise ValueError(f"shape mismatch: q {q.shape}, k {k.shape}, v {v.shape}")
    if nq == 0 or nk == 0:
        o = cupy.zeros((nq, n_heads, head_dim), dtype=cupy.float32)
        return o, cupy.full((nq, n_heads), -cupy.inf, dtype=cupy.float32)
    if q.dtype == cupy.float64:  # no fp64 kernel (the fp64 references live in the tests)
        q, k, v = (a.astype(cupy.float32) for a in (q, k, v))
    q, q_bf = _prepare(q)
    k, k_bf = _prepare(k)
    v, v_bf = _prepare(v)
    if not (q_bf == k_bf == v_bf):
        raise ValueError("q, k and v must all be bf16 or all be floating point")
    key = (head_dim, q_bf, bool(causal), nq, nk)
    launch = launches.get(key) if launches is not None else None
    if launch is None:
        launch = AttentionLaunch(q_pos, q_seq, k_pos, k_seq, causal, head_dim, q_bf)
        if launches is not None:
            launches[key] = launch
    return launch(q, k, v, scale)


class AttentionLaunch:
    """One (positions, mask, head dim, dtype) problem made ready: the sorted order, tile summaries and
    the compiled kernel. Calling it runs the kernel only (the benchmark times exactly that)."""

    def __init__(self, q_pos, q_seq, k_pos, k_seq, causal: bool, head_dim: int, bf16: bool):
        if head_dim > MAX_HEAD_DIM:
            raise ValueError(f"head dimension {head_dim} > {MAX_HEAD_DIM} is not supported on the GPU")
        self.causal, self.head_dim, self.bf16 = bool(causal), head_dim, bf16
        self.use_mma = bf16 and head_dim % 16 == 0
        tpr = 1 if self.use_mma else _simt_tpr(head_dim)
        if self.use_mma:
            cfg = _mma_config(head_dim)
            bm, bn = 16 * cfg.mt * cfg.warps, cfg.bn
            preamble = (f"#define HEAD_DIM {head_dim}\n#define IN_BF16 1\n#define MMA_MT {cfg.mt}\n"
                        f"#define Q_IN_REGS {cfg.q_regs}\n#define MMA_WARPS {cfg.warps}\n#define MMA_BN {bn}\n"
                        f"#define MMA_STAGES {cfg.stages}\n#define MMA_MINB {cfg.minb}\n")
            self.fn = _kernel("partial_attention.cu", "attn_fwd_mma", preamble)
            dp = head_dim + 8
            self.smem = (bm * dp + 2 * cfg.stages * bn * dp) * 2 + 2 * cfg.stages * bn * 4
            if self.smem > 48 * 1024:
                self.fn.max_dynamic_shared_size_bytes = self.smem
            self.threads = 32 * cfg.warps
        else:
            bm, bn = SIMT_THREADS // tpr, (16 if head_dim > 128 else 32)
            preamble = f"#define HEAD_DIM {head_dim}\n#define IN_BF16 {int(bf16)}\n#define SIMT_TPR {tpr}\n"
            self.fn = _kernel("partial_attention.cu", "attn_fwd_simt", preamble)
            self.smem = 0
            self.threads = SIMT_THREADS
        self.bn = bn
        self.order = _Order(q_pos, q_seq, k_pos, k_seq, causal, bm, bn)

    def __call__(self, q, k, v, scale: float):
        """q, k, v: contiguous float32, or uint16 bf16 bits when made with bf16=True."""
        cupy = _cupy()
        nq, n_heads, head_dim = q.shape
        nk, n_kv = k.shape[0], k.shape[1]
        order = self.order
        if len(order.q_idx) != nq or len(order.k_idx) != nk or head_dim != self.head_dim:
            raise ValueError("arrays do not match the prepared problem")
        for a in (q, k, v):
            if not a.flags.c_contiguous or (self.use_mma and a.data.ptr % 16) or \
                    a.dtype != (cupy.uint16 if self.bf16 else cupy.float32):
                raise ValueError("q, k, v must be contiguous, 16-byte aligned, and of the prepared dtype")
        o = cupy.empty((nq, n_heads, head_dim), dtype=cupy.float32)
        lse = cupy.empty((nq, n_heads), dtype=cupy.float32)
        if POISON_OUTPUTS:
            o.fill(cupy.nan)
            lse.fill(cupy.nan)
        scale_log2 = np.float32(scale * math.log2(math.e))
        if self.use_mma:  # K, V gathered to (Hkv, nk_pad, D) in sorted order: contiguous key tiles
            nk_pad = -(-nk // self.bn) * self.bn
            chunks = head_dim // 8
            kg = cupy.empty((n_kv, nk_pad, head_dim), dtype=cupy.uint16)
            vg = cupy.empty_like(kg)
            total = n_kv * nk_pad * chunks
            _kernel("attention_order.cu", "gather_kv", "")(
                (min(-(-total // 256), 65535),), (256,),
                (k, v, order.k_idx, np.int32(nk), np.int32(nk_pad), np.int32(n_kv), np.int32(chunks), kg, vg))
            k, v, second = kg, vg, np.int32(nk_pad)
        else:
            second = order.k_idx
        args = (q, k, v, order.q_idx, second, order.qs_pos, order.qs_seq, order.ks_pos, order.ks_seq,
                order.q_info, order.k_info, order.k_range, o, lse,
                np.int32(nq), np.int32(nk), np.int32(n_heads), np.int32(n_kv), scale_log2,
                np.int32(self.causal))
        self.fn((order.n_q_tiles, n_heads), (self.threads,), args, shared_mem=self.smem)
        return o, lse


class _Order:
    """Sorted (sequence, position) order of queries and keys, and the per-tile summaries the kernels use
    (kernels/attention_order.cu: a handful of launches and two device sorts, no host synchronization)."""

    def __init__(self, q_pos, q_seq, k_pos, k_seq, causal: bool, bm: int, bn: int):
        cupy = _cupy()
        nq, nk = len(q_pos), len(k_pos)
        self.n_q_tiles = -(-nq // bm)
        n_k_tiles = -(-nk // bn)
        self.q_idx, self.qs_pos, self.qs_seq, qk = _sorted_rows(q_pos, q_seq)
        self.k_idx, self.ks_pos, self.ks_seq, kk = _sorted_rows(k_pos, k_seq)
        self.q_info = cupy.empty(4 * self.n_q_tiles, dtype=cupy.int32)
        self.k_info = cupy.empty(4 * n_k_tiles, dtype=cupy.int32)
        self.k_range = cupy.empty(2 * self.n_q_tiles, dtype=cupy.int32)
        info = _kernel("attention_order.cu", "tile_info", "")
        info((-(-self.n_q_tiles // 128),), (128,), (self.qs_pos, self.qs_seq, np.int32(nq), np.int32(bm),
                                                   np.int32(self.n_q_tiles), self.q_info))
        info((-(-n_k_tiles // 128),), (128,), (self.ks_pos, self.ks_seq, np.int32(nk), np.int32(bn),
                                               np.int32(n_k_tiles), self.k_info))
        ranges = _kernel("attention_order.cu", "key_ranges", "")
        ranges((-(-self.n_q_tiles // 128),), (128,), (qk, np.int32(nq), np.int32(bm), np.int32(self.n_q_tiles),
                                                     kk, np.int32(nk), np.int32(bool(causal)), self.k_range))


def _sorted_rows(pos, seq):
    """(idx, sorted pos, sorted seq, sorted keys) for rows ordered by (seq, pos); idx[slot] = original row."""
    cupy = _cupy()
    pos = cupy.asarray(pos).astype(cupy.int32, copy=False)
    seq = cupy.asarray(seq).astype(cupy.int32, copy=False)
    n = len(pos)
    blocks = (min(-(-n // 256), 4096),)
    key = cupy.empty(n, dtype=cupy.int64)
    _kernel("attention_order.cu", "make_keys", "")(blocks, (256,), (pos, seq, key, np.int32(n)))
    order = cupy.argsort(key)
    idx = cupy.empty(n, dtype=cupy.int32)
    s_pos, s_seq = cupy.empty_like(idx), cupy.empty_like(idx)
    s_key = cupy.empty_like(key)
    _kernel("attention_order.cu", "gather_sorted", "")(blocks, (256,), (order, pos, seq, key, idx, s_pos, s_seq,
                                                                        s_key, np.int32(n)))
    return idx, s_pos, s_seq, s_key


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
    if POISON_OUTPUTS:
        o.fill(cupy.nan)
        lse.fill(cupy.nan)
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
