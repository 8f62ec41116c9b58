"""The array-module switch: NumPy on CPUs, CuPy on GPUs. Model math asks `xp_of(array)`.

`array_module(device)` gives the module for `--device cpu|gpu`; `select_device()` binds this rank to a
GPU of its node (several ranks may share one GPU).
"""
from __future__ import annotations

import os

import numpy as np

from rshard_hpc.errors import RshardError

DEVICES = ("cpu", "gpu")
# Launcher variables holding a rank's index among the ranks of its node, most specific first: the MPI
# launcher's own before Slurm's, since `mpiexec` inside an allocation inherits SLURM_LOCALID=0 on every rank.
LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID")


def xp_of(array):
    """The array module (numpy or cupy) that owns `array`."""
    module = type(array).__module__
    if module.startswith("cupy"):
        import cupy

        return cupy
    return np


def to_host(array) -> np.ndarray:
    """A NumPy copy (or view) of a NumPy or CuPy array."""
    if isinstance(array, np.ndarray):
        return array
    return array.get()


def array_module(device: str):
    """numpy for "cpu", cupy for "gpu" (a clear RshardError when CuPy or a GPU is missing)."""
    if device == "cpu":
        return np
    if device != "gpu":
        raise RshardError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    try:
        import cupy
    except ImportError as exc:
        raise RshardError(f"--device gpu needs CuPy (pip install cupy-cuda12x or cupy-cuda13x): {exc}") from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise RshardError(f"--device gpu: CUDA finds no usable GPU ({exc})") from exc
    if count < 1:
        raise RshardError("--device gpu: CUDA finds no GPU on this node")
    return cupy


def local_rank_from_env(environ=None):
    """(local rank, variable name) from the launcher's environment, or (None, None)."""
    environ = os.environ if environ is None else environ
    for name in LOCAL_RANK_VARS:
        value = environ.get(name, "").strip()
        if value.isdigit():
            return int(value), name
    return None, None


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
        from rshard_hpc import comm as comm_mod

        local = comm_mod.node_local_rank(comm)
    count = cupy.cuda.runtime.getDeviceCount()
    device_id = int(local) % count
    cupy.cuda.Device(device_id).use()
    return device_id


def use_gpu(topo):
    """Bind this rank to a GPU of its node (see select_device) and return cupy."""
    select_device(comm=topo.world)
    return array_module("gpu")


def rank_backend(topo, device: str, gpu_aware_mode: str = "auto"):
    """(array module, comm.Transport) for this rank: the client stays on NumPy; CompNodes and AttnNodes go
    to a GPU of their node for --device gpu, with MPI given device buffers only on evidence (see comm)."""
    from rshard_hpc.comm import Transport

    if device == "gpu" and not topo.is_client:
        return use_gpu(topo), Transport(gpu_aware=choose_gpu_aware(gpu_aware_mode), device=True)
    return np, Transport()


def connect_workers(topo, transport, ipc_mode: str = "auto") -> None:
    """Collective over every rank of the job (the client takes no part in the exchange): GPU workers move
    their device buffers by CUDA IPC when all of them share one node and a probe proves it exact
    (--gpu-ipc auto|on|off; see comm.Transport.enable_device_ipc); `transport.mode` then says which."""
    if transport.device:
        transport.enable_device_ipc(topo.work_comm, ipc_mode)


def choose_gpu_aware(mode: str) -> bool:
    """--gpu-aware-mpi auto|on|off -> whether MPI gets device buffers (auto: only on evidence)."""
    from rshard_hpc import comm as comm_mod

    return comm_mod.resolve_gpu_aware(mode)[0]
