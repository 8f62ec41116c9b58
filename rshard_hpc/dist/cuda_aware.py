"""Is the loaded MPI library CUDA-aware? `--transport auto` gives MPI device buffers only on evidence (architecture.md §7)."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

from rshard_hpc.dist.collectives import _mpi


NO_EVIDENCE = "no evidence of CUDA support"  # the one verdict that is not a library's (or a setting's) own "no"


def said_not_cuda_aware(evidence: str) -> bool:
    """Whether a (False, evidence) of detect_cuda_aware is a definite no (an MPI that would crash on a device
    buffer) rather than the absence of any evidence."""
    return not evidence.startswith(NO_EVIDENCE)


def detect_cuda_aware() -> tuple[bool, str]:
    """(True, evidence) only when the loaded MPI library says it moves CUDA device buffers; else (False, why).

    Evidence, in order: an explicit "no" from the environment (MPICH's MPIR_CVAR_ENABLE_GPU=0,
    OMPI_MCA_opal_cuda_support=0); MPIX_Query_cuda_support() of the loaded library (Open MPI, MPICH >= 4,
    and their derivatives); vendor switches of MPIs known to need them (Cray MPICH's
    MPICH_GPU_SUPPORT_ENABLED=1, MVAPICH2's MV2_USE_CUDA=1); Open MPI's `ompi_info` build flag.
    """
    library = mpi_library_version()
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
    return False, f"{NO_EVIDENCE} in {first_line}"


def mpi_library_version() -> str:
    """The loaded MPI library's own version text (MPI_Get_library_version); "" when MPI cannot be loaded."""
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
