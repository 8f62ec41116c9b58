"""The CUDA IPC exchange signalled on the device (kernels/ipc_signal.cu, architecture.md §7): within a step, a
rank's exchange is queued on its stream, `publish` (my send buffer into my outbox, then a note in every peer's
mailbox and one more in its count), a stream wait (cuStreamWaitValue64: the GPU's front end waits, no SM is
held) until my mailbox's count says every peer has posted the call, and `collect` (my bytes out of the peers'
outboxes). No rank's host waits for its GPU or for MPI between the layers of a step: each host queues the step's
launches while the GPUs work.

What MPI still does, once a step (`reserve`, collective): the outboxes grow where a rank's step sends more than
they hold, and the peers map the new ones (every rank's stream idle first: nothing in flight reads an outbox).
`finish` ends the step: it waits for the stream (at most RSHARD_IPC_WAIT_S: a peer that stopped posting is an
error, not a hang) and reads the status the collects wrote (a note for another call, or another byte count than
the routing gives, is an error naming the peer).

Chosen with evidence (`probe`): a collective round of signalled exchanges must move exact data, each call
within PROBE_CALL_S on average. RSHARD_IPC_SIGNAL=device|host forces the choice.
"""
from __future__ import annotations

import os
import time

import numpy as np

from rshard_hpc.dist.collectives import _displs
from rshard_hpc.dist.cuda_ipc import _IPC_LAZY_PEER_ACCESS
from rshard_hpc.ops.cuda_build import _blocks, _kernel

SOURCE = "ipc_signal.cu"
THREADS = 256
HEADER_WORDS = 8  # int64 words before a mailbox's notes: the count of notes posted to it, then unused
NOTE_WORDS = 4  # int64 words of a note: call, offset, bytes, unused (kernels/ipc_signal.cu)
COPY_BYTES = 64  # bytes a thread of publish or collect moves a pass (four 16-byte words in flight)
COPY_BLOCKS = 256  # blocks of a publish or a collect at most (fewer for fewer bytes). Measured on one H200
# (4,096-prompt MiniLM job, 13 ranks, MPS on): 8 collect blocks and one load in flight a thread made the signalled
# exchange slower than the host-signalled one there (docs/bench_suite_h200.md)
SIGNAL_ENV = "RSHARD_IPC_SIGNAL"  # auto (default: the probe decides), device or host
WAIT_ENV = "RSHARD_IPC_WAIT_S"  # how long a step's end waits for the stream before it reports a stalled exchange
WAIT_S = 120.0
FINISH_POLL_S = 1e-4  # how often a step's end asks whether the stream is done
PROBE_CALLS = 32
PROBE_WAIT_S = 5.0  # the probe's own limit on waiting for its calls
# Mean seconds a probe call may take on the slowest rank. Measured on one H200: 0.46-0.83 ms with CUDA MPS (7 and
# 13 ranks), 1.12 ms without it at 7 ranks (kernels of several processes then take turns on the GPU).
PROBE_CALL_S = 1e-3
TABLE_CACHE = 64  # device copies of count tables kept (two a step: the q/k/v and the partials' calls)
_WAIT_GEQ = 0  # CU_STREAM_WAIT_VALUE_GEQ (cuda.h)


def defines() -> dict:
    return {"PASS_THREADS": THREADS}


def signal_mode() -> str:
    """RSHARD_IPC_SIGNAL: auto, device or host."""
    mode = os.environ.get(SIGNAL_ENV, "auto")
    if mode not in ("auto", "device", "host"):
        raise ValueError(f"{SIGNAL_ENV} must be auto, device or host (got {mode!r})")
    return mode


def wait_seconds() -> float:
    return float(os.environ.get(WAIT_ENV, WAIT_S))


class SignalledExchange:
    """Device-signalled Alltoallv over a DeviceIpc's outboxes (same comm, same call count). Collective: the
    constructor, `reserve`; every rank makes the same sequence of calls."""

    def __init__(self, ipc, timeout_s: float):
        cupy = ipc.cupy
        self.ipc, self.cupy, self.comm = ipc, cupy, ipc.comm
        size = ipc.size
        self.timeout_s = timeout_s
        self._wait_value = _stream_wait_value64()
        nbytes = (HEADER_WORDS + 2 * size * NOTE_WORDS) * 8
        self._mailbox_memory = cupy.cuda.Memory(nbytes)  # its own cudaMalloc: peers map it by an IPC handle
        cupy.cuda.runtime.memset(self._mailbox_memory.ptr, 0, nbytes)
        self.mailbox = cupy.ndarray((nbytes // 8,), cupy.int64, cupy.cuda.MemoryPointer(self._mailbox_memory, 0))
        self.done = cupy.zeros(1, cupy.uint32)  # publish's count of finished blocks
        self.status = cupy.zeros(1, cupy.int32)  # the collects' verdict (kernels/ipc_signal.cu)
        self.mailboxes = self._map_mailboxes(cupy.cuda.runtime.ipcGetMemHandle(self._mailbox_memory.ptr))
        self.outboxes = None  # uint64 [2 size]: each rank's outbox of each parity, as mapped here
        self._mapped = None  # my outboxes' generations when the peers last mapped them
        self.reserved = 0  # bytes a send may take until the next reserve
        self.posts = 0  # signalled calls so far: each added one to every rank's count (host-signalled calls none)
        self._tables = {}  # (counts, itemsize) -> device int64 [2 size]: byte offsets and counts
        self.every_step = False  # an encoder's steps signal too (RSHARD_IPC_SIGNAL=device; set by probe)

    def _map_mailboxes(self, handle: bytes):
        runtime = self.cupy.cuda.runtime
        pointers = []
        for src, peer_handle in enumerate(self.comm.allgather(handle)):
            pointers.append(self._mailbox_memory.ptr if src == self.ipc.rank else
                            runtime.ipcOpenMemHandle(peer_handle, _IPC_LAZY_PEER_ACCESS))
        return self.cupy.asarray(np.asarray(pointers, dtype=np.uint64))

    def takes(self, causal: bool) -> bool:
        """Whether a large step of a decoder (causal) or an encoder model signals on the device: a decoder's does;
        an encoder's only under RSHARD_IPC_SIGNAL=device. Measured on one H200 with MPS, alternating: the 4,096-prompt
        MiniLM embedding job ran slower signalled in 8 pairs of 8 (13 and 7 ranks, by 0.1-0.8 s of 1.3-3 s), while
        SmolLM2-shape prefills ran 1.3-2x faster (docs/bench_suite_h200.md). Why (a trace with device marks): an
        embedding batch is one step, whose hand-offs with the client set its pace (architecture.md §7)."""
        return causal or self.every_step

    def reserve(self, nbytes: int) -> None:
        """Collective, at a step's start: every rank's outboxes hold its largest send of the step (nbytes) and
        every rank has them mapped."""
        ipc = self.ipc
        boxes = ipc.boxes
        small = any(box is None or box[0].size < nbytes for box in boxes)
        generations = tuple(None if box is None else box[1] for box in boxes)
        stale = small or self.outboxes is None or generations != self._mapped
        if not any(self.comm.allgather(stale)):
            self.reserved = min(box[0].size for box in boxes)
            return
        self.cupy.cuda.get_current_stream().synchronize()  # nothing of mine in flight reads or writes an outbox
        self.comm.Barrier()  # ... nor anyone's
        for parity in (0, 1):
            ipc._outbox(parity, max(nbytes, 1))
        mine = [(box[1], box[2]) for box in ipc.boxes]  # (generation, IPC handle) per parity
        pointers = np.zeros((2, ipc.size), dtype=np.uint64)
        for src, boxes_of_src in enumerate(self.comm.allgather(mine)):
            for parity, (generation, handle) in enumerate(boxes_of_src):
                pointers[parity, src] = (ipc.boxes[parity][0].ptr if src == ipc.rank
                                         else ipc._peer_pointer(src, parity, generation, handle))
        for parity in (0, 1):
            ipc.told[parity] = [ipc.boxes[parity][1]] * ipc.size  # host-signalled calls: every peer has them
        self.outboxes = self.cupy.asarray(pointers.ravel())
        self._mapped = tuple(box[1] for box in ipc.boxes)
        self.reserved = min(box[0].size for box in ipc.boxes)

    def alltoallv(self, send, send_counts, recv_counts, out=None):
        """As DeviceIpc.alltoallv (counts in elements), queued on the stream: returns (recv, seconds) at once."""
        cupy, ipc = self.cupy, self.ipc
        t0 = time.perf_counter()
        itemsize = send.dtype.itemsize
        if send.nbytes > self.reserved:
            raise RuntimeError(f"CUDA IPC signalling: a send of {send.nbytes} bytes, {self.reserved} reserved "
                               f"for the step")
        parity, call, count = self._next_call()
        routes = self._table(send_counts, itemsize)
        expect = self._table(recv_counts, itemsize)
        n_recv = int(np.sum(recv_counts))
        recv = cupy.empty(n_recv, dtype=send.dtype) if out is None else out
        stream = cupy.cuda.get_current_stream()
        publish = _kernel(SOURCE, "signal_publish", defines())
        collect = _kernel(SOURCE, "signal_collect", defines())
        publish(_blocks(send.nbytes // COPY_BYTES, THREADS, COPY_BLOCKS), (THREADS,),
                (send, np.int64(send.nbytes), np.uint64(ipc.boxes[parity][0].ptr), routes, self.mailboxes,
                 self.done, np.int32(ipc.rank), np.int32(ipc.size), np.int32(parity), np.int64(call)),
                stream=stream)
        self._wait_value(stream.ptr, self._mailbox_memory.ptr, count)  # every peer has posted `call`
        collect(_blocks(n_recv * itemsize // COPY_BYTES, THREADS, COPY_BLOCKS), (THREADS,),
                (recv, self.mailbox, self.outboxes, expect, self.status, np.int32(ipc.size), np.int32(parity),
                 np.int64(call)), stream=stream)
        return recv, {"mpi": 0.0, "copy": time.perf_counter() - t0}

    def _next_call(self) -> tuple:
        """(outbox and slot parity, call, the count my mailbox reaches once every peer has posted it) of the next
        call. Calls number the IPC exchange's calls, host-signalled ones too (the outboxes alternate over all);
        the count grows by the ranks at signalled calls alone."""
        ipc = self.ipc
        parity = ipc.calls % 2
        ipc.calls += 1
        self.posts += 1
        return parity, ipc.calls, self.posts * ipc.size  # calls from 1: a zeroed mailbox holds none

    def _table(self, counts, itemsize: int):
        """Device int64 [2 size]: (byte offset, bytes) per rank of these counts, made once per distinct counts."""
        counts = np.asarray(counts, dtype=np.int64)
        key = (counts.tobytes(), itemsize)
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) >= TABLE_CACHE:
                self._tables.clear()
            host = np.stack([_displs(counts) * itemsize, counts * itemsize], axis=1).ravel()
            table = self._tables[key] = self.cupy.asarray(host)
        return table

    def finish(self) -> None:
        """The step's end: my stream drained (at most timeout_s) and the collects' status read; a stalled exchange
        or a failed check is a RuntimeError."""
        stream = self.cupy.cuda.get_current_stream()
        deadline = time.monotonic() + self.timeout_s
        while not stream.done:
            if time.monotonic() > deadline:
                raise RuntimeError(f"CUDA IPC signalling: rank {self.ipc.rank} of the workers waited "
                                   f"{self.timeout_s:g} s for its step's exchanges; a peer stopped or hangs "
                                   f"({WAIT_ENV} sets the limit)")
            time.sleep(FINISH_POLL_S)
        status = int(self.status.get()[0])
        if status > 0:
            raise RuntimeError(f"CUDA IPC signalling: rank {status - 1} of the workers left rank {self.ipc.rank} "
                               f"a note of another call (the exchanges' order differs between ranks)")
        if status < 0:
            raise RuntimeError(f"CUDA IPC signalling: rank {-status - 1} of the workers sent rank {self.ipc.rank} "
                               f"another byte count than the step's routing gives")


def _stream_wait_value64():
    """wait(stream, address, value): queue a wait on the stream until the 64-bit word at `address` (a device
    address of this context) is >= value (cuStreamWaitValue64 of the CUDA driver, by ctypes: CuPy has no binding).
    An error where the driver lacks it or the device refuses stream memory operations."""
    import ctypes

    driver = ctypes.CDLL("libcuda.so.1")
    function = getattr(driver, "cuStreamWaitValue64_v2", None) or driver.cuStreamWaitValue64
    function.argtypes = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint)
    function.restype = ctypes.c_int

    def wait(stream: int, address: int, value: int) -> None:
        code = function(stream, address, value, _WAIT_GEQ)
        if code:
            raise RuntimeError(f"cuStreamWaitValue64 failed (CUresult {code})")

    return wait


def probe(ipc):
    """Collective over ipc.comm: (SignalledExchange, why) when signalled exchanges are exact and fast here,
    else (None, why). RSHARD_IPC_SIGNAL=host skips it; =device takes it when exact, however fast."""
    mode = signal_mode()
    if mode == "host":
        return None, f"{SIGNAL_ENV}=host"
    exchange, error, seconds = None, None, 0.0
    try:
        exchange = SignalledExchange(ipc, PROBE_WAIT_S)
        seconds = _probe_rounds(exchange)
    except Exception as exc:  # noqa: BLE001 - the verdict is collective below
        error = f"{type(exc).__name__}: {exc}"
    verdicts = ipc.comm.allgather((error, seconds))
    errors = [e for e, _ in verdicts if e]
    slowest = max(s for _, s in verdicts) / PROBE_CALLS
    if errors:
        return None, f"device signalling probe failed ({errors[0]})"
    if mode == "auto" and slowest > PROBE_CALL_S:
        return None, (f"device signalling not taken: {slowest * 1e3:.2f} ms a call in the probe (> "
                      f"{PROBE_CALL_S * 1e3:g} ms; CUDA MPS off?)")
    exchange.timeout_s = wait_seconds()
    exchange.every_step = mode == "device"
    steps = "every large step" if exchange.every_step else "a decoder's large steps"
    return exchange, f"signalled on the device ({steps}; {slowest * 1e6:.0f} us a call in the probe)"


def _probe_rounds(exchange) -> float:
    """PROBE_CALLS signalled exchanges of rank-tagged values (sizes varying by call), checked; their seconds."""
    cupy, ipc = exchange.cupy, exchange.ipc
    rank, size = ipc.rank, ipc.size
    exchange.reserve(4 * size * (4 * 16 + 2))  # float32, the most a call below sends
    received = []
    for call in range(PROBE_CALLS + 1):
        if call == 1:  # the first call compiled or loaded the kernels: untimed
            exchange.finish()
            ipc.comm.Barrier()
            t0 = time.perf_counter()
        counts = np.array([(rank + peer + call) % 5 * 16 + call % 3 for peer in range(size)], dtype=np.int64)
        recv_counts = counts  # symmetric: peer sends me what I send it
        send = cupy.concatenate([cupy.full(int(c), 1000 * rank + peer + call, cupy.float32)
                                 for peer, c in enumerate(counts)])
        received.append((exchange.alltoallv(send, counts, recv_counts)[0], recv_counts, call))
    exchange.finish()
    seconds = time.perf_counter() - t0
    for recv, recv_counts, call in received:
        want = np.concatenate([np.full(int(c), 1000 * peer + rank + call, np.float32)
                               for peer, c in enumerate(recv_counts)])
        if not np.array_equal(cupy.asnumpy(recv), want):
            raise RuntimeError(f"rank {rank} received wrong data in probe call {call}")
    return seconds
