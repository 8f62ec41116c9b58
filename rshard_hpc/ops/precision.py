"""Engine precision (`--dtype float32|bfloat16`) and the bf16 pieces it needs, on NumPy and CuPy alike.

bfloat16 here means: every matrix product of a layer (Q/K/V, O-projection, MLP) takes bf16 inputs and
accumulates in fp32; q, k and v travel to the AttnNodes as bf16 (half the bytes) and the attention kernel
multiplies in bf16 with fp32 softmax and accumulation; the partial o returns as bf16 beside its fp32 lse.
Norms, residuals, RoPE, biases, embeddings, lse and the merge stay fp32. The NumPy path computes the same function: it rounds
the same operands to bf16 and multiplies the rounded values in fp32.

bf16 arrays are held as uint16 bit patterns (CuPy has no bfloat16 dtype).
"""
from __future__ import annotations

import numpy as np

from rshard_hpc.ops.arrays import xp_of

DTYPES = ("float32", "bfloat16")
BF16_NAN = 0x7FC0

_CUDA_R_32F, _CUDA_R_16BF = 0, 14  # cudaDataType_t
_CUBLAS_COMPUTE_32F = 68  # cublasComputeType_t
_CUBLAS_OP_N, _CUBLAS_OP_T = 0, 1
_CUBLAS_GEMM_DEFAULT = -1


def check_dtype(name: str) -> str:
    if name not in DTYPES:
        raise ValueError(f"unknown engine dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return name


def wire_dtype(name: str):
    """The element type of q/k/v on the wire: float32, or uint16 bf16 bits."""
    return np.uint16 if check_dtype(name) == "bfloat16" else np.float32


def partial_slots(head_dim: int, wire) -> int:
    """Wire elements per (row, head) of a returned partial, o then lse: D + 1 float32, or D bf16 plus the
    fp32 lse carried as two uint16 halves (the lse is never rounded)."""
    return head_dim + (2 if np.dtype(wire) == np.uint16 else 1)


def pack_partial(o, lse, wire):
    """o (n, H, D) f32, lse (n, H) f32 -> (n, H, partial_slots) of the wire's element type."""
    xp = xp_of(o)
    if np.dtype(wire) == np.uint16:
        lse_halves = xp.ascontiguousarray(lse, dtype=xp.float32)[..., None].view(xp.uint16)  # (n, H, 2)
        return xp.concatenate([to_bf16_bits(o), lse_halves], axis=-1)
    return xp.concatenate([o.astype(xp.float32, copy=False), lse[..., None]], axis=-1)


def unpack_partial(packed, wire):
    """(..., partial_slots) -> o (..., D) float32, lse (...) float32."""
    xp = xp_of(packed)
    if np.dtype(wire) == np.uint16:
        lse = xp.ascontiguousarray(packed[..., -2:]).view(xp.float32)[..., 0]
        return bf16_bits_to_float(packed[..., :-2]), lse
    return packed[..., :-1], packed[..., -1]


# ---------------------------------------------------------------------------------------------- rounding
_to_bits_gpu = None


def to_bf16_bits(x):
    """float array (NumPy or CuPy) -> uint16 bf16 bit patterns, rounded to nearest even; NaN stays NaN."""
    xp = xp_of(x)
    if xp is not np:
        return _gpu_to_bits(x)
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
    out = (rounded >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(BF16_NAN), out)


def _gpu_to_bits(x):
    global _to_bits_gpu
    import cupy

    if _to_bits_gpu is None:
        _to_bits_gpu = cupy.ElementwiseKernel(
            "float32 x", "uint16 y",
            "unsigned int b = __float_as_uint(x);"
            f"y = isnan(x) ? {BF16_NAN} : (unsigned short)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);",
            "rshard_to_bf16_bits")
    return _to_bits_gpu(cupy.ascontiguousarray(x, dtype=cupy.float32))


def bf16_bits_to_float(bits):
    """uint16 bf16 bit patterns -> float32 values (exact)."""
    xp = xp_of(bits)
    return (xp.ascontiguousarray(bits).astype(xp.uint32) << 16).view(xp.float32)


def round_bf16(x):
    """float32 values rounded to the nearest bf16 (as float32)."""
    return bf16_bits_to_float(to_bf16_bits(x))


# ---------------------------------------------------------------------------------------------- GEMM
class Bf16Matrix:
    """A weight (out, in) held in bf16. `rmatmul_t(x)` gives x @ Wᵀ: bf16 inputs, fp32 accumulation and
    output. On CuPy one cuBLAS gemmEx; on NumPy the rounded values multiplied in fp32."""

    def __init__(self, weight, xp=np):
        weight = xp.asarray(weight, dtype=xp.float32)
        if weight.ndim != 2:
            raise ValueError(f"Bf16Matrix needs a 2-D weight, got shape {weight.shape}")
        self.xp = xp
        self.shape = weight.shape
        self.bits = to_bf16_bits(weight)  # (out, in) uint16
        self.values = bf16_bits_to_float(self.bits) if xp is np else None  # NumPy path multiplies these

    def rmatmul_t(self, x, accumulate=None):
        """x: (n, in) float or a Bf16Input -> (n, out) float32 (added into accumulate: matmul_t)."""
        if x.shape[-1] != self.shape[1]:
            raise ValueError(f"shape mismatch: x {x.shape} against weight {self.shape}")
        operand = x.operand if isinstance(x, Bf16Input) else Bf16Input(x).operand
        if self.xp is np:
            return _add_into(accumulate, operand @ self.values.T)
        operand = xp_of(operand).ascontiguousarray(operand)
        if _accumulates(accumulate, operand.shape[0], self.shape[0]):
            return _gemm_t(operand, self.bits, bf16=True, accumulate=accumulate)
        return _add_into(accumulate, _gemm_t(operand, self.bits, bf16=True))


class Bf16Input:
    """An activation rounded to bf16 once for the products that share it (q, k, v of one input; gate and
    up): `operand` is the rounded float32 values on NumPy, the uint16 bits on CuPy."""

    def __init__(self, x):
        self.source, self.shape = x, x.shape
        self.operand = round_bf16(x) if xp_of(x) is np else _gpu_to_bits(x)

    @classmethod
    def rounded(cls, x, operand) -> Bf16Input:
        """x with its operand already made (a fused kernel's bf16 output): what Bf16Input(x) would hold."""
        new = cls.__new__(cls)
        new.source, new.shape, new.operand = x, x.shape, operand
        return new


def gemm_input(x, weight):
    """x prepared for several products with weights like `weight`: rounded once when those are bf16."""
    return Bf16Input(x) if isinstance(weight, Bf16Matrix) else x


def matmul_t(x, weight, accumulate=None):
    """x @ weightᵀ for plain arrays, a Bf16Matrix weight and/or a Bf16Input x (the one place model math
    multiplies by a weight). accumulate: an (n, out) float32 array the product is added into, in place, and
    returned (accumulate + x @ weightᵀ, each element one fp32 addition): on a GPU cuBLAS's beta = 1, the residual
    add without a launch of its own."""
    if isinstance(weight, Bf16Matrix):
        return weight.rmatmul_t(x, accumulate)
    if isinstance(x, Bf16Input):
        x = x.source
    if _sgemm_fits(x, weight) and _accumulates(accumulate, x.shape[0], weight.shape[0]):
        return _gemm_t(x, weight, accumulate=accumulate)
    return _add_into(accumulate, x @ weight.T)


def _accumulates(accumulate, n: int, m: int) -> bool:
    """Whether _gemm_t can add into `accumulate` (none, or a C-contiguous float32 CuPy array (n, m))."""
    return accumulate is None or (xp_of(accumulate) is not np and accumulate.shape == (n, m)
                                  and accumulate.dtype == np.float32 and accumulate.flags.c_contiguous)


def _add_into(accumulate, y):
    """y, or accumulate += y returned (the product computed on its own)."""
    if accumulate is None:
        return y
    accumulate += y
    return accumulate


def _sgemm_fits(x, weight) -> bool:
    """A float32 product _gemm_t computes: 2-D float32 CuPy arrays, both C-contiguous ((n, in) and (out, in))."""
    return (xp_of(x) is not np and x.ndim == 2 and weight.ndim == 2 and x.dtype == np.float32
            and weight.dtype == np.float32 and x.flags.c_contiguous and weight.flags.c_contiguous)


def _gemm_t(x, w, bf16: bool = False, accumulate=None):
    """CuPy: y (n, out) = x @ Wᵀ in one cuBLAS call, fp32 compute and output, for C-contiguous x (n, in) and
    W (out, in): cublasSgemm of float32 arrays, or (bf16) cublasGemmEx of bf16 bit patterns (uint16). One call
    rather than CuPy's matmul dispatch (tens of microseconds a call, four a layer: what a decode step waits on).
    accumulate (_accumulates): y is that array, the product added to it (beta = 1)."""
    import cupy
    from cupy_backends.cuda.libs import cublas

    n, k = x.shape
    m = w.shape[0]
    if w.shape[1] != k:
        raise ValueError(f"shape mismatch: x {x.shape} against weight {w.shape}")
    y = cupy.empty((n, m), dtype=cupy.float32) if accumulate is None else accumulate
    beta = _ZERO if accumulate is None else _ONE
    if n == 0 or m == 0:
        return y
    if k == 0:
        if accumulate is None:
            y.fill(0)
        return y
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    # column-major view: yᵀ (m, n) = W (m, k) · xᵀ (k, n); W row-major (m, k) is column-major Wᵀ, ld k
    if bf16:
        cublas.gemmEx(handle, _CUBLAS_OP_T, _CUBLAS_OP_N, m, n, k,
                      _ONE.ctypes.data, w.data.ptr, _CUDA_R_16BF, k,
                      x.data.ptr, _CUDA_R_16BF, k,
                      beta.ctypes.data, y.data.ptr, _CUDA_R_32F, m,
                      _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT)
    else:
        cublas.sgemm(handle, _CUBLAS_OP_T, _CUBLAS_OP_N, m, n, k, _ONE.ctypes.data, w.data.ptr, k, x.data.ptr, k,
                     beta.ctypes.data, y.data.ptr, m)
    return y


_ONE, _ZERO = np.ones(1, np.float32), np.zeros(1, np.float32)  # the host scalars of the GEMM calls


def bf16_weights(tensors: dict, names, xp=np) -> dict:
    """tensors with every key in `names` (2-D weights) replaced by a Bf16Matrix on `xp`."""
    out = dict(tensors)
    for key in names:
        out[key] = Bf16Matrix(tensors[key], xp)
    return out
