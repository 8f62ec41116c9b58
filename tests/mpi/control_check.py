"""Run under mpiexec (any size >= 2): the control channel (rshard_hpc/dist/control.py) between rank 0 and the others.

usage: mpiexec -n W python tests/mpi/control_check.py SEED
Rank 0 sends every other rank, in this order, headers (one larger than MPICH's eager limit), one array per rank
each of int64 and float32 (empty, small, 9 MB), and finally a stop; each worker checks what it got in order,
answers with a ledger-like object, then rows (received by rank 0 in the other order: rows first), and flushes.
Then, as an embedding client overlaps them (Client.encode_batches), rank 0 starts one more array to every worker
(Channel.start_arrays) and reads a large ledger each worker sent before receiving it, then finishes the sends.
Payloads are fresh random numbers from SEED, known to every rank. Every rank exits 0 only if all checks pass (a
collective verdict: an allreduce of the failures); rank 0 prints what failed.
"""
import sys

import numpy as np
from mpi4py import MPI

from rshard_hpc.dist.control import CLIENT, INPUTS, LEDGER, ROWS, Channel

SIZES = (0, 3, 9 * 2**20 // 4)  # elements of the arrays: none, a few, past any eager limit


def payloads(seed: int, rank: int) -> list:
    """The arrays rank 0 sends `rank`, in order (the same on both ends)."""
    rng = np.random.default_rng([seed, rank])
    out = []
    for n in SIZES:
        out.append(rng.integers(-2**62, 2**62, n, dtype=np.int64))
        out.append(rng.standard_normal(n, dtype=np.float32))
    return out


def headers(seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [{"op": "batch", "lens": rng.integers(1, 500, 40_000).tolist()},  # ~200 kB pickled
            {"op": "step", "ranges": [(0, 5)], "want": "all"}, {"op": "end"}]


def large_ledger(seed: int, rank: int) -> dict:
    """A ledger-like object past any eager limit (~400 kB pickled)."""
    return {"node": f"rank{rank}", "records": np.random.default_rng([seed, rank, 1]).integers(0, 999, 80_000).tolist()}


def client(channel: Channel, seed: int, size: int) -> list:
    failures = []
    for header in headers(seed):
        channel.send_to_workers(header)
    for i in range(len(SIZES) * 2):
        channel.send_arrays({rank: payloads(seed, rank)[i] for rank in range(1, size)}, INPUTS)
    sending = channel.start_arrays({rank: payloads(seed, rank)[-1] for rank in range(1, size)}, INPUTS)
    for rank in range(1, size):  # read while the arrays move
        if channel.recv_object(rank, LEDGER) != large_ledger(seed, rank):
            failures.append(f"large ledger of rank {rank}")
    channel.finish(sending)
    channel.send_to_workers({"op": "stop"})
    for rank in range(1, size):  # rows before the ledger, though each worker sent its ledger first
        rows = channel.recv_array(rank, ROWS, np.float32)
        if not np.array_equal(rows, payloads(seed, rank)[-1][::-1]):
            failures.append(f"rows of rank {rank}")
        ledger = channel.recv_object(rank, LEDGER)
        if ledger != {"node": f"rank{rank}", "records": [[rank, 2 * rank]]}:
            failures.append(f"ledger of rank {rank}: {ledger!r}")
    channel.flush()
    return failures


def worker(channel: Channel, seed: int, rank: int) -> list:
    failures = []
    for i, want in enumerate(headers(seed)):
        if channel.header() != want:
            failures.append(f"rank {rank}: header {i}")
    for i, want in enumerate(payloads(seed, rank)):
        got = channel.recv_array(CLIENT, INPUTS, want.dtype)
        if got.dtype != want.dtype or not np.array_equal(got, want):
            failures.append(f"rank {rank}: array {i} ({want.dtype}, {want.size})")
    channel.send_object(large_ledger(seed, rank), CLIENT, LEDGER)
    if not np.array_equal(channel.recv_array(CLIENT, INPUTS, np.float32), payloads(seed, rank)[-1]):
        failures.append(f"rank {rank}: the array started while ledgers were read")
    if channel.header() != {"op": "stop"}:
        failures.append(f"rank {rank}: no stop")
    channel.send_object({"node": f"rank{rank}", "records": [[rank, 2 * rank]]}, CLIENT, LEDGER)
    channel.send_arrays({CLIENT: payloads(seed, rank)[-1][::-1].copy()}, ROWS)
    channel.flush()
    return failures


def main() -> int:
    seed = int(sys.argv[1])
    world = MPI.COMM_WORLD
    channel = Channel(world.Dup())
    rank = world.Get_rank()
    failures = client(channel, seed, world.Get_size()) if rank == 0 else worker(channel, seed, rank)
    gathered = world.gather(failures, root=0)
    failed = world.allreduce(len(failures))
    if rank == 0:
        print("control channel:", "ok" if not failed else "; ".join(f for part in gathered for f in part))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
