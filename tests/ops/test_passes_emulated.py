"""kernels/passes.cu run on the CPU, without a GPU: the source is compiled as C++ (g++) under a small shim that
stands in for CUDA (one block of PASS_THREADS std::threads; __syncthreads a barrier; __shfl_xor_sync through
a shared slot array between two barriers; the _rn intrinsics as plain fp32 operations with contraction off),
then each kernel is checked against the NumPy path it replaces. This checks the kernels' indexing, coverage
(outputs poisoned first) and arithmetic order; tests/ops/test_gpu_passes.py checks the real thing on a GPU.
Skipped without a C++20 compiler."""
import ctypes
import re
import shutil
import subprocess

import numpy as np
import pytest
from conftest import partials_recv

from rshard_hpc.models.common import GELU_INV_SQRT2, gelu, layer_norm, rms_norm, silu
from rshard_hpc.models.llama import apply_rope, rope_cos_sin, rope_inv_freq
from rshard_hpc.models.random_init import tiny_config
from rshard_hpc.ops import cuda_build, passes_cuda
from rshard_hpc.ops.precision import to_bf16_bits, wire_dtype
from rshard_hpc.ops.wire import WireRoutes

SHIM = r"""
#include <barrier>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>
struct dim3_ { unsigned x, y = 0, z = 0; };
struct int4 { int x, y, z, w; };
static thread_local dim3_ threadIdx{0};
static dim3_ blockIdx{0}, gridDim{1, 1, 1}, blockDim{PASS_THREADS, 1, 1};
static std::barrier<>* bar_;
static float slot_[PASS_THREADS];
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(x)
#define __shared__ static
#define __syncthreads() bar_->arrive_and_wait()
static float __shfl_xor_sync(unsigned, float v, int s) {
    slot_[threadIdx.x] = v; bar_->arrive_and_wait();
    const float o = slot_[threadIdx.x ^ s]; bar_->arrive_and_wait(); return o;
}
static float __fadd_rn(float a, float b) { return a + b; }
static float __fsub_rn(float a, float b) { return a - b; }
static float __fmul_rn(float a, float b) { return a * b; }
static float __fdiv_rn(float a, float b) { return a / b; }
static float __fsqrt_rn(float a) { return std::sqrt(a); }
static unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
static float __uint_as_float(unsigned u) { float x; std::memcpy(&x, &u, 4); return x; }
static float __int_as_float(int u) { float x; std::memcpy(&x, &u, 4); return x; }
using std::isnan;
using std::min;
template <class F> static void run_block(F f) {
    std::barrier<> bar(PASS_THREADS); bar_ = &bar; std::vector<std::thread> ts;
    for (unsigned t = 0; t < PASS_THREADS; ++t) ts.emplace_back([=] { threadIdx.x = t; f(); });
    for (auto& t : ts) t.join();
}
"""


def _launchers(source: str) -> str:
    """extern "C" launch_<kernel>(same parameters) running the kernel on one emulated block, for each kernel."""
    out = []
    for name, params in re.findall(r'extern "C" __global__ void __launch_bounds__\(PASS_THREADS\)\s*(\w+)\(([^)]*)\)',
                                   source):
        args = ", ".join(re.findall(r"(\w+)\s*$", p.strip())[0] for p in params.split(","))
        out.append(f'extern "C" void launch_{name}({params}) {{ run_block([=] {{ {name}({args}); }}); }}')
    return "\n".join(out)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    source = cuda_build.kernel_source(passes_cuda.SOURCE, passes_cuda.defines())
    folder = tmp_path_factory.mktemp("passes")
    code = folder / "passes.cpp"
    code.write_text(cuda_build.preamble(passes_cuda.defines()) + SHIM + source + "\n" + _launchers(source))
    built = subprocess.run([cxx, "-std=c++20", "-O1", "-ffp-contract=off", "-shared", "-fPIC", "-pthread",
                            "-o", str(folder / "passes.so"), str(code)], capture_output=True, text=True, check=False)
    if built.returncode != 0 and "barrier: No such file" in built.stderr:
        pytest.skip(f"{cxx} has no C++20 <barrier>")
    assert built.returncode == 0, built.stderr[-3000:]
    return ctypes.CDLL(str(folder / "passes.so"))


def call(lib, name, *args):
    conv = []
    for a in args:
        if a is None:
            conv.append(ctypes.c_void_p(0))
        elif isinstance(a, np.ndarray):
            conv.append(a.ctypes.data_as(ctypes.c_void_p))
        elif isinstance(a, np.float32):
            conv.append(ctypes.c_float(a))
        elif isinstance(a, np.int64):
            conv.append(ctypes.c_longlong(a))
        else:
            conv.append(ctypes.c_int(a))
    getattr(lib, f"launch_{name}")(*conv)


def poisoned(shape, dtype=np.float32):
    return np.full(shape, 0xFFFF if np.dtype(dtype) == np.uint16 else np.nan, dtype=dtype)


def rel(got, want):
    assert not np.isnan(got).any(), "unwritten (NaN) output elements"
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)) if want.size else 0.0


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
