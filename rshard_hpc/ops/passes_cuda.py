"""The CompNode's per-token passes on CuPy arrays, each one launch of kernels/passes.cu (architecture.md §7).

Each function computes what its NumPy counterpart computes in several steps (models/common.py, the
RoPE of models/llama.py, ops/wire.py), in fp32 (kernels/passes.cu says where the results may differ by
fp32 rounding: row sums in another order, CUDA's cos/sin/exp/erf). Inputs are float32 CuPy arrays (made
contiguous float32 if they are not), except that rope_qk, silu_mul and pack read row-strided inputs in place
(`_strided_rows`: each row contiguous, rows a fixed stride apart, as column slices of one product's rows are);
outputs are new contiguous arrays. A `bits=True` call also returns the
output's bf16 bit patterns (uint16, exactly ops/precision.to_bf16_bits of the float32 output), for the next
matrix product under --dtype bfloat16. Loaded and compiled as the attention kernels are
(cuda_build.kernel_source: preamble + kernels/common.cuh + the source; compiled once per device).
"""
from __future__ import annotations

import functools

import numpy as np

from rshard_hpc.ops.cuda_build import _blocks, _cupy, _kernel
from rshard_hpc.ops.precision import BF16_NAN

SOURCE = "passes.cu"
PASS_THREADS = 256  # threads per block of every kernel in passes.cu (row kernels: one block per row)
MAX_ROW_BLOCKS = 65535  # row kernels stride over rows beyond this many blocks
POISON_OUTPUTS = False  # tests: fill outputs with NaN (bf16 bits: 0xFFFF) first, so unwritten elements show


def defines() -> dict:
    """The preamble passes.cu requires (every name is #error-checked there)."""
    return {"PASS_THREADS": PASS_THREADS, "BF16_NAN": BF16_NAN}


def _fn(name: str):
    """The compiled kernel `name` for the current device (looked up once per device, not per launch)."""
    return _function(name, _cupy().cuda.Device().id)


@functools.cache
def _function(name: str, device_id: int):
    return _kernel(SOURCE, name, defines())


def _f32(x):
    return _cupy().ascontiguousarray(x, dtype=_cupy().float32)


def _strided_rows(x):
    """x (n, ...) -> (x, ld): x itself when it is float32 with each row x[r] contiguous and row r at r * ld
    elements from row 0 (ld >= the row's size: a column slice of a wider row-major array, such as q, k, v of the
    fused q/k/v product), else a contiguous float32 copy (ld the row's size). No copy for a slice: a copy is a
    launch, what the fused products save."""
    row = 1
    for extent in x.shape[1:]:
        row *= extent
    if x.dtype == np.float32 and x.ndim >= 1 and _rows_contiguous(x.shape, x.strides, x.itemsize):
        if x.shape[0] <= 1:
            return x, row
        if x.strides[0] % x.itemsize == 0 and x.strides[0] >= row * x.itemsize:
            return x, x.strides[0] // x.itemsize
    return _f32(x), row


def _rows_contiguous(shape, strides, itemsize: int) -> bool:
    """Whether the axes after the first are C-contiguous (strides of axes of extent 1 do not matter)."""
    expect = itemsize
    for extent, stride in zip(reversed(shape[1:]), reversed(strides[1:])):
        if extent != 1 and stride != expect:
            return False
        expect *= extent
    return True


def _empty(shape, dtype):
    cupy = _cupy()
    out = cupy.empty(shape, dtype=dtype)
    if POISON_OUTPUTS:
        out.fill(0xFFFF if out.dtype == cupy.uint16 else cupy.nan)
    return out


def _or_null(a):
    """An optional array argument: the array, or a NULL pointer (8 zero bytes) for None."""
    return np.uint64(0) if a is None else a


def _launch_elementwise(name: str, total: int, args: tuple) -> None:
    if total:
        _fn(name)(_blocks(total, PASS_THREADS, MAX_ROW_BLOCKS * 8), (PASS_THREADS,), args)


def _rows_2d(x):
    """x (..., d) float32 contiguous -> (n, d) view and the original shape."""
    x = _f32(x)
    return x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x, x.shape


def rms_norm(x, weight, eps: float, residual=None, bits: bool = False):
    """x (n, d) (+ residual (n, d)) -> (h, y, y_bits): h = x + residual (None without residual),
    y = RMSNorm(h) * weight float32, y_bits its bf16 bits (None unless bits)."""
    cupy = _cupy()
    x, shape = _rows_2d(x)
    n, d = x.shape
    r = None if residual is None else _f32(residual).reshape(n, d)
    h = None if r is None else _empty(x.shape, cupy.float32)
    y = _empty(x.shape, cupy.float32)
    y_bits = _empty((n, d), cupy.uint16) if bits else None
    if n and d:
        _fn("rms_norm_rows")((min(n, MAX_ROW_BLOCKS),), (PASS_THREADS,),
                             (x, _or_null(r), _f32(weight), _or_null(h), y, _or_null(y_bits), np.int32(n),
                              np.int32(d), np.float32(eps)))
    reshape = (lambda a: None if a is None else a.reshape(shape))
    return reshape(h), reshape(y), reshape(y_bits)


def layer_norm(x, weight, bias, eps: float, residual=None, residual_bias=None):
    """LayerNorm(x + (residual + residual_bias)) * weight + bias, float32; x, residual (n, d); biases (d,)."""
    cupy = _cupy()
    x, shape = _rows_2d(x)
    n, d = x.shape
    r = None if residual is None else _f32(residual).reshape(n, d)
    rb = None if residual is None or residual_bias is None else _f32(residual_bias)
    y = _empty(x.shape, cupy.float32)
    if n and d:
        _fn("layer_norm_rows")((min(n, MAX_ROW_BLOCKS),), (PASS_THREADS,),
                               (x, _or_null(r), _or_null(rb), _f32(weight), _f32(bias), y, np.int32(n),
                                np.int32(d), np.float32(eps)))
    return y.reshape(shape)


def rope_positions(pos):
    """A step's positions as the rope kernel reads them: contiguous int32 on the device (once a step)."""
    cupy = _cupy()
    return cupy.ascontiguousarray(cupy.asarray(pos), dtype=cupy.int32)


def rope_qk(q, k, pos32, inv_freq):
    """q (n, Hq, D), k (n, Hk, D) -> both rotated (HF rotate_half, fp32) in one launch, as new contiguous arrays;
    pos32 from rope_positions, inv_freq (D/2,) float32. q and k may be row-strided (column slices of the fused
    q/k/v product): read in place."""
    cupy = _cupy()
    (q, q_ld), (k, k_ld) = _strided_rows(q), _strided_rows(k)
    n, hq, head_dim = q.shape
    if head_dim % 2 or k.shape[0] != n or k.shape[2] != head_dim or pos32.shape != (n,):
        raise ValueError(f"rope_qk: q {q.shape}, k {k.shape}, pos {pos32.shape} (an even head dim, one pos a row)")
    half = head_dim // 2
    qo, ko = _empty(q.shape, cupy.float32), _empty(k.shape, cupy.float32)
    _launch_elementwise("rope_qk", n * (hq + k.shape[1]) * half,
                        (q, k, pos32, _f32(inv_freq), qo, ko, np.int32(n), np.int32(hq), np.int32(k.shape[1]),
                         np.int32(half), np.int64(q_ld), np.int64(k_ld)))
    return qo, ko


def silu_mul(gate, up, bits: bool = False):
    """silu(gate) * up, float32 (a new contiguous array), and (when bits) its bf16 bits; gate, up of one shape
    (n, ...), each may be row-strided (the two column halves of the fused gate/up product): read in place."""
    cupy = _cupy()
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul: gate {gate.shape} and up {up.shape} differ")
    (gate, gate_ld), (up, up_ld) = _strided_rows(gate), _strided_rows(up)
    out = _empty(gate.shape, cupy.float32)
    out_bits = _empty(gate.shape, cupy.uint16) if bits else None
    row = gate.size // gate.shape[0] if gate.size else 0
    _launch_elementwise("silu_mul", gate.size, (gate, up, out, _or_null(out_bits), np.int64(gate.size),
                                                np.int32(row), np.int64(gate_ld), np.int64(up_ld)))
    return out, out_bits


def bias_gelu(y, bias, inv_sqrt2: float, bits: bool = False):
    """gelu(y + bias) (erf form; inv_sqrt2 the float32 1/sqrt(2) of models/common.gelu), float32, and
    (when bits) its bf16 bits; y (n, d), bias (d,)."""
    cupy = _cupy()
    y = _f32(y)
    bias = _f32(bias)
    if bias.shape != (y.shape[-1],):
        raise ValueError(f"bias_gelu: bias {bias.shape} does not fit y {y.shape}")
    out = _empty(y.shape, cupy.float32)
    out_bits = _empty(y.shape, cupy.uint16) if bits else None
    _launch_elementwise("bias_gelu", y.size, (y, bias, out, _or_null(out_bits), np.int64(y.size), np.int32(y.shape[-1]),
                                              np.float32(inv_sqrt2)))
    return out, out_bits


def pack(q, k, v, src, unit: int, wire):
    """The send buffer (flat, wire dtype) whose unit u (`unit` elements) is unit src[u] of q, k, v read as
    one sequence of units (q's, then k's, then v's); bf16 wire: the values' bf16 bits. q (n, ...), k, v
    (n, ...) may be row-strided (column slices of the fused q/k/v product): read in place."""
    cupy = _cupy()
    (q, q_ld), (k, k_ld), (v, v_ld) = _strided_rows(q), _strided_rows(k), _strided_rows(v)
    gq, gk = (a.size // a.shape[0] // unit if a.size else 1 for a in (q, k))  # units a row
    bf16 = np.dtype(wire) == np.uint16
    out = _empty(len(src) * unit, cupy.uint16 if bf16 else cupy.float32)
    _launch_elementwise("pack_bf16" if bf16 else "pack_f32", out.size,
                        (q, k, v, src, out, np.int64(out.size), np.int32(unit), np.int64(q.size // unit),
                         np.int64(k.size // unit), np.int32(gq), np.int32(gk), np.int64(q_ld), np.int64(k_ld),
                         np.int64(v_ld)))
    return out


def unpack_merge(recv, src, parts: int, n: int, n_heads: int, head_dim: int, slots: int, wire):
    """o (n, H, D) float32: the exact merge over `parts` partials, part p of local row r being recv row
    src[p * n + r] (rows of n_heads * slots wire elements: o then lse per head)."""
    cupy = _cupy()
    bf16 = np.dtype(wire) == np.uint16
    recv = cupy.ascontiguousarray(recv, dtype=cupy.uint16 if bf16 else cupy.float32)
    o = _empty((n, n_heads, head_dim), cupy.float32)
    if parts == 0:
        o.fill(0)
        return o
    _launch_elementwise("unpack_merge_bf16" if bf16 else "unpack_merge_f32", o.size,
                        (recv, src, o, np.int32(parts), np.int32(n), np.int32(n_heads), np.int32(head_dim),
                         np.int32(slots)))
    return o
