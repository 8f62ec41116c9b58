"""What a control header costs where ranks outnumber cores (issue 13; docs/architecture.md §3, the control channel).
Run under `mpiexec -n 13 python tools/control_probe.py`: rank 0 works 20 ms (a sleep), then sends a header to every
other rank, 25 times; first as the engine did before (a barrier of sleeping waits, then a pickled bcast), then as
the control channel does (dist/control.py: an Isend of one pickle to each rank, a matched probe on the other end).
Prints the root's time in the send and the time until the workers have the header (medians)."""
import time

import numpy as np

from rshard_hpc.dist.launcher import tune_mpi_env

tune_mpi_env()  # before MPI starts, as a job does: oversubscribed MPICH yields instead of spinning

from mpi4py import MPI  # noqa: E402

from rshard_hpc.dist import collectives  # noqa: E402
from rshard_hpc.dist.control import Channel  # noqa: E402

ROUNDS, SKIPPED, WORK_S = 30, 5, 0.02


def collective_header(comm, obj):
    collectives.settle(comm)
    return comm.bcast(obj, root=0)


def channel_header(channel, obj):
    if channel.comm.Get_rank() == 0:
        channel.send_to_workers(obj)
        return obj
    return channel.header()


def measure(comm, send) -> tuple[float, float]:
    """(the root's median ms in the send, the median over workers of their median ms until they hold it)."""
    times = []
    for _ in range(ROUNDS):
        if comm.Get_rank() == 0:
            time.sleep(WORK_S)
            t0 = time.perf_counter()
            send({"op": "step", "sent": time.time(), "lens": list(range(64))})
            times.append(time.perf_counter() - t0)
        else:
            sent = send(None)["sent"]
            times.append(time.time() - sent)
        comm.Barrier()
    medians = comm.gather(1e3 * float(np.median(times[SKIPPED:])), root=0)
    return (medians[0], float(np.median(medians[1:]))) if comm.Get_rank() == 0 else (0.0, 0.0)


def main() -> None:
    comm = MPI.COMM_WORLD
    channel = Channel(comm.Dup())
    for name, send in (("barrier + bcast", lambda obj: collective_header(comm, obj)),
                       ("control channel", lambda obj: channel_header(channel, obj))):
        root_ms, worker_ms = measure(comm, send)
        if comm.Get_rank() == 0:
            print(f"{name:16s} {comm.Get_size()} ranks, sleeping waits {collectives.sleeping_waits()}: "
                  f"root {root_ms:.2f} ms in the send, workers hold it after {worker_ms:.2f} ms")
    channel.flush()


if __name__ == "__main__":
    main()
