"""Why a launch costs more host time in a multi-rank job than in one process (issue 13). Run under `mpirun -n N`
(N = 1: the one-process case). Rank 0 times its host microseconds a call, for a trivial RawKernel, a CuPy
elementwise operation and a cuBLAS product of a CompNode's prefill size, while the other ranks, in turn:
  sleep   wait in a sleep loop (idle CPU, idle GPU),
  spin    a Python busy loop (busy CPU, idle GPU),
  mpi     wait in an MPI barrier (Open MPI polls: what a rank waiting on an exchange does),
  launch  launch the same small kernels in a loop (busy CPU, busy GPU: other ranks' work).
Prints one table line per background from rank 0."""
import os
import time

import cupy
from mpi4py import MPI

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
cupy.cuda.Device(0).use()
noop = cupy.RawKernel(r'extern "C" __global__ void noop(float* x) { if (threadIdx.x == 0 && x[0] < 0) x[0] = 0; }',
                      "noop")
x = cupy.ones(4096, dtype=cupy.float32)
a = cupy.ones((170, 576), dtype=cupy.float32)
w = cupy.ones((576, 576), dtype=cupy.float32)
for _ in range(20):  # load everything once
    noop((1,), (32,), (x,))
    _ = x + x
    _ = a @ w
cupy.cuda.Stream.null.synchronize()


def time_calls(fn, n):
    cupy.cuda.Stream.null.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    cupy.cuda.Stream.null.synchronize()
    return host, (time.perf_counter() - t0) / n * 1e6


CALLS = {"noop": (lambda: noop((1,), (32,), (x,)), 2000), "x + x": (lambda: x + x, 2000),
         "gemm 170x576x576": (lambda: a @ w, 500)}


def background(mode, done):
    i = 0
    while not done.Test():
        if mode == "sleep":
            time.sleep(0.0005)
        elif mode == "launch":
            noop((1,), (32,), (x,))
            _ = x + x
            i += 1
            if i % 64 == 0:
                cupy.cuda.Stream.null.synchronize()
        elif mode == "mpi":
            done.Wait()
            return
        # spin: nothing, the loop itself


if rank == 0:
    cpus = len(os.sched_getaffinity(0))
    print(f"ranks {size}, CPUs this rank may use {cpus}, os.cpu_count {os.cpu_count()}, "
          f"MPS {'on' if os.environ.get('CUDA_MPS_PIPE_DIRECTORY') else 'off'}", flush=True)
for mode in (["alone"] if size == 1 else ["sleep", "spin", "mpi", "launch"]):
    comm.Barrier()
    if rank == 0:
        time.sleep(0.2)  # the others are in their loops
        line = [f"{name} {h:.1f}/{d:.1f}" for name, (fn, n) in CALLS.items() for h, d in [time_calls(fn, n)]]
        print(f"others {mode:6s}: us a call host/with device: " + ", ".join(line), flush=True)
        comm.Ibarrier().Wait()
    else:
        background(mode, comm.Ibarrier())
comm.Barrier()
