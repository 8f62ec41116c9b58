"""Run under mpirun with --device gpu ranks: Transport.alltoallv on CuPy buffers (staged or direct) moves
the right data, and detect_cuda_aware's verdict is printed. Exits 0 on every rank only if all ranks agree.

usage: mpirun -n P python tests/mpi/gpu_transport.py [auto|on|off] [ipc-auto|ipc-on|ipc-off]
(the second word picks --gpu-ipc; ipc-off by default, so the first checks MPI's own paths)
"""
import sys

import numpy as np
from mpi4py import MPI

from rshard_hpc.dist import cuda_aware, devices
from rshard_hpc.dist.transport import Transport
from rshard_hpc.ops import arrays


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "auto"
    ipc_mode = (sys.argv[2] if len(sys.argv) > 2 else "ipc-off").removeprefix("ipc-")
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    dev = devices.select_device()
    cupy = arrays.array_module("gpu")
    aware, why = cuda_aware.resolve_gpu_aware(mode)
    transport = Transport(gpu_aware=aware, device=True)
    _, ipc_why = transport.enable_device_ipc(world, ipc_mode)
    ok = True
    # buffers grow, shrink and grow again; some calls send nothing to some ranks; float32 and uint16 payloads
    for trial, scale in enumerate((1, 1000, 10, 50000, 0, 7, 200000, 3)):
        dtype = cupy.uint16 if trial % 3 == 2 else cupy.float32
        counts = np.array([(rank + 1) * scale + r * (trial % 2) for r in range(size)], dtype=np.int64)
        recv_counts = np.array([(r + 1) * scale + rank * (trial % 2) for r in range(size)], dtype=np.int64)
        send = cupy.concatenate([cupy.full(int(c), (rank * 100 + r + trial) % 60000, dtype)
                                 for r, c in enumerate(counts)])
        recv = transport.alltoallv(world, send, counts, recv_counts)
        want = np.concatenate([np.full(int(c), (r * 100 + rank + trial) % 60000, np.dtype(dtype))
                               for r, c in enumerate(recv_counts)])
        ok &= isinstance(recv, cupy.ndarray) and recv.dtype == dtype and bool(np.array_equal(cupy.asnumpy(recv), want))
    all_ok = world.allreduce(int(ok), op=MPI.MIN)
    if rank == 0:
        print(f"transport: {size} ranks, GPU {dev}, gpu_aware={aware} ({why}); mode {transport.mode} ({ipc_why}); "
              f"alltoallv {'PASS' if all_ok else 'FAIL'}; stats {transport.stats()}", flush=True)
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
