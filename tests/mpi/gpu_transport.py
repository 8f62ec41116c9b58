"""Run under mpirun with --device gpu ranks: Transport.alltoallv on CuPy buffers moves the right data over the
transport asked for (as --transport: staged, mpi, ipc, nccl or auto), and the choice with its evidence is
printed. Exits 0 on every rank only if all ranks agree.

usage: mpirun -n P python tests/mpi/gpu_transport.py [auto|staged|mpi|ipc|nccl]
"""
import sys

import numpy as np
from mpi4py import MPI

from rshard_hpc.dist import devices
from rshard_hpc.dist.transport import Transport
from rshard_hpc.dist.transport_choice import choose_transport
from rshard_hpc.ops import arrays


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "auto"
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    dev = devices.select_device()
    cupy = arrays.array_module("gpu")
    transport = Transport(device=True)
    why = choose_transport(world, transport, mode)
    ok = _trials(transport, world, cupy)
    if transport.signals is not None:  # CUDA IPC signalled on the device: the same trials as one step's exchanges
        most = 4 * size * (200000 * size + size)  # bytes: the largest send below (float32)
        transport.begin_step(1000, most)
        ok &= transport.signalled and _trials(transport, world, cupy)
        transport.end_step()
    all_ok = world.allreduce(int(ok), op=MPI.MIN)
    if rank == 0:
        print(f"transport: {size} ranks, GPU {dev}, --transport {mode}: {transport.mode} ({why}); "
              f"alltoallv {'PASS' if all_ok else 'FAIL'}; stats {transport.stats()}", flush=True)
    sys.exit(0 if all_ok else 1)


def _trials(transport, world, cupy) -> bool:
    """Alltoallv calls of varying sizes and element types, each checked on this rank. Signalled calls return
    before their data arrive: the check's copy to the host is queued on the stream after the collect."""
    rank, size = world.Get_rank(), world.Get_size()
    ok = True
    # buffers grow, shrink and grow again; some calls send nothing to some ranks; float32 and uint16 payloads
    # (scale 0: nothing at all moves; the last trials send nothing to the odd ranks, and receive-only calls)
    for trial, scale in enumerate((1, 1000, 10, 50000, 0, 7, 200000, 3, 5, 11)):
        dtype = cupy.uint16 if trial % 3 == 2 else cupy.float32
        counts = np.array([(rank + 1) * scale + r * (trial % 2) for r in range(size)], dtype=np.int64)
        recv_counts = np.array([(r + 1) * scale + rank * (trial % 2) for r in range(size)], dtype=np.int64)
        if trial >= 8:  # one direction only, as the engine's calls: even ranks send to odd ones
            counts = np.where((rank % 2 == 0) & (np.arange(size) % 2 == 1), counts, 0)
            recv_counts = np.where((rank % 2 == 1) & (np.arange(size) % 2 == 0), recv_counts, 0)
        send = cupy.concatenate([cupy.full(int(c), (rank * 100 + r + trial) % 60000, dtype)
                                 for r, c in enumerate(counts)])
        recv = transport.alltoallv(world, send, counts, recv_counts)
        del send  # freed at once: the transport must not need it past the call (NCCL: stream-ordered reuse)
        cupy.full(int(counts.sum()) + 1, 65535, dtype)  # reuses the freed memory on the same stream
        want = np.concatenate([np.full(int(c), (r * 100 + rank + trial) % 60000, np.dtype(dtype))
                               for r, c in enumerate(recv_counts)])
        ok &= isinstance(recv, cupy.ndarray) and recv.dtype == dtype and bool(np.array_equal(cupy.asnumpy(recv), want))
    return ok


if __name__ == "__main__":
    main()
