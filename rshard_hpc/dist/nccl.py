"""Alltoallv among GPU workers over NCCL (CuPy's bindings, cupy.cuda.nccl): one communicator a job, its unique id
broadcast over MPI; a layer's exchange is one group of send/recv on the current stream, with no host
synchronization (`--transport nccl`, architecture.md §7). One rank a GPU: NCCL refuses two ranks of a
communicator on one device, so gpu_sharing() checks that first.
"""
from __future__ import annotations

import time

import numpy as np

from rshard_hpc.dist import collectives
from rshard_hpc.dist.collectives import _displs


def load_nccl():
    """(cupy.cuda.nccl, "") when NCCL can be used here, else (None, why not)."""
    try:
        from cupy.cuda import nccl
    except Exception as exc:  # noqa: BLE001 - no CuPy, or a CuPy built without NCCL
        return None, f"cupy.cuda.nccl cannot be imported ({type(exc).__name__}: {exc})"
    if not getattr(nccl, "available", True):
        return None, "CuPy was built without NCCL (cupy.cuda.nccl.available is False)"
    try:
        nccl.get_version()
    except Exception as exc:  # noqa: BLE001 - libnccl missing at run time
        return None, f"the NCCL library cannot be loaded ({type(exc).__name__}: {exc})"
    return nccl, ""


def nccl_version(nccl) -> str:
    """"2.28.3" from NCCL's integer version (major*10000 + minor*100 + patch since 2.9)."""
    v = int(nccl.get_version())
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}" if v >= 10000 else f"{v // 1000}.{v // 100 % 10}.{v % 100}"


def gpu_identity() -> tuple[str, str]:
    """(host, PCI bus id) of the GPU this process uses: two ranks with the same pair share one device."""
    import socket

    import cupy

    device, runtime = cupy.cuda.Device(), cupy.cuda.runtime
    try:
        bus = runtime.deviceGetPCIBusId(device.id)
    except AttributeError:  # an older CuPy: the same numbers from the device's properties
        props = runtime.getDeviceProperties(device.id)
        bus = f"{props['pciDomainID']:04x}:{props['pciBusID']:02x}:{props['pciDeviceID']:02x}.0"
    return socket.gethostname(), str(bus)


def ranks_by_gpu(identities) -> dict:
    """{identity: [ranks]} in first-seen order, identities by rank ((host, PCI bus id), or any key naming one
    device; None: a rank without a GPU, left out). The one grouping of ranks by device: NCCL's refusal, the
    set-up's MPS note and the doctor's warnings read it."""
    users = {}
    for rank, ident in enumerate(identities):
        if ident is not None:
            users.setdefault(tuple(ident), []).append(rank)
    return users


def gpu_sharing(identities: list) -> str:
    """"" when every rank has a GPU of its own, else which ranks share which (host, bus id) device.
    identities: (host, PCI bus id) by rank."""
    return "; ".join(f"ranks {', '.join(map(str, ranks))} on {host} GPU {bus}"
                     for (host, bus), ranks in ranks_by_gpu(identities).items() if len(ranks) > 1)


def bootstrap(comm, nccl):
    """Collective over comm: the NCCL communicator of its ranks. Rank 0 makes the unique id, MPI broadcasts it,
    every rank joins with its comm rank (ncclCommInitRank, blocking until all have joined)."""
    uid = nccl.get_unique_id() if comm.Get_rank() == 0 else None
    uid = collectives.bcast(comm, uid, root=0)
    return nccl.NcclCommunicator(comm.Get_size(), uid, comm.Get_rank())


def _device_pointer(array) -> int:
    return array.data.ptr


class NcclExchange:
    """Alltoallv over one NCCL communicator whose ranks are those of `comm`, in the same order.

    A call posts, inside one nccl.groupStart()/groupEnd(), a send to every peer with a nonzero send count and
    a receive from every peer with a nonzero receive count (bytes, as NCCL_UINT8: float32 and bf16 bits alike)
    on the current stream; the part a rank keeps for itself is a device copy. Nothing waits on the host: later
    kernels on the stream see the received data, and CuPy's pool reuses the send buffer's memory only for work
    on the same stream, which runs after the exchange.
    """

    def __init__(self, comm, communicator, nccl, xp, pointer=_device_pointer):
        self.comm, self.communicator, self.nccl, self.xp = comm, communicator, nccl, xp
        self.rank = comm.Get_rank()
        self._pointer = pointer  # array -> device address (tests pass NumPy's)

    def alltoallv(self, send, send_counts, recv_counts):
        """send: flat contiguous array; counts in elements. Returns (recv, {"mpi": s, "copy": s}): the time to
        post the group (the transfer itself runs on the stream) and the time of the local copy."""
        xp, nccl = self.xp, self.nccl
        itemsize = send.dtype.itemsize
        recv = xp.empty(int(np.sum(recv_counts)), dtype=send.dtype)
        send_at, recv_at = _displs(send_counts), _displs(recv_counts)
        stream = xp.cuda.get_current_stream().ptr
        t0 = time.perf_counter()
        own = int(send_counts[self.rank])
        if own != int(recv_counts[self.rank]):
            raise RuntimeError(f"NCCL exchange: rank {self.rank} sends itself {own} elements but expects "
                               f"{int(recv_counts[self.rank])}")
        if own:
            recv[recv_at[self.rank]:recv_at[self.rank] + own] = send[send_at[self.rank]:send_at[self.rank] + own]
        t1 = time.perf_counter()
        send_base, recv_base = self._pointer(send), self._pointer(recv)
        nccl.groupStart()
        try:
            for peer in range(len(send_counts)):
                if peer == self.rank:
                    continue
                if send_counts[peer]:
                    self.communicator.send(send_base + int(send_at[peer]) * itemsize,
                                           int(send_counts[peer]) * itemsize, nccl.NCCL_UINT8, peer, stream)
                if recv_counts[peer]:
                    self.communicator.recv(recv_base + int(recv_at[peer]) * itemsize,
                                           int(recv_counts[peer]) * itemsize, nccl.NCCL_UINT8, peer, stream)
        finally:
            nccl.groupEnd()
        t2 = time.perf_counter()
        return recv, {"mpi": t2 - t1, "copy": t1 - t0}
