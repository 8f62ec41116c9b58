"""A Llama layer of a few rows on the GPU through kernels/small_rows.cu (ops/small_rows_cuda.py) against the NumPy
path, the cuBLAS path it replaces and a float64 reference. Skipped without CuPy or a GPU.

Fresh random inputs, rows 1 … MAX_ROWS (the sizes a decode step gives a CompNode), a tiny shape and SmolLM2's
(d 576, 9 q heads and 3 kv heads of 64, F 1536), float32 and bf16 weights, outputs poisoned with NaN first. The
small path must not call cuBLAS (precision._gemm_t is made to fail), so a comparison cannot pass by taking the
old path.
"""
import numpy as np
import pytest
from conftest import require_gpu

cupy = require_gpu()

from rshard_hpc.models import common
from rshard_hpc.models.llama import Llama
from rshard_hpc.models.random_init import random_tensors, tiny_config
from rshard_hpc.ops import decode_cuda, passes_cuda, precision, small_rows_cuda

SMOLLM_SHAPE = dict(hidden=576, n_heads=9, n_kv_heads=3, head_dim=64, intermediate=1536, n_layers=2)
CONFIGS = {"tiny": dict(n_kv_heads=2), "smollm": SMOLLM_SHAPE}
TOL = {"float32": 2e-5, "bfloat16": 3e-2}  # against the NumPy float32 path (bf16: a rounding may flip)
TOL_CUBLAS = {"float32": 2e-5, "bfloat16": 1e-2}  # against the GPU's cuBLAS path (same inputs, other sum order)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(passes_cuda, "POISON_OUTPUTS", True)
    monkeypatch.setattr(common, "FUSED", True)
    monkeypatch.setattr(decode_cuda, "ENABLED", True)


def close(got, want, tol):
    got = cupy.asnumpy(got).astype(np.float64)
    want = np.asarray(cupy.asnumpy(want) if isinstance(want, cupy.ndarray) else want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert not np.isnan(got).any(), "unwritten (NaN) output elements"
    scale = np.maximum(np.abs(want).max(axis=-1, keepdims=True), 1e-30)
    err = (np.abs(got - want) / scale).max()
    assert err <= tol, f"relative error {err:.2e} > {tol}"


def _no_cublas(*args, **kwargs):
    raise AssertionError("the small-rows path called cuBLAS")


@pytest.mark.parametrize("shape", list(CONFIGS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n", [1, 2, 5, small_rows_cuda.MAX_ROWS])
def test_layer_of_few_rows(monkeypatch, shape, dtype, n):
    cfg = tiny_config("llama", **CONFIGS[shape])
    tensors = random_tensors(cfg, seed=int(np.random.SeedSequence().entropy % 1000))
    cpu, gpu = Llama(cfg, tensors, np, dtype), Llama(cfg, tensors, cupy, dtype)
    rng = np.random.default_rng()
    h = rng.standard_normal((n, cfg.hidden)).astype(np.float32)
    pos = rng.integers(0, 8000, n).astype(np.int32)
    attn = rng.standard_normal((n, cfg.n_heads, cfg.head_dim)).astype(np.float32)
    dh, dpos, dattn = cupy.asarray(h), cupy.asarray(pos), cupy.asarray(attn)
    assert small_rows_cuda.takes(dh)
    with monkeypatch.context() as patched:
        patched.setattr(precision, "_gemm_t", _no_cublas)
        small_pre = gpu.pre(1, dh, dpos)
        small_post = gpu.post(1, dh, dattn)
    for got, want in zip(small_pre, cpu.pre(1, h, pos)):
        close(got, want, TOL[dtype])
    close(small_post, cpu.post(1, h, attn), TOL[dtype])
    monkeypatch.setattr(small_rows_cuda, "MAX_ROWS", 0)  # the cuBLAS path, as before
    assert not small_rows_cuda.takes(dh)
    for got, want in zip(small_pre, gpu.pre(1, dh, dpos)):
        close(got, want, TOL_CUBLAS[dtype])
    close(small_post, gpu.post(1, dh, dattn), TOL_CUBLAS[dtype])


def test_float64_reference():
    """fp32 small path against the float64 model (the NumPy path in float64) on SmolLM2's shape."""
    cfg = tiny_config("llama", **SMOLLM_SHAPE)
    tensors = random_tensors(cfg, seed=3)
    ref, gpu = Llama(cfg, tensors, np, "float64"), Llama(cfg, tensors, cupy, "float32")
    rng = np.random.default_rng()
    h = rng.standard_normal((3, cfg.hidden)).astype(np.float32)
    pos = np.array([0, 17, 8191], dtype=np.int32)
    attn = rng.standard_normal((3, cfg.n_heads, cfg.head_dim)).astype(np.float32)
    for got, want in zip(gpu.pre(0, cupy.asarray(h), cupy.asarray(pos)), ref.pre(0, h.astype(np.float64), pos)):
        close(got, want, 1e-5)
    close(gpu.post(0, cupy.asarray(h), cupy.asarray(attn)), ref.post(0, h.astype(np.float64), attn), 1e-5)


def test_which_rows_take_it(monkeypatch):
    x = cupy.zeros((small_rows_cuda.MAX_ROWS, 8), dtype=cupy.float32)
    assert small_rows_cuda.takes(x) and small_rows_cuda.takes(x[:1])
    assert not small_rows_cuda.takes(x[:0])
    assert not small_rows_cuda.takes(cupy.zeros((small_rows_cuda.MAX_ROWS + 1, 8), dtype=cupy.float32))
    monkeypatch.setattr(decode_cuda, "ENABLED", False)  # RSHARD_SMALL_STEP_KERNELS=0
    assert not small_rows_cuda.takes(x)


def test_refuses_shapes_that_do_not_fit():
    w = cupy.zeros((12, 8), dtype=cupy.float32)
    with pytest.raises(ValueError, match="small-rows"):
        small_rows_cuda.linear(cupy.zeros((2, 7), dtype=cupy.float32), w)
    with pytest.raises(ValueError, match="norm_rope"):
        small_rows_cuda.norm_rope(cupy.zeros((2, 8), dtype=cupy.float32), cupy.ones(8, dtype=cupy.float32), 1e-5,
                                  w, cupy.zeros(2, dtype=cupy.int32), cupy.ones(2, dtype=cupy.float32), 4, 2, 4)
