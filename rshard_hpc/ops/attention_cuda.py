"""Partial attention and merge on CuPy arrays, through the CUDA sources in kernels/ (architecture.md §7).

Same interface, shapes and semantics as the NumPy path in attention.py:
  plan = prepare_attention(q_pos, q_seq, k_pos, k_seq, causal=..., scale=..., mma_config=None)
  plan(q, k, v) -> o (nq, Hq, D) f32, lse (nq, Hq) f32
  partial_attention(q, q_pos, q_seq, k, v, k_pos, k_seq, causal, scale): the two in one
  merge_partials(o_parts, lse_parts) -> o (n, H, D) f32, lse (n, H) f32

Inputs may be float32 or bf16. CuPy may have no bfloat16 dtype, so bf16 arrives either as an array whose
dtype is named "bfloat16" or as uint16 arrays of bf16 bit patterns (what `precision.to_bf16_bits` makes); float16 and
float64 are converted to float32 first. bf16 inputs with a head dimension divisible by 16 run on the
tensor cores (mma.sync, fp32 accumulate); everything else runs on the fp32 CUDA-core kernel. Head
dimensions up to MAX_HEAD_DIM are accepted (choose_kernel says which).

Rows are sorted by (sequence, position) on the device once per plan; at its first call the plan picks
the kernel for q's dtype and head dimension, and makes the tile summaries for that kernel's tile sizes:
each query tile then visits only the key range its sequences can see, and the kernels skip key tiles
that no query of the tile may see.

Compiling (ops/cuda_build.py): every constant a kernel shares with this file (tile sizes, thread counts, the
shared-memory layout, its padding) is written here only and reaches the kernel as a #define in the preamble of
the program text (cuda_build.kernel_source: preamble + kernels/common.cuh + the .cu source). The sources refuse
to compile (#error) when one is missing.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from rshard_hpc.ops.attention_checks import check_qkv, check_rows, check_scale
from rshard_hpc.ops.cuda_build import _blocks, _cupy, _kernel, _sm_count

MAX_HEAD_DIM = 256     # the largest head dimension accepted (both kernels are tested up to it)
SIMT_THREADS = 128     # threads per block of the CUDA-core kernel
SIMT_MAX_DPT = 64      # at most this many dimensions of q and o per thread of the CUDA-core kernel (registers)
SMEM_PAD = 8           # bf16 elements added to each shared row of the tensor-core kernel: a row is then an odd
#                        number of 16-byte chunks, so the 8 rows one ldmatrix reads lie in 8 different 16-byte bank
#                        groups (no bank conflicts)
SMEM_DEFAULT_LIMIT = 48 * 1024  # dynamic shared memory a launch gets without asking (CUDA); more must be asked for
ORDER_THREADS = 256    # threads per block of the preparation kernels (attention_order.cu, merge.cu: any size)


class MmaConfig(NamedTuple):
    """One configuration of the tensor-core kernel (kernels/partial_attention.cu, preprocessor defines)."""

    mt: int = 1        # MMA_MT: 16-row slabs per warp (more reuse of each K/V fragment, more registers)
    q_regs: int = 1    # Q_IN_REGS: Q fragments kept in registers (else re-read from shared memory per tile)
    warps: int = 4     # MMA_WARPS: warps per block sharing each K/V tile (query tile = 16 * mt * warps rows)
    bn: int = 64       # MMA_BN: keys per tile
    stages: int = 2    # MMA_STAGES: shared-memory K/V stages (loads issued stages - 1 tiles ahead)
    minb: int = 1      # MMA_MINB: blocks per multiprocessor the register allocation must allow


# head dim -> default configuration of the tensor-core kernel; a plain tuple is read as MmaConfig(*tuple)
# (bench.bench_variants measures the choices). D=64: 4 warps x 16 rows, 64-key tiles, 2 stages was the fastest
# of the configurations timed on the H200 (docs/bench_kernel_h200.md); D=128 was not re-timed after v4.
# Other head dims: one slab per warp, Q in registers up to D = 64.
MMA_CONFIG = {16: (2, 1), 32: (2, 1), 64: (1, 1), 128: (2, 0)}


def default_mma_config(head_dim: int) -> MmaConfig:
    return MmaConfig(*MMA_CONFIG.get(head_dim, (1, 1 if head_dim <= 64 else 0)))


class SimtKernel(NamedTuple):
    """attn_fwd_simt for one head dim and input dtype: tpr threads per query row."""

    head_dim: int
    bf16: bool
    tpr: int

    source = "partial_attention.cu"
    name = "attn_fwd_simt"
    threads = SIMT_THREADS
    smem_bytes = 0  # static shared memory only

    @property
    def bm(self) -> int:
        """Query rows per block."""
        return SIMT_THREADS // self.tpr

    @property
    def bn(self) -> int:
        """Keys per shared tile (static shared memory 2 * bn * D floats: 32 KiB at D = 256)."""
        return 16 if self.head_dim > 128 else 32

    def defines(self) -> dict:
        return {"ATTN_MMA": 0, "HEAD_DIM": self.head_dim, "IN_BF16": int(self.bf16), "SIMT_THREADS": SIMT_THREADS,
                "SIMT_TPR": self.tpr, "SIMT_BM": self.bm, "SIMT_BN": self.bn}


class MmaKernel(NamedTuple):
    """attn_fwd_mma (bf16 inputs) for one head dim and configuration."""

    head_dim: int
    cfg: MmaConfig

    source = "partial_attention.cu"
    name = "attn_fwd_mma"
    bf16 = True

    @property
    def threads(self) -> int:
        return 32 * self.cfg.warps

    @property
    def bm(self) -> int:
        """Query rows per block: mt slabs of 16 rows per warp."""
        return 16 * self.cfg.mt * self.cfg.warps

    @property
    def bn(self) -> int:
        return self.cfg.bn

    def smem_layout(self) -> dict:
        """Dynamic shared memory, byte offsets: sQ [bm][row] bf16 at 0, then sK and sV [stages][bn][row] bf16,
        sPos and sSeq [stages][bn] int32; SMEM_BYTES the total (the launch's shared_mem)."""
        row = self.head_dim + SMEM_PAD
        kv = self.cfg.stages * self.bn * row * 2
        ids = self.cfg.stages * self.bn * 4
        k = self.bm * row * 2
        return {"SMEM_ROW": row, "SMEM_K": k, "SMEM_V": k + kv, "SMEM_POS": k + 2 * kv,
                "SMEM_SEQ": k + 2 * kv + ids, "SMEM_BYTES": k + 2 * kv + 2 * ids}

    @property
    def smem_bytes(self) -> int:
        return self.smem_layout()["SMEM_BYTES"]

    def defines(self) -> dict:
        c = self.cfg
        return {"ATTN_MMA": 1, "HEAD_DIM": self.head_dim, "IN_BF16": 1, "MMA_MT": c.mt, "Q_IN_REGS": c.q_regs,
                "MMA_WARPS": c.warps, "MMA_THREADS": self.threads, "MMA_BM": self.bm, "MMA_BN": c.bn,
                "MMA_STAGES": c.stages, "MMA_MINB": c.minb, **self.smem_layout()}


def simt_tpr(head_dim: int) -> int | None:
    """Threads per query row of the CUDA-core kernel: the fewest (a power of 2, at most 32) that divide
    head_dim into slices of at most SIMT_MAX_DPT dimensions; None if there is none."""
    tpr = 1
    while head_dim // tpr > SIMT_MAX_DPT or head_dim % tpr:
        tpr *= 2
        if tpr > 32:
            return None
    return tpr


def choose_kernel(head_dim: int, bf16: bool, mma_config=None):
    """The kernel for this head dim and input dtype: MmaKernel for bf16 with head_dim % 16 == 0 (mma_config,
    a MmaConfig or tuple, else the default), else SimtKernel. ValueError for a head dim no kernel supports."""
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dimension {head_dim} is not supported by the GPU kernels (1 to {MAX_HEAD_DIM})")
    if bf16 and head_dim % 16 == 0:
        cfg = default_mma_config(head_dim) if mma_config is None else MmaConfig(*mma_config)
        return MmaKernel(head_dim, cfg)
    tpr = simt_tpr(head_dim)
    if tpr is None:
        raise ValueError(f"head dimension {head_dim} is not supported by the GPU kernels: above {SIMT_MAX_DPT} it must "
                         f"split into at most {SIMT_MAX_DPT} dimensions per thread (e.g. even up to "
                         f"{2 * SIMT_MAX_DPT}, a multiple of 4 up to {MAX_HEAD_DIM})")
    return SimtKernel(head_dim, bool(bf16), tpr)


def head_dim_classes(bf16: bool) -> dict:
    """{kernel class: [head dims]} over every head dim choose_kernel accepts (default configurations) for
    one input dtype. A class is one code path apart from D itself: (name, threads per row, key tile) of
    the CUDA-core kernel, (name, MmaConfig) of the tensor-core kernel. Tests run the ends of each class."""
    classes = {}
    for head_dim in range(1, MAX_HEAD_DIM + 1):
        try:
            kernel = choose_kernel(head_dim, bf16)
        except ValueError:
            continue
        key = (kernel.name, kernel.cfg) if isinstance(kernel, MmaKernel) else (kernel.name, kernel.tpr, kernel.bn)
        classes.setdefault(key, []).append(head_dim)
    return classes


def class_ends(bf16: bool) -> list:
    """The smallest and largest head dim of each class (head_dim_classes), sorted."""
    return sorted({d for dims in head_dim_classes(bf16).values() for d in (dims[0], dims[-1])})


# ---------------------------------------------------------------------------------------------- loading
def _load_attention_kernel(kernel):
    """The compiled function of a SimtKernel / MmaKernel, allowed its dynamic shared memory."""
    fn = _kernel(kernel.source, kernel.name, kernel.defines())
    if kernel.smem_bytes > SMEM_DEFAULT_LIMIT:
        fn.max_dynamic_shared_size_bytes = kernel.smem_bytes
    return fn


def _as_kernel_input(x):
    """(array for the kernel, is_bf16): contiguous float32, or contiguous uint16 bf16 bits."""
    cupy = _cupy()
    if x.dtype.name == "bfloat16":
        x = x.view(cupy.uint16)
    if x.dtype == cupy.float64:  # no fp64 kernel (the fp64 references live in the tests)
        x = x.astype(cupy.float32)
    bf16 = x.dtype == cupy.uint16
    x = cupy.ascontiguousarray(x, dtype=cupy.uint16 if bf16 else cupy.float32)
    if x.data.ptr % 16:  # a view at an odd offset: the tensor-core kernel loads 16-byte chunks
        x = x.copy()
    return x, bf16


# ---------------------------------------------------------------------------------------------- attention
POISON_OUTPUTS = False  # tests: fill outputs with NaN before the kernels run, so unwritten elements show


def prepare_attention(q_pos, q_seq, k_pos, k_seq, *, causal: bool, scale: float, mma_config=None):
    """A plan for partial attention over these rows (CuPy or NumPy ints; kept on the current device)."""
    return CudaAttentionPlan(q_pos, q_seq, k_pos, k_seq, causal=causal, scale=scale, mma_config=mma_config)


def partial_attention(q, q_pos, q_seq, k, v, k_pos, k_seq, causal: bool, scale: float):
    """One-shot prepare_attention(...)(q, k, v). q: (nq, Hq, D); k, v: (nk, Hkv, D)."""
    return prepare_attention(q_pos, q_seq, k_pos, k_seq, causal=causal, scale=scale)(q, k, v)


class CudaAttentionPlan:
    """The rows of one problem sorted by (sequence, position), once. The first call binds the plan to q's
    dtype and head dim: it picks the kernel (choose_kernel), compiles it (memoized per process) and makes the
    tile summaries for its tile sizes. Later calls with the same dtype and head dim only launch (the K/V
    gather and the kernel); another dtype or head dim is a ValueError (prepare another plan).

    mma_config: configuration of the tensor-core kernel, used when the calls are bf16 with D % 16 == 0.
    """

    def __init__(self, q_pos, q_seq, k_pos, k_seq, *, causal: bool, scale: float, mma_config=None):
        cupy = _cupy()
        self.scale = check_scale(scale)
        self.causal = bool(causal)
        self.mma_config = None if mma_config is None else MmaConfig(*mma_config)
        q_pos, q_seq, k_pos, k_seq = (cupy.asarray(a) for a in (q_pos, q_seq, k_pos, k_seq))
        self.nq = check_rows(q_pos, q_seq, "query")
        self.nk = check_rows(k_pos, k_seq, "key")
        empty = self.nq == 0 or self.nk == 0
        self.q_rows = None if empty else _SortedRows(q_pos, q_seq)
        self.k_rows = None if empty else _SortedRows(k_pos, k_seq)
        self.kernel = self.fn = self.tiles = None  # bound at the first call

    def __call__(self, q, k, v):
        """q: (nq, Hq, D); k, v: (nk, Hkv, D). Returns o: (nq, Hq, D) float32, lse: (nq, Hq) float32 (CuPy)."""
        cupy = _cupy()
        q, k, v = (cupy.asarray(a) for a in (q, k, v))
        check_qkv(q, k, v, self.nq, self.nk)
        nq, n_heads, head_dim = q.shape
        if self.q_rows is None:  # no query or no key: every row sees nothing
            o = cupy.zeros((nq, n_heads, head_dim), dtype=cupy.float32)
            return o, cupy.full((nq, n_heads), -cupy.inf, dtype=cupy.float32)
        (q, q_bf), (k, k_bf), (v, v_bf) = (_as_kernel_input(a) for a in (q, k, v))
        if not (q_bf == k_bf == v_bf):
            raise ValueError("q, k and v must all be bf16 or all be floating point")
        self._bind(head_dim, q_bf)
        return self._launch(q, k, v)

    def _bind(self, head_dim: int, bf16: bool):
        """Kernel and tile summaries for (head_dim, bf16), at the first call; later calls must match."""
        if self.kernel is None:
            kernel = choose_kernel(head_dim, bf16, self.mma_config)
            self.fn = _load_attention_kernel(kernel)
            self.tiles = _TileSummaries(self.q_rows, self.k_rows, self.causal, kernel.bm, kernel.bn)
            self.kernel = kernel
        elif (self.kernel.head_dim, self.kernel.bf16) != (head_dim, bf16):
            had = f"{'bf16' if self.kernel.bf16 else 'float32'} D={self.kernel.head_dim}"
            raise ValueError(f"this plan runs {had} (bound at its first call), not {'bf16' if bf16 else 'float32'} "
                             f"D={head_dim}; prepare another plan")

    def _launch(self, q, k, v):
        """o, lse from contiguous float32 or uint16 (bf16) q, k, v of the bound dtype."""
        cupy = _cupy()
        nq, n_heads, head_dim = q.shape
        n_kv = k.shape[1]
        t = self.tiles
        splits = key_splits(t.n_q_tiles * n_heads, -(-self.nk // self.kernel.bn))
        o = cupy.empty((splits, nq, n_heads, head_dim), dtype=cupy.float32)  # one partial per key share
        lse = cupy.empty((splits, nq, n_heads), dtype=cupy.float32)
        if POISON_OUTPUTS:
            o.fill(cupy.nan)
            lse.fill(cupy.nan)
        kr, qr = self.k_rows, self.q_rows
        if isinstance(self.kernel, MmaKernel):  # K, V gathered to (Hkv, nk_pad, D): contiguous key tiles
            k, v, nk_pad = _gather_kv(k, v, kr.idx, self.kernel.bn)
            second = np.int32(nk_pad)
        else:
            second = kr.idx
        args = (q, k, v, qr.idx, second, qr.pos, qr.seq, kr.pos, kr.seq, t.q_info, t.k_info, t.k_range, o, lse,
                np.int32(nq), np.int32(self.nk), np.int32(n_heads), np.int32(n_kv),
                np.float32(self.scale * math.log2(math.e)), np.int32(self.causal))
        self.fn((t.n_q_tiles, n_heads, splits), (self.kernel.threads,), args, shared_mem=self.kernel.smem_bytes)
        if splits == 1:
            return o[0], lse[0]
        return merge_partials(o, lse)  # exact merge of the key shares (kernels/merge.cu)


KEY_SPLIT_MAX = 32  # most blocks sharing one query tile's keys
KEY_SPLIT_MIN_TILES = 4  # fewest key tiles a share gets
KEY_SPLITS = None  # tests: force this many shares (else key_splits decides)


def key_splits(n_blocks: int, n_key_tiles: int) -> int:
    """How many blocks share each query tile's key tiles (flash-decoding): 1 when the grid of (query tile, head)
    blocks already fills the GPU; else enough shares for about two blocks an SM, each of at least
    KEY_SPLIT_MIN_TILES key tiles. Decode steps (a query tile per head) are the case this is for."""
    if KEY_SPLITS is not None:
        return int(KEY_SPLITS)
    sms = _sm_count()
    if n_blocks >= sms:
        return 1
    return max(1, min(-(-2 * sms // max(n_blocks, 1)), n_key_tiles // KEY_SPLIT_MIN_TILES, KEY_SPLIT_MAX))


def _gather_kv(k, v, k_idx, bn: int):
    """K, V (nk, Hkv, D) uint16 -> (Hkv, nk_pad, D) in sorted key order, zero rows up to nk_pad (bn | nk_pad)."""
    cupy = _cupy()
    nk, n_kv, head_dim = k.shape
    nk_pad = -(-nk // bn) * bn
    chunks = head_dim * 2 // 16  # 16-byte chunks (uint4) per row of bf16
    kg = cupy.empty((n_kv, nk_pad, head_dim), dtype=cupy.uint16)
    vg = cupy.empty_like(kg)
    _kernel("attention_order.cu", "gather_kv")(
        _blocks(n_kv * nk_pad * chunks, ORDER_THREADS), (ORDER_THREADS,),
        (k, v, k_idx, np.int32(nk), np.int32(nk_pad), np.int32(n_kv), np.int32(chunks), kg, vg))
    return kg, vg, nk_pad


class _SortedRows:
    """Rows sorted by (sequence, position) (kernels/attention_order.cu: two launches and a device sort).

    idx[slot] = original row of sorted slot; pos, seq, key: the sorted rows' values, all (n,)."""

    def __init__(self, pos, seq):
        cupy = _cupy()
        pos = cupy.ascontiguousarray(pos, dtype=cupy.int32)
        seq = cupy.ascontiguousarray(seq, dtype=cupy.int32)
        n = len(pos)
        key = cupy.empty(n, dtype=cupy.int64)
        grid = _blocks(n, ORDER_THREADS, most=4096)
        _kernel("attention_order.cu", "make_keys")(grid, (ORDER_THREADS,), (pos, seq, key, np.int32(n)))
        order = cupy.argsort(key)
        self.idx = cupy.empty(n, dtype=cupy.int32)
        self.pos, self.seq = cupy.empty_like(self.idx), cupy.empty_like(self.idx)
        self.key = cupy.empty_like(key)
        _kernel("attention_order.cu", "gather_sorted")(
            grid, (ORDER_THREADS,), (order, pos, seq, key, self.idx, self.pos, self.seq, self.key, np.int32(n)))


class _TileSummaries:
    """Per tile of bm sorted queries / bn sorted keys: q_info, k_info (n_tiles, 4) int32 tile summaries
    (kernels/common.cuh) and k_range (n_q_tiles, 2): the sorted keys the query tile may see."""

    def __init__(self, q_rows: _SortedRows, k_rows: _SortedRows, causal: bool, bm: int, bn: int):
        cupy = _cupy()
        nq, nk = len(q_rows.idx), len(k_rows.idx)
        self.n_q_tiles = -(-nq // bm)
        n_k_tiles = -(-nk // bn)
        self.q_info = cupy.empty((self.n_q_tiles, 4), dtype=cupy.int32)
        self.k_info = cupy.empty((n_k_tiles, 4), dtype=cupy.int32)
        self.k_range = cupy.empty((self.n_q_tiles, 2), dtype=cupy.int32)
        info = _kernel("attention_order.cu", "tile_info")
        for rows, tile, n_tiles, out in ((q_rows, bm, self.n_q_tiles, self.q_info),
                                         (k_rows, bn, n_k_tiles, self.k_info)):
            info(_blocks(n_tiles, ORDER_THREADS), (ORDER_THREADS,),
                 (rows.pos, rows.seq, np.int32(len(rows.idx)), np.int32(tile), np.int32(n_tiles), out))
        _kernel("attention_order.cu", "key_ranges")(
            _blocks(self.n_q_tiles, ORDER_THREADS), (ORDER_THREADS,),
            (q_rows.key, np.int32(nq), np.int32(bm), np.int32(self.n_q_tiles), k_rows.key, np.int32(nk),
             np.int32(bool(causal)), self.k_range))


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
    fn = _kernel("merge.cu", "merge_partials")
    fn(_blocks(total, ORDER_THREADS, most=65535 * 8), (ORDER_THREADS,),
       (o_parts, lse_parts, o, lse, np.int32(n_parts), np.int32(n), np.int32(n_heads), np.int32(head_dim), *so, *sl))
    return o, lse
