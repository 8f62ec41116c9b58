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

    def __init__(self, gpu_aware: bool = False, device: bool = False):
        self.gpu_aware = gpu_aware
        self.device = device  # this rank's buffers live on a GPU
        self.ipc = None  # a DeviceIpc for one communicator, when enable_device_ipc found it works
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
        xp = xp_of(send)
        dtype = np.dtype(send.dtype)
        mpi_type = _mpi_type(dtype)
        send_counts = np.asarray(send_counts, dtype=np.int64)
        recv_counts = np.asarray(recv_counts, dtype=np.int64)
        n_recv = int(recv_counts.sum())
        on_gpu = xp is not np
        send = xp.ascontiguousarray(send).ravel()
        if on_gpu and self.ipc is not None and self.ipc.comm is comm:
            recv, seconds = self.ipc.alltoallv(send, send_counts, recv_counts)
            self._account(seconds["mpi"], seconds["copy"], send_counts, n_recv, dtype.itemsize)
            return recv
        staged = on_gpu and not self.gpu_aware
        t0 = time.perf_counter()
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
        self._account(t2 - t1, (t1 - t0) + (t3 - t2), send_counts, n_recv, dtype.itemsize)
        return recv

    def _account(self, mpi_s: float, staging_s: float, send_counts, n_recv: int, itemsize: int) -> None:
        self.mpi_seconds += mpi_s
        self.staging_seconds += staging_s
        self.bytes_sent += int(send_counts.sum()) * itemsize
        self.bytes_received += n_recv * itemsize

    @property
    def mode(self) -> str:
        """How this rank's buffers move: "host" (NumPy ranks), "cuda-ipc", "cuda-aware MPI" or "staged"."""
        if not self.device:
            return "host"
        if self.ipc is not None:
            return "cuda-ipc"
        return "cuda-aware MPI" if self.gpu_aware else "staged"

    def enable_device_ipc(self, comm, mode: str = "auto") -> tuple[bool, str]:
        """Collective over comm: move device buffers between its ranks by CUDA IPC (MPI then carries only
        offsets) when every rank of comm is on one node and a probe exchange through IPC is exact on every
        rank. Returns (used, why). mode "off" never tries; "on" raises RshardError where it fails."""
        if mode not in IPC_MODES:
            raise RshardError(f"unknown --gpu-ipc {mode!r}; choose one of {', '.join(IPC_MODES)}")
        if mode == "off":
            return False, "--gpu-ipc off"
        used, why = _try_device_ipc(comm)
        if used:
            self.ipc = used
            return True, why
        if mode == "on":
            raise RshardError(f"--gpu-ipc on: CUDA IPC cannot be used here ({why})")
        return False, why

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


IPC_MODES = ("auto", "on", "off")
_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: unified addressing picks the direction (and the peer device)
_IPC_LAZY_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess


class DeviceIpc:
    """Alltoallv between the ranks of one node through CUDA IPC: each rank copies its send buffer into one of
    two device outboxes (alternate calls) that its peers have mapped, a small pickled MPI alltoall tells every
    receiver where its bytes lie (and the outbox's IPC handle when it is new), and each receiver copies them
    out device to device.

    Why two outboxes suffice: a rank rewrites an outbox two calls later, after the next call's alltoall, which
    it completes only once every peer has finished the call before (each synchronizes its stream on leaving).
    """

    def __init__(self, comm):
        import cupy

        self.cupy, self.comm = cupy, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.calls = 0
        self.boxes = [None, None]  # (cupy Memory, generation, IPC handle) per parity
        self.generation = 0
        self.told = [[-1] * self.size for _ in range(2)]  # generation of my outbox each peer has been sent
        self.peers = {}  # (source rank, parity) -> (generation, mapped pointer)

    def _outbox(self, parity: int, nbytes: int):
        box = self.boxes[parity]
        if box is None or box[0].size < nbytes:
            grown = max(nbytes, int(1.25 * box[0].size) if box else 0, 1 << 16)
            memory = self.cupy.cuda.Memory(grown)  # its own cudaMalloc: an IPC handle names a whole allocation
            self.generation += 1
            box = (memory, self.generation, self.cupy.cuda.runtime.ipcGetMemHandle(memory.ptr))
            self.boxes[parity] = box  # the old one is past every peer's reads (see the class note)
        return box

    def _peer_pointer(self, src: int, parity: int, generation: int, handle) -> int:
        runtime = self.cupy.cuda.runtime
        known = self.peers.get((src, parity))
        if known is not None and known[0] == generation:
            return known[1]
        if handle is None:
            raise RuntimeError(f"CUDA IPC: rank {src} sent no handle for its outbox generation {generation}")
        if known is not None:
            runtime.ipcCloseMemHandle(known[1])
        pointer = runtime.ipcOpenMemHandle(handle, _IPC_LAZY_PEER_ACCESS)
        self.peers[(src, parity)] = (generation, pointer)
        return pointer

    def alltoallv(self, send, send_counts, recv_counts):
        """send: flat contiguous CuPy array; counts in elements. Returns (recv, {"mpi": s, "copy": s})."""
        cupy, runtime = self.cupy, self.cupy.cuda.runtime
        stream = cupy.cuda.get_current_stream()
        itemsize = send.dtype.itemsize
        parity = self.calls % 2
        self.calls += 1
        t0 = time.perf_counter()
        memory, generation, handle = self._outbox(parity, send.nbytes)
        if send.nbytes:
            runtime.memcpyAsync(memory.ptr, send.data.ptr, send.nbytes, _MEMCPY_DEFAULT, stream.ptr)
        stream.synchronize()  # my outbox is written before anyone learns where to read
        offsets = _displs(send_counts) * itemsize
        notes = []
        for peer in range(self.size):
            new = self.told[parity][peer] != generation and peer != self.rank
            self.told[parity][peer] = generation
            notes.append((parity, generation, handle if new else None, int(offsets[peer]),
                          int(send_counts[peer]) * itemsize))
        t1 = time.perf_counter()
        got = self.comm.alltoall(notes)
        t2 = time.perf_counter()
        recv = cupy.empty(int(np.sum(recv_counts)), dtype=send.dtype)
        at = 0
        for src, (src_parity, src_gen, src_handle, offset, nbytes) in enumerate(got):
            if nbytes != int(recv_counts[src]) * itemsize:
                raise RuntimeError(f"CUDA IPC: rank {src} sends {nbytes} bytes, rank {self.rank} expects "
                                   f"{int(recv_counts[src]) * itemsize}")
            if nbytes:
                base = memory.ptr if src == self.rank else self._peer_pointer(src, src_parity, src_gen, src_handle)
                runtime.memcpyAsync(recv.data.ptr + at, base + offset, nbytes, _MEMCPY_DEFAULT, stream.ptr)
            at += nbytes
        stream.synchronize()  # my reads of the peers' outboxes are done before I leave (see the class note)
        t3 = time.perf_counter()
        return recv, {"mpi": t2 - t1, "copy": (t1 - t0) + (t3 - t2)}


def _try_device_ipc(comm):
    """(DeviceIpc, why) when CUDA IPC works among all ranks of comm, else (None, why). Collective: every rank
    makes the same calls whatever fails where, and all take the same verdict."""
    MPI = _mpi()
    _, node_size = _node_placement(comm)
    one_node = comm.allreduce(int(node_size == comm.Get_size()), op=MPI.MIN)
    if not one_node:
        return None, "the ranks span several nodes"
    ipc, handles, error = None, [None, None], None
    try:  # step 1: my two outboxes, each filled with a value that names its owner and parity
        ipc = DeviceIpc(comm)
        for parity in (0, 1):
            memory, _, handles[parity] = ipc._outbox(parity, 4 * 64)
            tag = ipc.cupy.full(64, 1000 * ipc.rank + parity, ipc.cupy.float32)
            ipc.cupy.cuda.runtime.memcpy(memory.ptr, tag.data.ptr, tag.nbytes, _MEMCPY_DEFAULT)
    except Exception as exc:  # no CUDA IPC in this container, ...: not here
        error = f"{type(exc).__name__}: {exc}"
    all_handles = comm.allgather(None if error else handles)  # step 2: every rank's handles
    if error is None:
        error = _probe_peers(ipc, all_handles)  # step 3: map every peer's outboxes and read them back
    errors = [e for e in comm.allgather(error) if e]
    if errors:
        return None, f"CUDA IPC probe failed ({errors[0]})"
    return ipc, f"CUDA IPC among {comm.Get_size()} ranks of one node (probe exact)"


def _probe_peers(ipc, all_handles):
    """Open each peer's outboxes and check their tags; an error text or None. Marks the handles as known."""
    cupy = ipc.cupy
    try:
        for src, handles in enumerate(all_handles):
            if handles is None:
                return f"rank {src} could not export its outboxes"
            for parity in (0, 1):
                generation = parity + 1  # generations 1 and 2: the outboxes made in step 1
                if src == ipc.rank:
                    continue
                pointer = ipc._peer_pointer(src, parity, generation, handles[parity])
                got = cupy.empty(64, cupy.float32)
                cupy.cuda.runtime.memcpy(got.data.ptr, pointer, got.nbytes, _MEMCPY_DEFAULT)
                if not bool((got == 1000 * src + parity).all()):
                    return f"rank {ipc.rank} read wrong data from rank {src}"
        for parity in (0, 1):
            ipc.told[parity] = [parity + 1] * ipc.size  # every peer holds my outboxes' handles now
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def gather_objects(comm, obj, root: int = 0):
    return comm.gather(obj, root=root)


def gather_ledger(comm, ledger, root: int = 0):
    """Every rank's visibility ledger (a small dict of position ranges, no token content) to the client;
    the root gets the list by rank, the others None."""
    return comm.gather(ledger, root=root)


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
