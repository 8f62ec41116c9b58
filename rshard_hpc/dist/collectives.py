"""Small collectives of the job: control broadcasts, error agreement, object gathers, node placement, and abort."""
from __future__ import annotations

import os
import sys
import time
from functools import lru_cache

import numpy as np

from rshard_hpc.errors import RshardError


def _mpi():
    from mpi4py import MPI

    return MPI


# ------------------------------------------------------------------------------------------ waiting
WAIT_FIRST_S = 50e-6  # a sleeping wait's first pause; it doubles up to WAIT_LONGEST_S
WAIT_LONGEST_S = 2e-3  # the longest pause: what a wait can overshoot by


@lru_cache(maxsize=1)
def sleeping_waits() -> bool:
    """Whether this rank's waits sleep between polls (launcher.sleep_while_waiting, read once)."""
    from rshard_hpc.dist.launcher import sleep_while_waiting

    return sleep_while_waiting()


def wait(request) -> None:
    """Complete a nonblocking MPI request. Where ranks outnumber cores (launcher.sleep_while_waiting) the rank
    sleeps between tests, backing off, so that waiting ranks leave the cores to the ones working; otherwise
    MPI's own Wait."""
    if not sleeping_waits():
        request.Wait()
        return
    poll(lambda: request.Test() or None)


def poll(test):
    """Call test() until it returns something other than None, and return that; between calls sleep (backing off
    from WAIT_FIRST_S to WAIT_LONGEST_S) where waits sleep, else call again at once."""
    pause, sleeping = WAIT_FIRST_S, sleeping_waits()
    while True:
        found = test()
        if found is not None:
            return found
        if sleeping:
            time.sleep(pause)
            pause = min(2 * pause, WAIT_LONGEST_S)


def settle(comm) -> None:
    """Wait (as `wait` does) until every rank of comm is here: before a blocking collective that may wait long
    for a rank still working (the client preparing, reports being written, a layer computing)."""
    if sleeping_waits():
        wait(comm.Ibarrier())


def bcast(comm, obj, root: int = 0):
    """Pickled broadcast of a small control object (no token content)."""
    settle(comm)
    return comm.bcast(obj, root=root)


def agree(comm, error: str | None) -> None:
    """Collective: if any rank has an error message, every rank raises RshardError (the first message)."""
    settle(comm)
    errors = comm.allgather(error)
    found = [e for e in errors if e]
    if found:
        raise RshardError(found[0])


ABORT_GRACE_S = 1.0  # time the launcher gets to forward the failing rank's message before the job is torn down


def abort(code: int = 1) -> None:
    """End the whole job now (every rank), with a non-zero status.

    The message printed just before must survive: MPICH's launcher may kill every process as soon as the abort
    reaches it, before it has forwarded what the failing rank wrote to stderr (seen on a loaded CI machine), so
    the streams are flushed and the launcher gets ABORT_GRACE_S to drain them first.
    Never returns: MPICH's MPI_Abort can return to the caller before the launcher's kill arrives (seen with
    the pip mpich), so the process then exits itself with `code` instead of running on."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S)
    finally:
        try:
            _mpi().COMM_WORLD.Abort(code)
        finally:
            os._exit(code)


def _displs(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def barrier(comm) -> None:
    if sleeping_waits():
        wait(comm.Ibarrier())
    else:
        comm.Barrier()


def gather_objects(comm, obj, root: int = 0):
    settle(comm)
    return comm.gather(obj, root=root)


# ------------------------------------------------------------------------------------------ GPU binding
def node_local_rank(comm=None) -> int:
    """This rank's index among the ranks of its node (a shared-memory split of comm, COMM_WORLD by default)."""
    return _node_placement(_mpi().COMM_WORLD if comm is None else comm)[0]


def _node_placement(comm) -> tuple[int, int]:
    """(this rank's index among the ranks of comm on its node, how many those are): a shared-memory split."""
    node = comm.Split_type(_mpi().COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        return node.Get_rank(), node.Get_size()
    finally:
        node.Free()


def load_on_root(comm, load, root: int = 0) -> dict:
    """`load()` (a dict of NumPy arrays) runs on the root of comm only; every rank gets its result. An
    RshardError on the root is raised on every rank."""
    arrays, error = None, None
    if comm.Get_rank() == root:
        try:
            arrays = load()
        except RshardError as exc:
            error = str(exc)
    return bcast_arrays(comm, arrays, error, root)


def bcast_arrays(comm, arrays: dict | None, error: str | None = None, root: int = 0) -> dict:
    """The root's {name: NumPy array} on every rank of comm: one pickled header (names, shapes, dtypes, or
    the root's error), then one Bcast a tensor. A root error raises RshardError on every rank, so no rank
    is left waiting for tensors that never come."""
    is_root = comm.Get_rank() == root
    header = None
    if is_root:
        header = {"error": error} if error else {"meta": [(k, a.shape, a.dtype.str) for k, a in arrays.items()]}
    header = bcast(comm, header, root=root)
    if header.get("error"):
        raise RshardError(header["error"])
    out = {}
    for name, shape, dtype in header["meta"]:
        buf = np.ascontiguousarray(arrays[name]) if is_root else np.empty(shape, dtype=np.dtype(dtype))
        comm.Bcast(buf, root=root)
        out[name] = buf
    return out
