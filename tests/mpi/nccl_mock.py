"""Run under mpiexec -n 3 (CPUs): --transport nccl's set-up and exchange with a fake NCCL (nccl_fakes.py) whose
groups MPI carries out. Prints "PASS <check>" on rank 0 for each check that held on every rank; exits non-zero
otherwise.
"""
import sys

import numpy as np
from mpi4py import MPI
from nccl_fakes import FakeNccl, fake_xp, host_pointer, mpi_deliver

from rshard_hpc.dist.transport import Transport
from rshard_hpc.dist.transport_choice import choose_transport
from rshard_hpc.errors import RshardError

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
failed = 0


def check(name: str, ok: bool, detail: str = "") -> None:
    global failed
    all_ok = world.allreduce(int(bool(ok)), op=MPI.MIN)
    if not ok:
        print(f"rank {rank}: FAIL {name}: {detail}", flush=True)
    if rank == 0 and all_ok:
        print(f"PASS {name}", flush=True)
    failed += not all_ok


def attempt(mode, fake, identity, load=None):
    """(transport, why or the RshardError's text) of choose_transport with the fakes."""
    transport = Transport(device=True)
    try:
        why = choose_transport(world, transport, mode, load_nccl=load or (lambda: (fake, "")), identity=identity,
                               xp=fake_xp())
    except RshardError as exc:
        return transport, f"error: {exc}"
    return transport, why


def own_gpu():
    return ("node", f"0000:{rank:02x}:00.0")


# bootstrap: rank 0 alone makes the id; every rank joins with the same id, the world's size and its rank
fake = FakeNccl(deliver=mpi_deliver(world.Dup()), uid_seed=100 + rank)
transport, why = attempt("nccl", fake, own_gpu)
comm = fake.communicators[0] if fake.communicators else None
uids = world.allgather(comm.uid if comm else None)
check("bootstrap", transport.mode == "nccl" and fake.uids_made == (rank == 0) and comm.ndev == size
      and comm.rank == rank and uids[0] is not None and all(u == uids[0] for u in uids) and "NCCL 2.28.3" in why,
      f"mode {transport.mode}, {why}, made {fake.uids_made} ids")

# exchange: Transport.alltoallv over the NCCL path, growing, empty and one-way calls, float32 and bf16 bits
ok = True
for trial, scale in enumerate((3, 0, 50, 1, 7)):
    dtype = np.uint16 if trial % 2 else np.float32
    counts = np.array([(rank + 1) * scale + peer for peer in range(size)], dtype=np.int64)
    recv_counts = np.array([(peer + 1) * scale + rank for peer in range(size)], dtype=np.int64)
    if trial == 4:  # one way: rank 0 sends, the others receive
        counts = counts * (rank == 0) * (np.arange(size) != 0)
        recv_counts = recv_counts * (rank != 0) * (np.arange(size) == 0)
    send = np.concatenate([np.full(int(c), (rank * 100 + peer + trial) % 60000, dtype) for peer, c in enumerate(counts)])
    transport.nccl._pointer = host_pointer
    transport.nccl.xp = fake_xp()
    got = transport.nccl.alltoallv(send, counts, recv_counts)[0]
    want = np.concatenate([np.full(int(c), (peer * 100 + rank + trial) % 60000, dtype)
                           for peer, c in enumerate(recv_counts)])
    ok &= got.dtype == dtype and np.array_equal(got, want)
check("exchange", ok, "received data differs")

# refusal: all three workers report one GPU; --transport nccl names them, on every rank
fake2 = FakeNccl()
_, why = attempt("nccl", fake2, lambda: ("node", "0000:01:00.0"))
check("refusal", why.startswith("error: --transport nccl cannot be used: workers share a GPU (ranks 0, 1, 2 on node "
                                "GPU 0000:01:00.0); NCCL needs one rank per GPU") and not fake2.communicators, why)

# auto on a shared GPU passes NCCL by (no communicator is made) and says why, whichever transport it takes next
# (staged on CPUs; CUDA IPC where the machine has a GPU and the IPC probe passes)
transport, why = attempt("auto", fake2, lambda: ("node", "0000:01:00.0"))
check("auto", transport.mode != "nccl" and "not NCCL: workers share a GPU" in why
      and not fake2.communicators, why)

# a rank whose CuPy has no NCCL is named
_, why = attempt("nccl", fake2, own_gpu, load=lambda: (None, "no libnccl") if rank == 1 else (fake2, ""))
check("missing", why == "error: --transport nccl cannot be used: rank 1 of the workers: no libnccl", why)

# NCCL fails to make its communicator on rank 2: auto moves on (the others abort theirs), nccl says so
fake3 = FakeNccl(init_error=RuntimeError("NCCL_ERROR_SYSTEM_ERROR: no shm") if rank == 2 else None)
transport, why = attempt("auto", fake3, own_gpu)
check("initfail", transport.mode != "nccl" and "not NCCL: NCCL could not make its communicator (rank 2 of the "
      "workers: RuntimeError: NCCL_ERROR_SYSTEM_ERROR: no shm)" in why and all(c.aborted for c in fake3.communicators)
      and len(fake3.communicators) == (rank != 2), why)
sys.exit(1 if failed else 0)
