"""Every MPI call of the package lives here: broadcasts, the per-layer Alltoallv, client scatter/gather,
collective agreement on errors, and abort. Arrays may be NumPy or CuPy; CuPy buffers are staged through
reused pinned host buffers unless the MPI library is CUDA-aware (see `transport`)."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
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


def _mpi_type(dtype):
    """The MPI datatype of a payload element: float32 activations, or uint16 bf16 bit patterns."""
    MPI = _mpi()
    types = {np.dtype(np.float32): MPI.FLOAT, np.dtype(np.uint16): MPI.UINT16_T}
    try:
        return types[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"Transport moves float32 or uint16 (bf16) payloads, not {np.dtype(dtype)}") from None


class Transport:
    """Moves flat float32 (or uint16 bf16-bit) buffers over work_comm. Counts are in elements; stats
    record bytes and time.

    CuPy buffers go to MPI directly when `gpu_aware` (a CUDA-aware MPI library), otherwise they are staged
    through pinned host buffers that are grown on demand and reused (one per direction and element type).
    Either way the current CUDA stream is synchronized before every MPI call, so MPI never reads a buffer
    a kernel is still writing.
    """

    def __init__(self, gpu_aware: bool = False):
        self.gpu_aware = gpu_aware
        self._pinned = {}  # (direction, dtype) -> pinned host array, grown on demand and reused
        self.mpi_seconds = 0.0
        self.staging_seconds = 0.0
        self.bytes_sent = 0
        self.bytes_received = 0

    def _host_buffer(self, name: str, size: int, dtype=np.float32):
        key = (name, np.dtype(dtype).str)
        buf = self._pinned.get(key)
        if buf is None or buf.size < size:
            grown = max(size, int(1.25 * buf.size) if buf is not None else 0, 1)  # fewer re-allocations
            buf = _pinned_empty(grown, dtype)
            self._pinned[key] = buf
        return buf[:size]

    def alltoallv(self, comm, send, send_counts, recv_counts):
        """send: flat float32 or uint16 (NumPy or CuPy); the receive buffer has send's element type and
        array module (a receive-only call passes an empty array of the type it expects)."""
        MPI = _mpi()
        xp = xp_of(send)
        dtype = np.dtype(send.dtype)
        mpi_type = _mpi_type(dtype)
        send_counts = np.asarray(send_counts, dtype=np.int64)
        recv_counts = np.asarray(recv_counts, dtype=np.int64)
        n_recv = int(recv_counts.sum())
        on_gpu = xp is not np
        staged = on_gpu and not self.gpu_aware
        t0 = time.perf_counter()
        send = xp.ascontiguousarray(send).ravel()
        if staged:
            host_send = self._host_buffer("send", send.size, dtype)
            if send.size:
                send.get(out=host_send)  # device -> pinned host copy, after the stream's work
            host_recv = self._host_buffer("recv", n_recv, dtype)
        else:
            host_send, host_recv = send, xp.empty(n_recv, dtype=dtype)
        if on_gpu:
            xp.cuda.get_current_stream().synchronize()  # the stream must be idle before MPI touches memory
        t1 = time.perf_counter()
        comm.Alltoallv([host_send, (send_counts, _displs(send_counts)), mpi_type],
                       [host_recv, (recv_counts, _displs(recv_counts)), mpi_type])
        t2 = time.perf_counter()
        if staged:
            recv = xp.empty(n_recv, dtype=dtype)
            if n_recv:
                recv.set(host_recv)  # pinned host -> device; the next call synchronizes before reusing host_recv
        else:
            recv = host_recv
        t3 = time.perf_counter()
        self.staging_seconds += (t1 - t0) + (t3 - t2)
        self.mpi_seconds += t2 - t1
        self.bytes_sent += int(send_counts.sum()) * dtype.itemsize
        self.bytes_received += n_recv * dtype.itemsize
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

    def reset_stats(self) -> None:
        self.mpi_seconds = self.staging_seconds = 0.0
        self.bytes_sent = self.bytes_received = 0

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


def gather_ledger(comm, ledger, root: int = 0):
    """Every rank's visibility ledger (a small dict of position ranges, no token content) to the client;
    the root gets the list by rank, the others None."""
    return comm.gather(ledger, root=root)


# ------------------------------------------------------------------------------------------ GPU binding
def node_local_rank(comm=None) -> int:
    """This rank's index among the ranks of its node (a shared-memory split of comm, COMM_WORLD by default)."""
    MPI = _mpi()
    comm = MPI.COMM_WORLD if comm is None else comm
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        return node.Get_rank()
    finally:
        node.Free()


# ------------------------------------------------------------------------------------------ CUDA-awareness
GPU_AWARE_MODES = ("auto", "on", "off")


def resolve_gpu_aware(mode: str) -> tuple[bool, str]:
    """(use device buffers in MPI calls, why). "auto" says yes only on positive evidence (DESIGN §7)."""
    if mode == "off":
        return False, "--gpu-aware-mpi off"
    if mode == "on":
        return True, "--gpu-aware-mpi on (not checked)"
    if mode != "auto":
        raise RshardError(f"unknown --gpu-aware-mpi {mode!r}; choose one of {', '.join(GPU_AWARE_MODES)}")
    return detect_cuda_aware()


def detect_cuda_aware() -> tuple[bool, str]:
    """(True, evidence) only when the loaded MPI library says it moves CUDA device buffers; else (False, why).

    Evidence, in order: an explicit "no" from the environment (MPICH's MPIR_CVAR_ENABLE_GPU=0,
    OMPI_MCA_opal_cuda_support=0); MPIX_Query_cuda_support() of the loaded library (Open MPI, MPICH >= 4,
    and their derivatives); vendor switches of MPIs known to need them (Cray MPICH's
    MPICH_GPU_SUPPORT_ENABLED=1, MVAPICH2's MV2_USE_CUDA=1); Open MPI's `ompi_info` build flag.
    """
    library = _library_version()
    env = os.environ
    if env.get("MPIR_CVAR_ENABLE_GPU", "").strip() == "0":
        return False, "MPIR_CVAR_ENABLE_GPU=0"
    if env.get("OMPI_MCA_opal_cuda_support", "").strip().lower() in ("0", "false", "no"):
        return False, "OMPI_MCA_opal_cuda_support=0"
    answer = _query_cuda_support()
    if answer is not None:
        found, where = answer
        return found, f"MPIX_Query_cuda_support() = {int(found)} in {where}"
    upper = library.upper()
    if "CRAY" in upper and env.get("MPICH_GPU_SUPPORT_ENABLED", "") == "1":
        return True, "Cray MPICH with MPICH_GPU_SUPPORT_ENABLED=1"
    if "MVAPICH" in upper and env.get("MV2_USE_CUDA", "") == "1":
        return True, "MVAPICH with MV2_USE_CUDA=1"
    if "OPEN MPI" in upper:
        built = _ompi_info_cuda()
        if built is not None:
            return built, f"ompi_info: mpi_built_with_cuda_support={str(built).lower()}"
    first_line = library.strip().splitlines()[0] if library.strip() else "unknown MPI"
    return False, f"no evidence of CUDA support in {first_line}"


def _library_version() -> str:
    try:
        return _mpi().Get_library_version()
    except Exception:  # MPI not importable: nothing to report
        return ""


def _loaded_mpi_libraries() -> list:
    """Paths of MPI shared libraries mapped into this process (Linux /proc/self/maps)."""
    paths = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1] if line.strip() else ""
                name = os.path.basename(path)
                if name.startswith(("libmpi.", "libmpi_", "libmpich")) and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    return paths


def _query_cuda_support():
    """(bool, library) from MPIX_Query_cuda_support of the loaded MPI library, or None if it has none."""
    _mpi()  # make sure the library is loaded
    handles = []
    try:
        handles.append(("process", ctypes.CDLL(None)))
    except OSError:
        pass
    for path in _loaded_mpi_libraries():
        try:
            handles.append((path, ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_GLOBAL)))
        except OSError:
            continue
    for where, lib in handles:
        fn = getattr(lib, "MPIX_Query_cuda_support", None)
        if fn is None:
            continue
        fn.restype = ctypes.c_int
        fn.argtypes = []
        return bool(fn()), where
    return None


def _ompi_info_cuda():
    """Open MPI's build flag from `ompi_info`, or None when it cannot be read."""
    exe = shutil.which("ompi_info")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--parsable", "--all"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if "built_with_cuda_support:value:" in line:
            return line.rsplit(":", 1)[-1].strip() == "true"
    return None


def mpi_library_version() -> str:
    """The loaded MPI library's own version text (MPI_Get_library_version); "" when MPI cannot be loaded."""
    return _library_version()
