"""The per-layer data movement on work_comm: Alltoallv of flat float32 or bf16-bit buffers (host, staged
through pinned buffers, CUDA-aware MPI, CUDA IPC or NCCL; transport_choice.py picks). The client's messages
(ids or hidden rows out, final rows back) go on the control channel (control.py).
"""
from __future__ import annotations

import time

import numpy as np

from rshard_hpc.engine import trace
from rshard_hpc.dist.collectives import _displs, _mpi, sleeping_waits, wait
from rshard_hpc.ops.arrays import xp_of


def _mpi_type(dtype):
    """The MPI datatype of a payload element: float32 activations, or uint16 bf16 bit patterns."""
    MPI = _mpi()
    types = {np.dtype(np.float32): MPI.FLOAT, np.dtype(np.uint16): MPI.UINT16_T}
    try:
        return types[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"Transport moves float32 or uint16 (bf16) payloads, not {np.dtype(dtype)}") from None


# --transport: how GPU workers move their buffers (transport_choice.py decides; here so that the CLI's options do
# not import the GPU transports to name them)
TRANSPORTS = ("auto", "staged", "mpi", "ipc", "nccl")

# Steps this small stage instead of using CUDA IPC. Measured on one H200, 7 ranks (SmolLM2 shape, 8k prompt,
# tools/device_session.sh decode): a one-token decode step 121 ms staged vs 156 ms over IPC; the 8k prefill
# 0.43 s staged vs 0.35 s over IPC.
SMALL_STEP_TOKENS = 64


class Transport:
    """Moves flat float32 (or uint16 bf16-bit) buffers over work_comm. Counts are in elements; stats
    record bytes and time.

    CuPy buffers go to MPI directly when `gpu_aware` (a CUDA-aware MPI library), otherwise they are staged
    through pinned host buffers that are grown on demand and reused (one per direction and element type).
    Either way the current CUDA stream is synchronized before every MPI call, so MPI never reads a buffer
    a kernel is still writing. `ipc` (a DeviceIpc) or `nccl` (an NcclExchange), when transport_choice set one
    up for a communicator, moves that communicator's device buffers instead.
    """

    def __init__(self, gpu_aware: bool = False, device: bool = False):
        self.gpu_aware = gpu_aware
        self.device = device  # this rank's buffers live on a GPU
        self.ipc = None  # a DeviceIpc for one communicator, when the CUDA IPC probe found it works
        self.nccl = None  # an NcclExchange for one communicator (one rank a GPU)
        self.small_step = False  # the step under way moves few rows: CUDA IPC gives way to staging (begin_step)
        self.signals = None  # a dist.ipc_signal.SignalledExchange over `ipc`, when its probe chose it
        self.signalled = False  # the step under way signals CUDA IPC on the device (begin_step … end_step)
        self.signalled_steps = 0  # steps so far that did
        self.reason = "NumPy buffers" if not device else "not chosen yet"  # why `mode` (for /stats and doctor)
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

    def alltoallv(self, comm, send, send_counts, recv_counts, out=None):
        """send: flat float32 or uint16 (NumPy or CuPy); the receive buffer has send's element type and
        array module (a receive-only call passes an empty array of the type it expects). out: a flat array of
        that type and module with room for exactly what arrives, to receive into (a captured CUDA graph reads
        it: engine/step_graphs.py); else a new array."""
        xp = xp_of(send)
        dtype = np.dtype(send.dtype)
        mpi_type = _mpi_type(dtype)
        send_counts = np.asarray(send_counts, dtype=np.int64)
        recv_counts = np.asarray(recv_counts, dtype=np.int64)
        n_recv = int(recv_counts.sum())
        if out is not None and (out.size != n_recv or out.dtype != dtype):
            raise ValueError(f"alltoallv: out holds {out.size} {out.dtype}, {n_recv} {dtype} arrive")
        on_gpu = xp is not np
        send = xp.ascontiguousarray(send).ravel()
        exchange = self.nccl or (None if self.small_step else self.ipc)
        if on_gpu and exchange is not None and exchange.comm is comm:
            trace.mark("x in")
            if self.signalled and exchange is self.ipc:
                recv, seconds = self.signals.alltoallv(send, send_counts, recv_counts, out=out)
            else:
                recv, seconds = exchange.alltoallv(send, send_counts, recv_counts)
            if out is not None and recv is not out:
                out[...] = recv
                recv = out
            trace.mark("x out")
            self._account(seconds["mpi"], seconds["copy"], send_counts, n_recv, dtype.itemsize)
            return recv
        staged = on_gpu and not self.gpu_aware
        trace.mark("x in")
        t0 = time.perf_counter()
        if staged:
            host_send = self._host_buffer("send", send.size, dtype)
            if send.size:
                send.get(out=host_send)  # device -> pinned host copy, after the stream's work
            host_recv = self._host_buffer("recv", n_recv, dtype)
        else:
            host_send, host_recv = send, (xp.empty(n_recv, dtype=dtype) if out is None else out)
        if on_gpu:
            xp.cuda.get_current_stream().synchronize()  # the stream must be idle before MPI touches memory
        t1 = time.perf_counter()
        trace.mark("x ready")
        buffers = ([host_send, (send_counts, _displs(send_counts)), mpi_type],
                   [host_recv, (recv_counts, _displs(recv_counts)), mpi_type])
        if sleeping_waits() and not on_gpu:
            wait(comm.Ialltoallv(*buffers))  # host buffers, ranks outnumber cores: a waiting rank sleeps
        else:
            comm.Alltoallv(*buffers)
        t2 = time.perf_counter()
        trace.mark("x mpi")
        if staged:
            recv = xp.empty(n_recv, dtype=dtype) if out is None else out
            if n_recv:
                recv.set(host_recv)  # pinned host -> device; the next call synchronizes before reusing host_recv
        else:
            recv = host_recv
        t3 = time.perf_counter()
        trace.mark("x out")
        self._account(t2 - t1, (t1 - t0) + (t3 - t2), send_counts, n_recv, dtype.itemsize)
        return recv

    def _account(self, mpi_s: float, staging_s: float, send_counts, n_recv: int, itemsize: int) -> None:
        self.mpi_seconds += mpi_s
        self.staging_seconds += staging_s
        self.bytes_sent += int(send_counts.sum()) * itemsize
        self.bytes_received += n_recv * itemsize

    @property
    def mode(self) -> str:
        """How this rank's buffers move: "host" (NumPy ranks), "nccl", "cuda-ipc", "cuda-aware MPI" or "staged"."""
        if not self.device:
            return "host"
        if self.nccl is not None:
            return "nccl"
        if self.ipc is not None:
            return "cuda-ipc"
        return "cuda-aware MPI" if self.gpu_aware else "staged"

    def begin_step(self, n_tokens: int, send_bytes: int = 0, causal: bool = True) -> None:
        """Every worker calls this with the step's token count (the same on every rank, so all take the same
        path), the most bytes it sends in one exchange of the step and whether the model is causal: steps of at most
        SMALL_STEP_TOKENS tokens (decode) stage through pinned host buffers even where CUDA IPC is on, whose two
        stream waits and peer copies cost more than a small staged copy; larger ones signal CUDA IPC on the device
        where its probe chose that and it takes the model's steps (SignalledExchange.takes; collective then: the
        outboxes are reserved for send_bytes). end_step closes the step."""
        self.small_step = n_tokens <= SMALL_STEP_TOKENS
        self.signalled = (self.signals is not None and not self.small_step and self.nccl is None
                          and self.signals.takes(causal))
        if self.signalled:
            self.signalled_steps += 1
            self.signals.reserve(send_bytes)

    def end_step(self) -> None:
        """Every worker calls this when its step's exchanges are queued: a device-signalled step is drained here
        and its waits' verdict read (an error names the peer that failed to post)."""
        if self.signalled:
            self.signalled = False
            self.signals.finish()

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
