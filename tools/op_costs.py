"""Host microseconds a call of the small CuPy operations a layer's passes are made of (issue 13: a 13-rank layer's
chain is host time), in one process: the kernel launch itself by argument count, allocation, views, the cuBLAS
handle, and rshard's pass wrappers around them. Run on the GPU machine: python tools/op_costs.py"""
import time

import cupy
import numpy as np

from rshard_hpc.ops import passes_cuda, precision
from rshard_hpc.ops.cuda_build import _kernel

N, D = 170, 576  # a CompNode's rows in a 512-token prefill at alpha = 3, SmolLM2's width
x = cupy.ones((N, D), cupy.float32)
w = cupy.ones(D, cupy.float32)
wq = cupy.ones((960, D), cupy.float32)
wq16 = precision.Bf16Matrix(cupy.ones((960, D), cupy.float32), cupy)
cache = cupy.ones((30, 4096, 3, 64), cupy.uint16)
noop1 = cupy.RawKernel(r'extern "C" __global__ void k1(float* a) { if (a[0] < -1) a[0] = 0; }', "k1")
noop12 = cupy.RawKernel(r'''extern "C" __global__ void k12(float* a, float* b, float* c, float* d, int e, int f,
    int g, int h, long long i, long long j, float k, float l) { if (a[0] < -1) a[0] = 0; }''', "k12")
args12 = (x, x, x, x, np.int32(1), np.int32(2), np.int32(3), np.int32(4), np.int64(5), np.int64(6), np.float32(7),
          np.float32(8))
handle = cupy.cuda.device.get_cublas_handle()

CALLS = [
    ("RawKernel launch, 1 array arg", lambda: noop1((1,), (32,), (x,))),
    ("RawKernel launch, 12 args (4 arrays)", lambda: noop12((1,), (32,), args12)),
    ("np.int32(n) x3", lambda: (np.int32(1), np.int32(2), np.int32(3))),
    ("cupy.empty((170, 576))", lambda: cupy.empty((N, D), cupy.float32)),
    ("cupy.ascontiguousarray(contiguous f32)", lambda: cupy.ascontiguousarray(x, dtype=cupy.float32)),
    ("x.reshape(-1, D)", lambda: x.reshape(-1, D)),
    ("x[:, :64] (a column slice)", lambda: x[:, :64]),
    ("cache[7] (a layer of the KV cache)", lambda: cache[7]),
    ("cache[7, :1000]", lambda: cache[7, :1000]),
    ("cupy.cuda.Device().id", lambda: cupy.cuda.Device().id),
    ("cupy.cuda.runtime.getDevice()", lambda: cupy.cuda.runtime.getDevice()),
    ("get_cublas_handle()", lambda: cupy.cuda.device.get_cublas_handle()),
    ("get_current_stream().ptr", lambda: cupy.cuda.get_current_stream().ptr),
    ("passes_cuda._fn(name)", lambda: passes_cuda._fn("rms_norm_rows")),
    ("_kernel(source, name)", lambda: _kernel(passes_cuda.SOURCE, "rms_norm_rows", passes_cuda.defines())),
    ("passes_cuda.rms_norm(x, w, bits=True)", lambda: passes_cuda.rms_norm(x, w, 1e-5, bits=True)),
    ("passes_cuda.rms_norm(x, w, residual=x)", lambda: passes_cuda.rms_norm(x, w, 1e-5, residual=x)),
    ("precision._gemm_t f32 170x576 @ 960x576", lambda: precision._gemm_t(x, wq)),
    ("matmul_t bf16 (rounding + gemmEx)", lambda: precision.matmul_t(x, wq16)),
    ("precision.to_bf16_bits(x)", lambda: precision.to_bf16_bits(x)),
]


def host_us(fn, n=2000):
    for _ in range(50):
        fn()
    cupy.cuda.Stream.null.synchronize()
    t0 = time.perf_counter()
    for i in range(n):
        fn()
        if i % 200 == 199:
            cupy.cuda.Stream.null.synchronize()  # the launch queue stays short
    return (time.perf_counter() - t0) / n * 1e6


if __name__ == "__main__":
    print("| operation | host us a call |\n|---|---|")
    for name, fn in CALLS:
        print(f"| {name} | {host_us(fn):.1f} |", flush=True)
