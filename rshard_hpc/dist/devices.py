"""GPU binding and the per-rank backend: which array module and which transport a rank works with."""
from __future__ import annotations

import os

import numpy as np

from rshard_hpc.dist.launcher import local_rank_from_env
from rshard_hpc.ops.arrays import array_module


def select_device(local_rank_hint=None, comm=None) -> int:
    """Bind this process to GPU (local rank mod device count) and return its index.

    The local rank comes from the launcher's variables (LOCAL_RANK_VARS), else `local_rank_hint`, else
    this rank's index in a shared-memory split of `comm` (COMM_WORLD by default; an MPI call, made in
    comm.py). More ranks than GPUs share them round-robin.
    """
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


# ------------------------------------------------------------------------------------------ several ranks a GPU
MPS_PIPE_ENV, MPS_DEFAULT_PIPE = "CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"  # where CUDA looks for an MPS daemon
# Measured (docs/bench_suite_h200.md, 2026-12-03, one H200, 13 ranks, same code, MPS off then on): what the note says
MPS_EVIDENCE = "an 8k-token bf16 prefill ran 43k tokens/s without MPS and 183k with it on one H200, 13 ranks"


def mps_visible(environ=None, exists=os.path.exists) -> bool:
    """Whether a CUDA MPS control daemon's pipe is where this process's CUDA contexts look for one
    ($CUDA_MPS_PIPE_DIRECTORY, else /tmp/nvidia-mps): they then run as clients of its server."""
    environ = os.environ if environ is None else environ
    return exists(os.path.join(environ.get(MPS_PIPE_ENV) or MPS_DEFAULT_PIPE, "control"))


def shared_without_mps(entries: list) -> str:
    """entries by rank: None (no GPU) or (host, PCI bus id, MPS daemon visible). "" unless ranks share a GPU and
    one of them sees no MPS daemon; else which GPUs: "host GPU bus (n ranks)", joined."""
    from rshard_hpc.dist.nccl import ranks_by_gpu

    users = ranks_by_gpu([entry[:2] if entry is not None else None for entry in entries])
    shared = [f"{host} GPU {bus} ({len(ranks)} ranks)" for (host, bus), ranks in sorted(users.items())
              if len(ranks) > 1 and not all(entries[r][2] for r in ranks)]
    return ", ".join(shared)


def gpu_sharing_note(world, on_gpu: bool) -> str:
    """Collective over world: on rank 0, a note when ranks share a GPU without CUDA MPS (their kernels then take
    turns on it: README, Several ranks on one GPU); "" when none do, and on every other rank."""
    from rshard_hpc.dist import collectives
    from rshard_hpc.dist.nccl import gpu_identity

    entry = None
    if on_gpu:
        try:
            entry = (*gpu_identity(), mps_visible())
        except Exception:  # noqa: BLE001 - a note only: a rank that cannot name its GPU still joins the gather
            entry = None
    gathered = collectives.gather_objects(world, entry)
    shared = shared_without_mps(gathered) if gathered is not None else ""
    if not shared:
        return ""
    return (f"note: ranks share a GPU without CUDA MPS ({shared}): their kernels take turns on it ({MPS_EVIDENCE}); "
            f"README, Several ranks on one GPU, says how to start it (RSHARD_MPS=1 with slurm/run.sh)")
