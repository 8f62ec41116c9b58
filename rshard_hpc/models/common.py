"""Per-token building blocks shared by the model families (NumPy or CuPy arrays).

The one switch to the fused kernels: float32 CuPy arrays go to ops/passes_cuda.py (kernels/passes.cu, one
launch each) while FUSED is true (`chained()` turns it off, for the benchmark's comparison with the CuPy
chain); NumPy arrays and other dtypes (the float64 references) take the array code here. The `*_input`
functions return the next matrix product's input (precision.gemm_input: rounded to bf16 once when that
weight is a Bf16Matrix), so the fused kernel writes the rounding in the same launch.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from rshard_hpc.models import weights
from rshard_hpc.ops.arrays import xp_of
from rshard_hpc.ops.gelu_host import gelu_float32
from rshard_hpc.ops.precision import (
    Bf16Input,
    Bf16Matrix,
    bf16_weights,
    check_dtype,
    gemm_input,
    matmul_t,
)

FUSED = True  # float32 CuPy arrays take kernels/passes.cu (False: the CuPy chain of the array code below)
GELU_INV_SQRT2 = np.float32(1.0 / np.sqrt(2.0))  # erf's argument scale in gelu (also the fused kernel's)


def fused(x) -> bool:
    """Whether x takes the fused kernels: a float32 CuPy array while FUSED."""
    return fused_arrays(xp_of(x)) and x.dtype == np.float32


def fused_arrays(xp) -> bool:
    """Whether float32 arrays of the module xp take the fused kernels (CuPy, while FUSED)."""
    return FUSED and xp is not np


@contextmanager
def chained():
    """Within: CuPy arrays take the array code (a chain of CuPy operations), as before the fused kernels."""
    global FUSED
    saved, FUSED = FUSED, False
    try:
        yield
    finally:
        FUSED = saved


def _fused_input(out, bits, weight):
    """A fused kernel's output as the input of a product with `weight` (its bf16 bits when that is bf16)."""
    return Bf16Input.rounded(out, bits) if isinstance(weight, Bf16Matrix) else out


def layer_norm(x, weight, bias, eps: float, residual=None, residual_bias=None):
    """x: (n, d) -> (n, d), statistics in fp32: LayerNorm(x + (residual + residual_bias)) when residual
    (n, d) is given (residual_bias (d,) optional): a residual add and a bias fused before the norm."""
    xp = xp_of(x)
    if fused(x):
        from rshard_hpc.ops import passes_cuda

        return passes_cuda.layer_norm(x, weight, bias, eps, residual, residual_bias)
    if xp is np and x.ndim == 2 and _all_float32(x, residual, residual_bias):
        return _layer_norm_host(x, weight, bias, eps, residual, residual_bias)
    if residual is not None:
        x = x + (residual if residual_bias is None else residual + residual_bias)
    x32 = x.astype(xp.float32)
    mean = x32.mean(axis=-1, keepdims=True)
    var = ((x32 - mean) ** 2).mean(axis=-1, keepdims=True)
    return ((x32 - mean) / xp.sqrt(var + xp.float32(eps)) * weight + bias).astype(x.dtype)


def _all_float32(*arrays) -> bool:
    """Whether every array given (None: not given) is float32: what the in-place host LayerNorm sums in."""
    return all(a is None or a.dtype == np.float32 for a in arrays)


def _layer_norm_host(x, weight, bias, eps: float, residual=None, residual_bias=None):
    """layer_norm of float32 NumPy rows x (n, d) in one buffer, in place (2.2x the array expression's speed at
    1,365 x 384): the kernel's order of operations, x + (residual + residual_bias), mean, var of the centred rows,
    (v - mean) / sqrt(var + eps) * weight + bias."""
    if residual is None:
        v = x.copy()
    else:
        v = residual + residual_bias if residual_bias is not None else residual.copy()
        v += x
    d = np.float32(v.shape[-1])
    mean = v.sum(axis=-1, keepdims=True)
    mean /= d
    v -= mean
    den = np.einsum("ij,ij->i", v, v)[:, None]  # (n, 1): Σ (v - mean)², without a temporary of v's size
    den /= d
    den += np.float32(eps)
    np.sqrt(den, out=den)
    v /= den
    v *= weight
    v += bias
    return v


def rms_norm(x, weight, eps: float):
    """x: (n, d) -> (n, d), statistics in fp32."""
    xp = xp_of(x)
    if fused(x):
        from rshard_hpc.ops import passes_cuda

        return passes_cuda.rms_norm(x, weight, eps)[1]
    x32 = x.astype(xp.float32)
    scale = 1.0 / xp.sqrt((x32 * x32).mean(axis=-1, keepdims=True) + xp.float32(eps))
    return (x32 * scale).astype(x.dtype) * weight


def rms_norm_input(x, weight, eps: float, matrix, residual=None):
    """(h, gemm_input(rms_norm(h, weight, eps), matrix)) with h = x + residual (x without residual): the
    residual add, the norm and the rounding for the products with `matrix` in one launch on CuPy."""
    if fused(x):
        from rshard_hpc.ops import passes_cuda

        h, y, bits = passes_cuda.rms_norm(x, weight, eps, residual, bits=isinstance(matrix, Bf16Matrix))
        return (x if h is None else h), _fused_input(y, bits, matrix)
    h = x if residual is None else x + residual
    return h, gemm_input(rms_norm(h, weight, eps), matrix)


def erf_of(xp):
    """SciPy's erf for NumPy arrays, cupyx's for CuPy. scipy.special takes about a second to import: a model
    that uses it asks for it when it is built, so that the import is start-up, not its first forward's time."""
    if xp is np:
        from scipy.special import erf
    else:
        from cupyx.scipy.special import erf
    return erf


def gelu(x, bias=None):
    """Exact (erf) GELU of x + bias (bias (d,) optional), as BERT uses: where that sum is float32 NumPy, through
    ops/gelu_host.py (written with erfc, within 1.3e-7 of float64 GELU, 4x scipy's speed, the bias added in
    its pass), other arrays through SciPy's / cupyx's erf."""
    xp = xp_of(x)
    if xp is np and np.result_type(x, *(() if bias is None else (bias,))) == np.float32:
        return gelu_float32(x, GELU_INV_SQRT2, bias=bias)
    if bias is not None:
        x = x + bias
    return (x * 0.5 * (1.0 + erf_of(xp)(x * GELU_INV_SQRT2))).astype(x.dtype)


def gelu_input(y, bias, matrix):
    """gemm_input(gelu(y + bias), matrix): bias, GELU and the rounding for `matrix` in one launch on CuPy."""
    if fused(y):
        from rshard_hpc.ops import passes_cuda

        out, bits = passes_cuda.bias_gelu(y, bias, GELU_INV_SQRT2, bits=isinstance(matrix, Bf16Matrix))
        return _fused_input(out, bits, matrix)
    return gemm_input(gelu(y, bias), matrix)


def silu(x):
    xp = xp_of(x)
    return (x / (1.0 + xp.exp(-x))).astype(x.dtype)


def silu_mul_input(gate, up, matrix):
    """gemm_input(silu(gate) * up, matrix): SwiGLU's product and the rounding for `matrix` in one launch on
    CuPy."""
    if fused(gate):
        from rshard_hpc.ops import passes_cuda

        out, bits = passes_cuda.silu_mul(gate, up, bits=isinstance(matrix, Bf16Matrix))
        return _fused_input(out, bits, matrix)
    return gemm_input(silu(gate) * up, matrix)


def linear(x, weight, bias=None, residual=None):
    """x: (n, in) (or a precision.Bf16Input); weight: (out, in) as stored, an array or a
    precision.Bf16Matrix; -> (n, out). residual: an (n, out) float32 array the product is added into, in place,
    and returned (pass only one that nothing else holds; on a GPU the add costs no launch: matmul_t)."""
    if residual is not None and bias is not None:
        raise ValueError("linear: a bias and a residual together are not supported")
    y = matmul_t(x, weight, accumulate=residual)
    return y if bias is None else y + bias


def concat_rows(tensors: dict, n_layers: int, groups: dict) -> dict:
    """tensors with, in each layer, each group {new name: (name, …)} of weights (out_i, in) (or biases (out_i,))
    replaced by one tensor, their concatenation along the output rows (Σ out_i, in): the group's products as one
    product, whose output columns are the separate outputs side by side. A group whose tensors are not all
    present is left as it is. Made where the tensors are (the host, for weights as read), before place_tensors,
    so that only the concatenation is placed; a bf16 matrix of it holds the bits of the separate ones (bf16
    rounding is elementwise)."""
    out = dict(tensors)
    for layer in range(n_layers):
        for name, part_names in groups.items():
            parts = [weights.layer_key(layer, part) for part in part_names]
            if all(part in out for part in parts):
                arrays = [out.pop(part) for part in parts]
                out[weights.layer_key(layer, name)] = xp_of(arrays[0]).concatenate(arrays)
    return out


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
