"""Per-token building blocks shared by the model families (NumPy or CuPy arrays)."""
from __future__ import annotations

import numpy as np

from rshard_hpc.ops.arrays import xp_of
from rshard_hpc.ops.precision import bf16_weights, check_dtype, matmul_t


def layer_norm(x, weight, bias, eps: float):
    """x: (n, d) -> (n, d), statistics in fp32."""
    xp = xp_of(x)
    x32 = x.astype(xp.float32)
    mean = x32.mean(axis=-1, keepdims=True)
    var = ((x32 - mean) ** 2).mean(axis=-1, keepdims=True)
    return ((x32 - mean) / xp.sqrt(var + xp.float32(eps)) * weight + bias).astype(x.dtype)


def rms_norm(x, weight, eps: float):
    """x: (n, d) -> (n, d), statistics in fp32."""
    xp = xp_of(x)
    x32 = x.astype(xp.float32)
    scale = 1.0 / xp.sqrt((x32 * x32).mean(axis=-1, keepdims=True) + xp.float32(eps))
    return (x32 * scale).astype(x.dtype) * weight


def erf_of(xp):
    """SciPy's erf for NumPy arrays, cupyx's for CuPy. scipy.special takes about a second to import: a model
    that uses it asks for it when it is built, so that the import is start-up, not its first forward's time."""
    if xp is np:
        from scipy.special import erf
    else:
        from cupyx.scipy.special import erf
    return erf


def gelu(x):
    """Exact (erf) GELU, as BERT uses."""
    erf = erf_of(xp_of(x))
    return (x * 0.5 * (1.0 + erf(x * np.float32(1.0 / np.sqrt(2.0))))).astype(x.dtype)


def silu(x):
    xp = xp_of(x)
    return (x / (1.0 + xp.exp(-x))).astype(x.dtype)


def linear(x, weight, bias=None):
    """x: (n, in) (or a precision.Bf16Input); weight: (out, in) as stored, an array or a
    precision.Bf16Matrix; -> (n, out)."""
    y = matmul_t(x, weight)
    return y if bias is None else y + bias


def place_tensors(tensors: dict, xp, dtype: str, matrix_keys) -> dict:
    """The model's tensors on `xp`: float32 arrays, except that for dtype "bfloat16" the weights named in
    `matrix_keys` become bf16 matrices (precision.Bf16Matrix: bf16 inputs, fp32 accumulation).
    dtype "float64" (test references) keeps everything in float64."""
    if dtype == "float64":
        return {k: xp.asarray(v, dtype=xp.float64) for k, v in tensors.items()}
    check_dtype(dtype)
    placed = {k: xp.asarray(v, dtype=xp.float32) for k, v in tensors.items()}
    if dtype == "bfloat16":
        placed = bf16_weights(placed, [k for k in matrix_keys if k in placed], xp)
    return placed
