"""A Llama CompNode's layer for a step of a few rows on CuPy (kernels/small_rows.cu, architecture.md §7, issue 13).

A decode step gives the CompNode that holds the new token one row. Through cuBLAS and the row kernels of
passes.cu its layer was about ten launches (0.35-0.55 ms of host time a layer on the H200, most of a decode
step); here it is three launches besides the wire's two: the norm goes into the product after it, RoPE and
SiLU * up into the product before them, the residual adds into the O and down products. Same function as
models/llama.py's pre and post on float32 CuPy arrays within fp32 rounding (the products' sums in another
order than cuBLAS; the norms, RoPE and SiLU * up are passes.cu's arithmetic).

`takes(h)` decides for rows the fused kernels take (models/common.fused): at most MAX_ROWS of them
(RSHARD_SMALL_ROWS, default 8; 0 turns these kernels off alone), while the small-step kernels are on
(decode_cuda.ENV_VAR=0 turns both sides of a small step off). Weights are float32 arrays or precision.Bf16Matrix.
"""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager

import numpy as np

from rshard_hpc.ops import decode_cuda
from rshard_hpc.ops.cuda_build import _blocks, _cupy, _kernel
from rshard_hpc.ops.passes_cuda import PASS_THREADS, _empty  # _empty: NaN-filled under passes_cuda.POISON_OUTPUTS
from rshard_hpc.ops.precision import BF16_NAN, Bf16Matrix

SOURCE = "small_rows.cu"
SMALL_ROWS = 8  # rows a lane holds partial sums for at once (registers); more rows take further passes
ENV_VAR = "RSHARD_SMALL_ROWS"  # the most rows a step may have to take these kernels ("0": never; benchmarks' A/B)
MAX_ROWS = int(os.environ.get(ENV_VAR, "8"))  # larger steps take cuBLAS (products worth a GEMM)
WARPS = PASS_THREADS // 32  # warps a block: one output column (or column pair) each


def defines() -> dict:
    """The preamble small_rows.cu requires (every name is #error-checked there)."""
    return {"PASS_THREADS": PASS_THREADS, "BF16_NAN": BF16_NAN, "SMALL_ROWS": SMALL_ROWS}


def takes(h) -> bool:
    """Whether fused rows h (n, d) take these kernels: 1 <= n <= MAX_ROWS while the small-step kernels are on."""
    return decode_cuda.ENABLED and 1 <= h.shape[0] <= MAX_ROWS


@contextmanager
def off():
    """Within: every step takes the cuBLAS path (the benchmark's before/after in one process)."""
    global MAX_ROWS
    saved, MAX_ROWS = MAX_ROWS, 0
    try:
        yield
    finally:
        MAX_ROWS = saved


@functools.cache
def _function(name: str, device_id: int):
    return _kernel(SOURCE, name, defines())


def _launch(name: str, units: int, args: tuple) -> None:
    """name on enough blocks for `units` warps of work (columns or column pairs)."""
    _function(name, _cupy().cuda.Device().id)(_blocks(units, WARPS), (PASS_THREADS,), args)


def _weight(matrix):
    """(the weight's device array, kernel suffix): a Bf16Matrix's bits ("bf16") or a float32 array ("f32")."""
    if isinstance(matrix, Bf16Matrix):
        return matrix.bits, "bf16"
    if matrix.dtype != np.float32 or not matrix.flags.c_contiguous:
        raise ValueError(f"small-rows products take C-contiguous float32 or bf16 weights, got {matrix.dtype}")
    return matrix, "f32"


def _rows(x, d: int):
    """x as contiguous float32 (n, d)."""
    x = _cupy().ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"small-rows products: rows of shape {x.shape}, expected (n, {d})")
    return x


def norm_rope(h, norm_w, eps: float, matrix, pos32, inv_freq, heads: int, rot_heads: int, head_dim: int):
    """RMSNorm(h) @ matrixᵀ with RoPE on the first rot_heads heads: h (n, d) -> (n, heads * head_dim) float32.
    matrix (heads * head_dim, d) (the fused q/k/v weight: q's heads, k's, then v's, unrotated); pos32 the rows'
    positions as passes_cuda.rope_positions gives them, inv_freq (head_dim / 2,) float32."""
    w, kind = _weight(matrix)
    n, d = h.shape
    if w.shape != (heads * head_dim, d) or head_dim % 2 or pos32.shape != (n,):
        raise ValueError(f"norm_rope: weight {w.shape}, heads {heads} x {head_dim}, rows {h.shape}, pos {pos32.shape}")
    out = _empty((n, heads * head_dim), np.float32)
    half = head_dim // 2
    _launch(f"norm_rope_{kind}", heads * half,
            (_rows(h, d), norm_w, np.float32(eps), w, pos32, inv_freq, out, np.int32(n), np.int32(d),
             np.int32(heads), np.int32(rot_heads), np.int32(half)))
    return out


def norm_silu(h, norm_w, eps: float, matrix):
    """silu(g) * u with (g, u) the two column halves of RMSNorm(h) @ matrixᵀ: h (n, d), matrix (2 f, d) (the fused
    gate/up weight) -> (n, f) float32."""
    w, kind = _weight(matrix)
    n, d = h.shape
    if w.shape[1] != d or w.shape[0] % 2:
        raise ValueError(f"norm_silu: weight {w.shape} for rows {h.shape} (an even number of rows, d columns)")
    f = w.shape[0] // 2
    out = _empty((n, f), np.float32)
    _launch(f"norm_silu_{kind}", f, (_rows(h, d), norm_w, np.float32(eps), w, out, np.int32(n), np.int32(d),
                                     np.int32(f)))
    return out


def linear(x, matrix, residual=None):
    """x @ matrixᵀ (+ residual): x (n, d), matrix (m, d), residual (n, m) -> (n, m) float32."""
    w, kind = _weight(matrix)
    m, d = w.shape
    x = _rows(x, d)
    n = x.shape[0]
    res = None if residual is None else _rows(residual, m)
    if res is not None and res.shape[0] != n:
        raise ValueError(f"linear: residual {res.shape} for rows {x.shape}")
    out = _empty((n, m), np.float32)
    _launch(f"linear_rows_{kind}", m, (x, w, np.uint64(0) if res is None else res, out, np.int32(n), np.int32(d),
                                       np.int32(m)))
    return out
