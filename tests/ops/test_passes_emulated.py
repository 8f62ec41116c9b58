"""kernels/passes.cu run on the CPU, without a GPU (tests/ops/cuda_emulation.py: the source compiled as C++ under a
shim that stands in for CUDA), then each kernel is checked against the NumPy path it replaces. This checks the
kernels' indexing, coverage (outputs poisoned first) and arithmetic order; tests/ops/test_gpu_passes.py checks the real thing on a GPU.
Skipped without a C++20 compiler."""
import numpy as np
import pytest
from conftest import partials_recv
from cuda_emulation import build, call, poisoned, rel

from rshard_hpc.models.common import GELU_INV_SQRT2, gelu, layer_norm, rms_norm, silu
from rshard_hpc.models.llama import apply_rope, rope_cos_sin, rope_inv_freq
from rshard_hpc.models.random_init import tiny_config
from rshard_hpc.ops import passes_cuda
from rshard_hpc.ops.precision import to_bf16_bits, wire_dtype
from rshard_hpc.ops.wire import WireRoutes


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return build(tmp_path_factory.mktemp("passes"), passes_cuda.SOURCE, passes_cuda.defines())


@pytest.mark.parametrize("n,d", [(0, 8), (1, 1), (3, 33), (5, 576), (2, 2049)])
def test_norms(lib, n, d):
    rng = np.random.default_rng([n, d])
    x, r = (rng.standard_normal((n, d)).astype(np.float32) * 3 for _ in range(2))
    w, b, rb = (rng.standard_normal(d).astype(np.float32) for _ in range(3))
    h, y, bits = poisoned((n, d)), poisoned((n, d)), poisoned((n, d), np.uint16)
    call(lib, "rms_norm_rows", x, r, w, h, y, bits, n, d, np.float32(1e-5))
    assert np.array_equal(h, x + r)
    assert rel(y, rms_norm(x + r, w, 1e-5)) <= 1e-6
    assert np.array_equal(bits, to_bf16_bits(y))
    y = poisoned((n, d))
    call(lib, "rms_norm_rows", x, None, w, None, y, None, n, d, np.float32(1e-5))
    assert rel(y, rms_norm(x, w, 1e-5)) <= 1e-6
    for res, res_b in ((None, None), (r, None), (r, rb)):
        y = poisoned((n, d))
        call(lib, "layer_norm_rows", x, res, res_b, w, b, y, n, d, np.float32(1e-12))
        assert rel(y, layer_norm(x, w, b, 1e-12, residual=res, residual_bias=res_b)) <= 1e-6


def qkv_views(rng, n, n_heads, n_kv, head_dim, strided: bool):
    """q (n, H, D), k, v (n, Hkv, D): separate arrays, or views of the columns of one (n, (H + 2 Hkv) D) array
    (as Llama.pre's fused product gives them), and their row strides in elements."""
    if not strided:
        q = rng.standard_normal((n, n_heads, head_dim)).astype(np.float32)
        k, v = (rng.standard_normal((n, n_kv, head_dim)).astype(np.float32) for _ in range(2))
        return (q, k, v), (n_heads * head_dim, n_kv * head_dim, n_kv * head_dim)
    qkv = rng.standard_normal((n, n_heads + 2 * n_kv, head_dim)).astype(np.float32)
    views = qkv[:, :n_heads], qkv[:, n_heads:n_heads + n_kv], qkv[:, n_heads + n_kv:]
    assert not any(a.flags.c_contiguous for a in views if n > 1)
    return views, ((n_heads + 2 * n_kv) * head_dim,) * 3


@pytest.mark.parametrize("n_heads,n_kv,head_dim", [(9, 3, 64), (4, 4, 128), (2, 1, 2)])
@pytest.mark.parametrize("strided", [False, True])
def test_rope(lib, n_heads, n_kv, head_dim, strided):
    rng = np.random.default_rng([n_heads, head_dim])
    cfg = tiny_config("llama", n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, hidden=n_heads * head_dim)
    inv_freq = rope_inv_freq(cfg)
    n = 11
    pos = rng.integers(0, 5000, n).astype(np.int32)
    (q, k, _), (q_ld, k_ld, _) = qkv_views(rng, n, n_heads, n_kv, head_dim, strided)
    qo, ko = poisoned(q.shape), poisoned(k.shape)
    call(lib, "rope_qk", q, k, pos, inv_freq, qo, ko, n, n_heads, n_kv, head_dim // 2, np.int64(q_ld), np.int64(k_ld))
    cos, sin = rope_cos_sin(inv_freq, pos, np)  # np.cos vs the C library's cosf: an ulp apart at most
    assert rel(qo, apply_rope(q, cos, sin)) <= 1e-6 and rel(ko, apply_rope(k, cos, sin)) <= 1e-6


@pytest.mark.parametrize("shape", [(0, 4), (1, 1), (7, 33)])
def test_activations(lib, shape):
    rng = np.random.default_rng(list(shape))
    g, u = (rng.standard_normal(shape).astype(np.float32) * 4 for _ in range(2))
    b = rng.standard_normal(shape[-1]).astype(np.float32)
    out, bits = poisoned(shape), poisoned(shape, np.uint16)
    call(lib, "silu_mul", g, u, out, bits, np.int64(g.size), shape[1], np.int64(shape[1]), np.int64(shape[1]))
    assert rel(out, silu(g) * u) <= 1e-6 and np.array_equal(bits, to_bf16_bits(out))
    # gate and up as the two column halves of one product (Llama.post's fused gate/up product): read in place
    gate_up = np.concatenate([g, u], axis=1)
    out2, bits2 = poisoned(shape), poisoned(shape, np.uint16)
    call(lib, "silu_mul", gate_up[:, :shape[1]], gate_up[:, shape[1]:], out2, bits2, np.int64(g.size), shape[1],
         np.int64(2 * shape[1]), np.int64(2 * shape[1]))
    assert out2.tobytes() == out.tobytes() and np.array_equal(bits2, bits)
    out, bits = poisoned(shape), poisoned(shape, np.uint16)
    call(lib, "bias_gelu", g, b, out, bits, np.int64(g.size), shape[-1], GELU_INV_SQRT2)
    assert rel(out, gelu(g + b)) <= 1e-6 and np.array_equal(bits, to_bf16_bits(out))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n,beta,n_heads,n_kv,head_dim", [(0, 2, 4, 4, 8), (1, 3, 9, 3, 64), (19, 3, 6, 4, 8),
                                                          (33, 2, 4, 2, 128)])
@pytest.mark.parametrize("strided", [False, True])
def test_wire(lib, n, beta, n_heads, n_kv, head_dim, dtype, strided):
    """pack: the NumPy WireRoutes' bytes exactly (q, k, v separate, or views of one product's columns);
    unpack + merge: the NumPy merge within fp32 rounding."""
    rng = np.random.default_rng([n, beta, n_heads, head_dim])
    wire = wire_dtype(dtype)
    group = rng.integers(0, beta, n)
    rows = [np.flatnonzero(group == g) for g in range(beta)]
    (q, k, v), lds = qkv_views(rng, n, n_heads, n_kv, head_dim, strided)
    routes = WireRoutes(rows, n, n_heads, n_kv, head_dim, wire)
    want = routes.pack(q, k, v)
    assert want.tobytes() == routes.pack(*(np.ascontiguousarray(a) for a in (q, k, v))).tobytes()
    got = poisoned(want.shape, wire)
    call(lib, "pack_bf16" if wire == np.uint16 else "pack_f32", q, k, v, routes.send_units, got, np.int64(got.size),
         routes.unit, np.int64(q.size // routes.unit), np.int64(k.size // routes.unit), routes.q_units,
         routes.kv_units, *(np.int64(ld) for ld in lds))
    assert got.tobytes() == want.tobytes()
    recv = partials_recv(rng, rows, n_heads, head_dim, wire)
    merged = poisoned((n, n_heads, head_dim))
    call(lib, "unpack_merge_bf16" if wire == np.uint16 else "unpack_merge_f32", recv, routes.recv_rows, merged, beta,
         n, n_heads, head_dim, routes.slots)
    assert rel(merged, routes.merge(recv)) <= 1e-6
