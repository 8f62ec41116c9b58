"""Alltoallv among one node's GPU ranks through CUDA IPC (device outboxes mapped by the peers; MPI carries only
the offsets), enabled after a collective probe proves it exact (`--transport ipc`, architecture.md §7).
"""
from __future__ import annotations

import time

import numpy as np

from rshard_hpc.dist.collectives import _displs, _mpi, _node_placement
from rshard_hpc.dist.device_copy import RangeCopier, kernel_copies
from rshard_hpc.engine import trace

_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: unified addressing picks the direction (and the peer device)


_IPC_LAZY_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess
IPC_HANDLE_BYTES = 64  # CUDA_IPC_HANDLE_SIZE
# what a rank tells each peer a call: a fixed-size record, so the exchange is one buffer Alltoall
NOTE = np.dtype([("parity", np.int64), ("generation", np.int64), ("offset", np.int64), ("nbytes", np.int64),
                 ("has_handle", np.int64), ("handle", np.uint8, IPC_HANDLE_BYTES)])


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
        self.copier = RangeCopier() if kernel_copies() else None  # None (default): a copy-engine memcpy per range

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
        cupy = self.cupy
        stream = cupy.cuda.get_current_stream()
        itemsize = send.dtype.itemsize
        parity = self.calls % 2
        self.calls += 1
        t0 = time.perf_counter()
        memory, generation, handle = self._outbox(parity, send.nbytes)
        self._copy(memory.ptr, [(send.data.ptr, 0, send.nbytes)], stream)
        stream.synchronize()  # my outbox is written before anyone learns where to read
        trace.mark("x ready")
        notes = self._notes(parity, generation, handle, _displs(send_counts) * itemsize,
                            np.asarray(send_counts, dtype=np.int64) * itemsize)
        t1 = time.perf_counter()
        got = np.empty_like(notes)
        self.comm.Alltoall(notes.view(np.uint8), got.view(np.uint8))  # fixed-size records: no pickling
        t2 = time.perf_counter()
        trace.mark("x mpi")
        recv = cupy.empty(int(np.sum(recv_counts)), dtype=send.dtype)
        at, ranges = 0, []
        for src, note in enumerate(got):
            src_parity, src_gen, offset, nbytes = (int(note[f]) for f in ("parity", "generation", "offset", "nbytes"))
            src_handle = bytes(note["handle"]) if note["has_handle"] else None
            if nbytes != int(recv_counts[src]) * itemsize:
                raise RuntimeError(f"CUDA IPC: rank {src} sends {nbytes} bytes, rank {self.rank} expects "
                                   f"{int(recv_counts[src]) * itemsize}")
            if nbytes:
                base = memory.ptr if src == self.rank else self._peer_pointer(src, src_parity, src_gen, src_handle)
                ranges.append((base + offset, at, nbytes))
            at += nbytes
        self._copy(recv.data.ptr, ranges, stream)
        stream.synchronize()  # my reads of the peers' outboxes are done before I leave (see the class note)
        t3 = time.perf_counter()
        return recv, {"mpi": t2 - t1, "copy": (t1 - t0) + (t3 - t2)}

    def _copy(self, dst_ptr: int, ranges: list, stream) -> None:
        """ranges [(source address, destination offset, bytes), …] into dst on the stream: a copy-engine memcpy
        each, or one kernel launch with RSHARD_IPC_COPY=kernel (dist/device_copy.py). The caller synchronizes the
        stream before the next call (the kernel's table of ranges is then free again)."""
        if self.copier is not None:
            self.copier.copy(dst_ptr, ranges)
            return
        for src_ptr, offset, nbytes in ranges:
            if nbytes:
                self.cupy.cuda.runtime.memcpyAsync(dst_ptr + offset, src_ptr, nbytes, _MEMCPY_DEFAULT, stream.ptr)

    def _notes(self, parity: int, generation: int, handle: bytes, offsets, nbytes):
        """My record for each peer: where in my outbox its bytes lie, and my outbox's IPC handle when that peer has
        not been sent this generation's yet."""
        notes = np.zeros(self.size, dtype=NOTE)
        notes["parity"], notes["generation"], notes["offset"], notes["nbytes"] = parity, generation, offsets, nbytes
        for peer in range(self.size):
            if self.told[parity][peer] != generation and peer != self.rank:
                notes["has_handle"][peer] = 1
                notes["handle"][peer] = np.frombuffer(handle, dtype=np.uint8)
            self.told[parity][peer] = generation
        return notes


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
                got = cupy.full(64, -1, cupy.float32)
                ipc._copy(got.data.ptr, [(pointer, 0, got.nbytes)], cupy.cuda.get_current_stream())
                cupy.cuda.get_current_stream().synchronize()  # the way an exchange reads: kernel or memcpy
                if not bool((got == 1000 * src + parity).all()):
                    return f"rank {ipc.rank} read wrong data from rank {src}"
        for parity in (0, 1):
            ipc.told[parity] = [parity + 1] * ipc.size  # every peer holds my outboxes' handles now
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None
