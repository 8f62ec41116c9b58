"""Running the kernels of kernels/*.cu on the CPU, without a GPU (tests/ops/test_*_emulated.py): a source is
compiled as C++ (g++) under a small shim that stands in for CUDA (one block of PASS_THREADS std::threads;
__syncthreads a barrier; __shfl_xor_sync through a shared slot array between two barriers, so every thread of
the block must reach each shuffle; the _rn intrinsics as plain fp32 operations with contraction off). Kernels
must stride over their work (one emulated block does it all)."""
import ctypes
import re
import shutil
import subprocess

import numpy as np
import pytest

from rshard_hpc.ops import cuda_build

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


def build(folder, source_name: str, defines: dict, shim: str = ""):
    """kernels/<source_name> with `defines`, compiled as C++ under SHIM (and a source's own `shim` after it) into a
    library with a launch_<kernel> for each kernel; skips the test without a C++20 compiler."""
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    source = cuda_build.kernel_source(source_name, defines)
    stem = source_name.split(".")[0]
    code = folder / f"{stem}.cpp"
    code.write_text(cuda_build.preamble(defines) + SHIM + shim + source + "\n" + _launchers(source))
    built = subprocess.run([cxx, "-std=c++20", "-O1", "-ffp-contract=off", "-shared", "-fPIC", "-pthread",
                            "-o", str(folder / f"{stem}.so"), str(code)], capture_output=True, text=True, check=False)
    if built.returncode != 0 and "barrier: No such file" in built.stderr:
        pytest.skip(f"{cxx} has no C++20 <barrier>")
    assert built.returncode == 0, built.stderr[-3000:]
    return ctypes.CDLL(str(folder / f"{stem}.so"))


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
