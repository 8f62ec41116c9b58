"""CUDA's start ahead of everything else (issue 13: a GPU rank's start-up). A rank's CUDA start (CuPy's import,
the GPU's context, cuBLAS) costs 0.7-1.5 s where 7-13 ranks share one H200, largely one rank after another; begun
in a background thread as the process starts, it overlaps Python's imports, MPI's start and the client's reading
of prompts. Imports nothing heavy: it runs from the package's __init__ for an `rshard run --device gpu` command
line (start_from_argv), else from the run command once its options are parsed (start). select_device joins it.
"""
from __future__ import annotations

import os
import threading

ENV_VAR = "RSHARD_EARLY_GPU"  # "0": no early CUDA start (to compare start-up times)
_threads: list = []


def start(device: str, client_uses_gpu: bool) -> bool:
    """Start this rank's CUDA in a thread when it will use a GPU: --device gpu, a launcher-given node-local rank
    (the GPU is then the one select_device picks), and not the client (world rank 0) unless `client_uses_gpu`.
    Once a process. Whatever fails here is left to select_device, which meets it again and says so."""
    from rshard_hpc.dist.launcher import local_rank_from_env, world_rank

    local, _ = local_rank_from_env()
    if device != "gpu" or local is None or os.environ.get(ENV_VAR) == "0" or _threads:
        return False
    if world_rank() == 0 and not client_uses_gpu:
        return False
    thread = threading.Thread(target=_start_cuda, args=(local,), name="rshard-early-gpu", daemon=True)
    thread.start()
    _threads.append(thread)
    return True


def start_from_argv(argv: list) -> bool:
    """start() for a command line `… run … --device gpu …` (the options as typed, before click parses them)."""
    args = list(argv[1:])
    if not args or args[0] != "run" or _option(args, "--device") != "gpu":
        return False
    return start("gpu", _option(args, "--client-layers") != "0" or _option(args, "--task") == "generate")


def join() -> None:
    """Wait for the early start (a no-op where none began)."""
    for thread in _threads:
        thread.join()


def _option(args: list, flag: str):
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _start_cuda(local: int) -> None:
    try:
        import cupy

        cupy.cuda.Device(local % cupy.cuda.runtime.getDeviceCount()).use()  # creates the primary context
        cupy.cuda.device.get_cublas_handle()  # loads cuBLAS (the handle is this thread's; the library stays)
    except Exception:  # noqa: BLE001 - select_device meets the same problem on the main thread and reports it
        pass
