"""Every MPI call of the package lives here: broadcasts, the per-layer Alltoallv, client scatter/gather,
collective agreement on errors, and abort. Arrays may be NumPy or CuPy; CuPy buffers are staged through
reused pinned host buffers unless the MPI library is CUDA-aware (see `transport`)."""
from __future__ import annotations

import sys
import time

import numpy as np

from rshard_hpc.backend import to_host, xp_of
from rshard_hpc.errors import RshardError


def _mpi():
    from mpi4py import MPI

    return MPI


def bcast(comm, obj, root: int = 0):
    """Pickled broadcast of a small control object (no token content)."""
    return comm.bcast(obj, root=root)


def agree(comm, error: str | None) -> None:
    """Collective: if any rank has an error message, every rank raises RshardError (the first message)."""
    errors = comm.allgather(error)
    found = [e for e in errors if e]
    if found:
        raise RshardError(found[0])


def abort(code: int = 1) -> None:
    """End the whole job now (every rank), with a non-zero status."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        _mpi().COMM_WORLD.Abort(code)


def _displs(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


class Transport:
    """Moves flat float32 buffers over work_comm. Counts are in elements; stats record bytes and time."""

    def __init__(self, gpu_aware: bool = False):
        self.gpu_aware = gpu_aware
        self._pinned = {}  # name -> pinned host array, grown on demand and reused
        self.mpi_seconds = 0.0
        self.staging_seconds = 0.0
        self.bytes_sent = 0
        self.bytes_received = 0

    def _host_buffer(self, name: str, size: int, dtype=np.float32):
        buf = self._pinned.get(name)
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = _pinned_empty(max(size, 1), dtype)
            self._pinned[name] = buf
        return buf[:size]

    def alltoallv(self, comm, send, send_counts, recv_counts):
        """send: flat float32 (NumPy or CuPy); returns the flat receive buffer in the same array module."""
        MPI = _mpi()
        xp = xp_of(send)
        send_counts = np.asarray(send_counts, dtype=np.int64)
        recv_counts = np.asarray(recv_counts, dtype=np.int64)
        n_recv = int(recv_counts.sum())
        staged = xp is not np and not self.gpu_aware
        t0 = time.perf_counter()
        if xp is not np:
            xp.cuda.get_current_stream().synchronize()  # the stream must be idle before MPI reads
        if staged:
            host_send = self._host_buffer("send", send.size)
            send.get(out=host_send)
            host_recv = self._host_buffer("recv", n_recv)
        else:
            host_send, host_recv = send, xp.empty(n_recv, dtype=xp.float32)
        t1 = time.perf_counter()
        comm.Alltoallv([host_send, (send_counts, _displs(send_counts)), MPI.FLOAT],
                       [host_recv, (recv_counts, _displs(recv_counts)), MPI.FLOAT])
        t2 = time.perf_counter()
        if staged:
            recv = xp.asarray(host_recv)
        else:
            recv = host_recv
        t3 = time.perf_counter()
        self.staging_seconds += (t1 - t0) + (t3 - t2)
        self.mpi_seconds += t2 - t1
        self.bytes_sent += int(send_counts.sum()) * 4
        self.bytes_received += n_recv * 4
        return recv

    def scatter_ids(self, comm, per_rank):
        """Client (root of comm) sends per_rank[r] (int64 ids) to rank r; returns this rank's ids."""
        MPI = _mpi()
        rank = comm.Get_rank()
        counts = comm.bcast([len(a) for a in per_rank] if rank == 0 else None, root=0)
        counts = np.asarray(counts, dtype=np.int64)
        recv = np.empty(counts[rank], dtype=np.int64)
        if rank == 0:
            send = np.concatenate([np.asarray(a, dtype=np.int64) for a in per_rank])
            comm.Scatterv([send, (counts, _displs(counts)), MPI.INT64_T], [recv, MPI.INT64_T])
        else:
            comm.Scatterv(None, [recv, MPI.INT64_T], root=0)
        return recv

    def gather_rows(self, comm, rows, width: int):
        """Each non-root rank sends rows (n_r, width) float32 to the client; root gets a list per rank."""
        MPI = _mpi()
        rows = np.ascontiguousarray(to_host(rows), dtype=np.float32).reshape(-1, width)
        counts = comm.gather(rows.size, root=0)
        if comm.Get_rank() != 0:
            comm.Gatherv([rows, MPI.FLOAT], None, root=0)
            return None
        counts = np.asarray(counts, dtype=np.int64)
        recv = np.empty(int(counts.sum()), dtype=np.float32)
        comm.Gatherv([rows, MPI.FLOAT], [recv, (counts, _displs(counts)), MPI.FLOAT], root=0)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        return [recv[a:b].reshape(-1, width) for a, b in zip(bounds[:-1], bounds[1:])]

    def stats(self) -> dict:
        return {"mpi_s": self.mpi_seconds, "staging_s": self.staging_seconds,
                "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received}


def _pinned_empty(size: int, dtype):
    """A page-locked host array when CuPy is present (faster device copies), else plain NumPy."""
    try:
        import cupy

        mem = cupy.cuda.alloc_pinned_memory(size * np.dtype(dtype).itemsize)
        return np.frombuffer(mem, dtype=dtype, count=size)
    except Exception:  # no CuPy or no GPU: plain host memory does the same job
        return np.empty(size, dtype=dtype)


def gather_objects(comm, obj, root: int = 0):
    return comm.gather(obj, root=root)
