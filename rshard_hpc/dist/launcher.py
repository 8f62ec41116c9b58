"""What the MPI launcher (mpiexec, srun) tells a process through its environment, read in one place: the
world rank, the node-local rank and size, and the announced job size; and what a rank's process makes of it where
several share a node (BLAS threads, MPICH's yielding, sleeping waits, memory and the cycle collector). Nothing here
calls MPI."""
from __future__ import annotations

import gc
import os

from rshard_hpc.errors import InputError

# Launcher variables holding a rank's index among the ranks of its node, most specific first: the MPI
# launcher's own before Slurm's, since `mpiexec` inside an allocation inherits SLURM_LOCALID=0 on every rank.
LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID")


def local_rank_from_env(environ=None):
    """(local rank, variable name) from the launcher's environment, or (None, None)."""
    environ = os.environ if environ is None else environ
    for name in LOCAL_RANK_VARS:
        value = environ.get(name, "").strip()
        if value.isdigit():
            return int(value), name
    return None, None


def world_rank() -> int:
    """This process's rank in the job as the launcher announced it (0 when not launched as a job): for messages
    before MPI is up."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


WAIT_ENV = "RSHARD_WAIT"  # how a rank waits for the others: "sleep", "spin", or unset (sleep when oversubscribed)
SCHED_ENV = "RSHARD_SCHED"  # the kernel's policy for a rank: "batch", "normal", or unset (batch when oversubscribed)


# Launcher variables announcing how many ranks share this node: MPICH's and Open MPI's counts, then Slurm's
# per-node task list of the step (read with SLURM_NODEID: _slurm_local_tasks)
LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")
SLURM_TASKS_PER_NODE_VAR = "SLURM_STEP_TASKS_PER_NODE"
NODE_SIZE_VARS = LOCAL_SIZE_VARS + (SLURM_TASKS_PER_NODE_VAR,)  # every variable local_rank_count reads


def local_rank_count() -> int | None:
    """How many ranks of this job the launcher started on this node (None when it does not say)."""
    local = next((os.environ[var] for var in LOCAL_SIZE_VARS if os.environ.get(var)), "") or _slurm_local_tasks()
    return int(local) if local.isdigit() else None


def oversubscribed() -> bool:
    """More ranks of this job on this node than it has cores (as the launcher announces them)."""
    local = local_rank_count()
    return local is not None and local > (os.cpu_count() or 1)


def ranks_sharing_node() -> int:
    """How many ranks of this job share this node where the launcher announces two or more, else 0: where the
    process settings below (BLAS threads, a lean process) apply."""
    ranks = local_rank_count()
    return ranks if ranks is not None and ranks >= 2 else 0


BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def share_cores_among_ranks() -> None:
    """Before NumPy loads its BLAS (which reads these once): each of a node's ranks gets cores // ranks threads
    (at least 1) unless the variables are set already. A BLAS starting a thread a core in each of 13 ranks on 2
    cores made one 128-token MiniLM prompt take 0.55 s in the job against 0.29 s with one thread a rank
    (measured back to back here). Thread counts change the last bits of a GEMM's sum, not its accuracy."""
    ranks = ranks_sharing_node()
    if not ranks:
        return
    threads = str(max(1, (os.cpu_count() or 1) // ranks))
    for var in BLAS_THREAD_VARS:
        os.environ.setdefault(var, threads)


# glibc's malloc (mallopt parameters, malloc.h): where several ranks share a node, arrays up to 256 MiB come from
# the heap (glibc's default: from 128 KiB, rising to at most 32 MiB, each array above it mapped afresh) and freed
# memory stays there up to 1 GiB, so the next step's arrays reuse pages already mapped instead of faulting in (and
# zeroing) fresh ones
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_ARRAYS_UP_TO = 256 << 20
KEEP_FREED_UP_TO = 1 << 30


_collector_paused = [False]  # lean_rank_process paused the cycle collector; resume_collection has not resumed it


def lean_rank_process() -> bool:
    """Where several ranks share this node (as the launcher announces), before NumPy loads: NumPy does not ask the
    kernel for transparent huge pages for its large arrays (NUMPY_MADVISE_HUGEPAGE=0 unless set), glibc keeps freed
    memory for reuse, and Python's cycle collector pauses through the start-up's imports (run/job.py resumes it
    with everything imported frozen: `resume_collection`). A 13-rank CPU job spent ~7 % of its CPU zeroing fresh
    pages (mostly 2 MiB huge pages) and ~5 % in the collector, at exit most of all (measured with perf, 64 MiniLM
    inputs). Returns whether glibc took the malloc settings (False elsewhere, or with a single rank)."""
    if not ranks_sharing_node():
        return False
    os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
    gc.disable()
    _collector_paused[0] = True
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc: its allocator as it is
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_ARRAYS_UP_TO)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREED_UP_TO))


def resume_collection() -> None:
    """Where lean_rank_process paused the collector, after a job's set-up (or as any other command starts): what
    the start-up made (modules, weights, the plan) moves to the collector's permanent generation, which no
    collection walks, not even the one at exit; then the collector runs again, for the job's own objects."""
    if _collector_paused[0]:
        gc.freeze()
        gc.enable()
        _collector_paused[0] = False


def sleep_while_waiting() -> bool:
    """Whether a rank waiting for others sleeps between polls (leaving the cores to the ranks that work) rather
    than spinning in MPI: RSHARD_WAIT=sleep|spin, else sleep when oversubscribed."""
    return _told_or_oversubscribed(WAIT_ENV, "sleep", "spin")


def _told_or_oversubscribed(var: str, on: str, off: str) -> bool:
    """var=on|off (any case) decides; unset: on where ranks outnumber cores; InputError on any other value."""
    mode = os.environ.get(var, "").strip().lower()
    if mode not in ("", on, off):
        raise InputError(f"{var} must be {on} or {off} (got {mode!r})")
    return mode == on or (not mode and oversubscribed())


def batch_policy_wanted() -> bool:
    """Whether this rank runs under the kernel's batch policy: RSHARD_SCHED=batch|normal, else batch where ranks
    outnumber cores (apply_scheduling says why)."""
    return _told_or_oversubscribed(SCHED_ENV, "batch", "normal")


def apply_scheduling() -> bool:
    """Where batch_policy_wanted: this process under Linux's SCHED_BATCH, so that a rank waking up (a sleeping
    wait's poll, an arriving message) does not preempt the rank computing on that core but runs at its next turn:
    the 64-input MiniLM job at 13 ranks on 2 cores took 0.09 s less in the job (12 pairs alternating with
    RSHARD_SCHED=normal, 11 faster; medians 2.255 → 2.205 s, slowest 2.55 → 2.32; docs/bench_suite_cpu.md).
    Returns whether the policy is now batch (False where not wanted, or where the system has no such policy)."""
    if not batch_policy_wanted() or not hasattr(os, "SCHED_BATCH"):
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError:  # a policy the system refuses: the default one stays
        return False
    return True


def tune_mpi_env() -> None:
    """Before MPI starts: when more ranks than cores share this node, let MPICH yield instead of spinning
    (busy-polling ranks otherwise starve each other). Set MPIR_CVAR_ENABLE_HEAVY_YIELD yourself to override."""
    if oversubscribed():
        os.environ.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")


def _slurm_local_tasks() -> str:
    """Tasks of this srun step on this node, from SLURM_STEP_TASKS_PER_NODE ("4(x2),3") and SLURM_NODEID."""
    counts = []
    for part in os.environ.get(SLURM_TASKS_PER_NODE_VAR, "").split(","):
        number, _, times = part.partition("(x")
        if number.isdigit():
            counts += [number] * (int(times.rstrip(")")) if times.rstrip(")").isdigit() else 1)
    node = os.environ.get("SLURM_NODEID", "0")
    return counts[int(node)] if node.isdigit() and int(node) < len(counts) else ""


# Variables in which launchers announce how many processes they started.
LAUNCH_SIZE_VARS = ("SLURM_STEP_NUM_TASKS", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")


def announced_sizes(environ=None) -> dict:
    """{variable: process count} for every launcher variable that announces the job's size."""
    environ = os.environ if environ is None else environ
    return {v: int(environ[v]) for v in LAUNCH_SIZE_VARS if environ.get(v, "").strip().isdigit()}
