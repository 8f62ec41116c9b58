"""GPU binding and the per-rank backend: which array module and which transport a rank works with."""
from __future__ import annotations

import os
import threading

import numpy as np

from rshard_hpc.dist.launcher import local_rank_from_env, world_rank
from rshard_hpc.ops.arrays import array_module

EARLY_GPU_ENV = "RSHARD_EARLY_GPU"  # "0": no early CUDA start (start_gpu_early), for comparing start-up times
_early_threads: list = []  # the thread start_gpu_early started, joined by select_device


def start_gpu_early(device: str, client_uses_gpu: bool) -> bool:
    """Before MPI is up, start this rank's CUDA in a background thread: CuPy's import, the GPU's context and the
    cuBLAS library, the slowest part of a GPU rank's start (0.7-1.5 s a rank where 7-13 ranks share one H200), so
    that it overlaps Python's imports, MPI's start and the client's reading of prompts. Only where the launcher
    names the node-local rank (the GPU is then the one select_device picks) and only on ranks that will use a
    GPU: every rank but the client (world rank 0), which does when `client_uses_gpu`. Whatever fails here is left
    to select_device, which meets it again and says so. True when started."""
    local, _ = local_rank_from_env()
    if device != "gpu" or local is None or os.environ.get(EARLY_GPU_ENV) == "0":
        return False
    if world_rank() == 0 and not client_uses_gpu:
        return False
    thread = threading.Thread(target=_start_cuda, args=(local,), name="rshard-early-gpu", daemon=True)
    thread.start()
    _early_threads.append(thread)
    return True


def _start_cuda(local: int) -> None:
    try:
        import cupy

        cupy.cuda.Device(local % cupy.cuda.runtime.getDeviceCount()).use()  # creates the primary context
        cupy.cuda.device.get_cublas_handle()  # loads cuBLAS (the handle is this thread's; the library stays)
    except Exception:  # noqa: BLE001 - select_device meets the same problem on the main thread and reports it
        pass


def _join_early_gpu() -> None:
    while _early_threads:
        _early_threads.pop().join()


def select_device(local_rank_hint=None, comm=None) -> int:
    """Bind this process to GPU (local rank mod device count) and return its index.

    The local rank comes from the launcher's variables (LOCAL_RANK_VARS), else `local_rank_hint`, else
    this rank's index in a shared-memory split of `comm` (COMM_WORLD by default; an MPI call, made in
    comm.py). More ranks than GPUs share them round-robin.
    """
    _join_early_gpu()
    cupy = array_module("gpu")
    local, _ = local_rank_from_env()
    if local is None:
        local = local_rank_hint
    if local is None:
        from rshard_hpc.dist import collectives

        local = collectives.node_local_rank(comm)
    count = cupy.cuda.runtime.getDeviceCount()
    device_id = int(local) % count
    cupy.cuda.Device(device_id).use()
    return device_id


def use_gpu(topo):
    """Bind this rank to a GPU of its node (see select_device) and return cupy."""
    select_device(comm=topo.world)
    return array_module("gpu")


def rank_backend(topo, device: str, client_gpu: bool = False):
    """(array module, Transport) for this rank: CompNodes and AttnNodes go to a GPU of their node for --device gpu
    (connect_workers then decides how their device buffers move). The client stays on NumPy unless `client_gpu`
    (it runs layers itself: --client-layers); its transport is host-side either way."""
    from rshard_hpc.dist.transport import Transport

    if device == "gpu" and not topo.is_client:
        return use_gpu(topo), Transport(device=True)
    if device == "gpu" and client_gpu:
        return use_gpu(topo), Transport()
    return np, Transport()


def connect_workers(topo, transport, mode: str = "auto", job_tokens: int | None = None) -> str:
    """Collective over every rank of the job (the client takes no part in the exchange): the GPU workers pick
    their transport together (--transport auto|staged|mpi|ipc|nccl, dist/transport_choice.py) and return why;
    `transport.mode` then says which. "" on the client and on CPU ranks. job_tokens: the job's size where known
    (auto skips NCCL and CUDA IPC for a small job)."""
    if not transport.device:
        return ""
    from rshard_hpc.dist.transport_choice import choose_transport

    transport.reason = choose_transport(topo.work_comm, transport, mode, job_tokens=job_tokens)
    return transport.reason
