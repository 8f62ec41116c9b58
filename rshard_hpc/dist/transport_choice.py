"""Which transport the GPU workers use (`--transport auto|staged|mpi|ipc|nccl`, architecture.md §7), decided
together over the workers' communicator from evidence, never from a guess.

auto, in order: `nccl` where NCCL loads on every worker and each has a GPU of its own; else `ipc` where all
workers share one node and a CUDA IPC probe is exact on every rank; else `mpi` (device buffers to MPI) where
every rank's MPI library says it is CUDA-aware; else `staged` (pinned host buffers). A small job (under
SMALL_JOB_TOKENS tokens of work) skips NCCL and CUDA IPC: their set-up (a communicator, or the IPC probe: about
0.5 s at the start on one H200) costs more than they save on so few bytes. An explicit `nccl` or `ipc`
that cannot work is an RshardError naming why; an explicit `mpi` is refused where the library says it is not
CUDA-aware and trusted where there is no evidence either way (the evidence is reported).
"""
from __future__ import annotations

from rshard_hpc.dist import cuda_aware
from rshard_hpc.dist import nccl as nccl_transport
from rshard_hpc.dist import ipc_signal
from rshard_hpc.dist.cuda_ipc import _try_device_ipc
from rshard_hpc.dist.transport import TRANSPORTS
from rshard_hpc.errors import RshardError

# Below this many tokens of work (prompt tokens, plus tokens to generate) `auto` skips NCCL and CUDA IPC. At this
# size host staging moves a layer's q/k/v and partials (all-MiniLM-L6-v2: ~8 KB a token) in ~10 ms on one node,
# far below the IPC probe's ~0.5 s (issue 13, a 12-prompt job's start-up timeline).
SMALL_JOB_TOKENS = 16_384
# what doctor adds to an IPC prediction: the second probe, at start too (dist/ipc_signal.py)
SIGNAL_NOTE = (", signalled on the GPU within a decoder's step where a second probe finds that fast (with CUDA MPS;"
               " an encoder's steps stay host-signalled)")


def choose_transport(comm, transport, mode: str, *, load_nccl=nccl_transport.load_nccl,
                     identity=nccl_transport.gpu_identity, xp=None, job_tokens: int | None = None) -> str:
    """Collective over comm (the GPU workers): set up `transport` (a dist.transport.Transport) for `mode` and
    return why it moves buffers the way it does. Every rank takes the same decision (job_tokens, the job's tokens
    of work where known, is the same on every rank: the client broadcast it)."""
    if mode not in TRANSPORTS:
        raise RshardError(f"unknown --transport {mode!r}; choose one of {', '.join(TRANSPORTS)}")
    if mode == "staged":
        return "--transport staged"
    passed = []  # auto: why each faster transport was not taken
    small = mode == "auto" and job_tokens is not None and job_tokens < SMALL_JOB_TOKENS
    if small:
        passed.append(f"not NCCL or CUDA IPC: a small job ({job_tokens:,} tokens < {SMALL_JOB_TOKENS:,}; their "
                      f"set-up costs more than they save)")
    if mode == "nccl" or (mode == "auto" and not small):
        refusal = nccl_refusal(comm, load_nccl, identity)
        if not refusal:
            nccl = load_nccl()[0]
            communicator, refusal = _join_nccl(comm, nccl)
            if communicator is not None:
                transport.nccl = nccl_transport.NcclExchange(comm, communicator, nccl, xp if xp is not None else _cupy())
                return f"NCCL {nccl_transport.nccl_version(nccl)} among {comm.Get_size()} ranks, one GPU each"
        if mode == "nccl":
            raise RshardError(f"--transport nccl cannot be used: {refusal}")
        passed.append(f"not NCCL: {refusal}")
    if mode == "ipc" or (mode == "auto" and not small):
        used, why = _try_device_ipc(comm)
        if used:
            transport.ipc = used
            transport.signals, how = ipc_signal.probe(used)
            return "; ".join(passed + [why, how])  # auto: why NCCL was passed by, then IPC's own evidence
        if mode == "ipc":
            raise RshardError(f"--transport ipc: CUDA IPC cannot be used here ({why})")
        passed.append(f"not CUDA IPC: {why}")
    aware, evidence = _agreed_cuda_aware(comm)
    refusal = mpi_refusal(mode, aware, evidence)
    if refusal:
        raise RshardError(f"{refusal}; handing it device buffers would crash. Use --transport staged (or auto), "
                          f"or a CUDA-aware MPI (README: GPU transports)")
    if mode == "mpi" or aware:
        transport.gpu_aware = True
        said = "CUDA-aware" if aware else "CUDA-awareness not confirmed"
        if mode == "mpi":
            return f"--transport mpi ({said}: {evidence})"
        return "; ".join(passed + [f"CUDA-aware MPI ({said}: {evidence})"])
    passed.append(f"MPI not CUDA-aware: {evidence}")
    return "staged through pinned host buffers (" + "; ".join(passed) + ")"


def mpi_refusal(mode: str, aware: bool, evidence: str) -> str:
    """Why an explicit --transport mpi cannot be taken ("" where it can): the library itself says it is not
    CUDA-aware. With no evidence either way the request is trusted."""
    if mode == "mpi" and not aware and cuda_aware.said_not_cuda_aware(evidence):
        return f"--transport mpi: this MPI library is not CUDA-aware ({evidence})"
    return ""


def predict(mode: str, *, nccl: str, shared: str, hosts: int, aware: bool, evidence: str) -> tuple[str, str]:
    """What choose_transport will take for `mode`, from the evidence `rshard doctor` gathers without
    communicating as the job does (the IPC probe runs at the job's start): (transport, why), transport "refused"
    where an explicit request cannot work. nccl: "" where NCCL loads on every worker, else why not; shared:
    "" where each worker has its own GPU, else which share; hosts: the workers' node count."""
    if mode == "staged":
        return "staged", "--transport staged"
    not_nccl = nccl or (f"workers share a GPU ({shared}); NCCL needs one rank per GPU" if shared else "")
    if mode == "nccl":
        return ("refused", f"--transport nccl cannot be used: {not_nccl}") if not_nccl else ("nccl", "one GPU a worker")
    if mode == "auto" and not not_nccl:
        return "nccl", (f"NCCL on every worker, one GPU each ({'mpi' if aware else 'staged'} for a job under "
                        f"{SMALL_JOB_TOKENS:,} tokens)")
    mpi = ("mpi", f"CUDA-aware MPI ({evidence})") if aware else ("staged", f"MPI not CUDA-aware: {evidence}")
    refusal = mpi_refusal(mode, aware, evidence)
    if refusal:
        return "refused", refusal
    if mode == "mpi":
        return "mpi", f"--transport mpi ({'CUDA-aware' if aware else 'CUDA-awareness not confirmed'}: {evidence})"
    if hosts > 1:
        if mode == "ipc":
            return "refused", "--transport ipc: the workers span several nodes"
        return mpi[0], f"not NCCL: {not_nccl}; not CUDA IPC: several nodes; {mpi[1]}"
    if mode == "ipc":
        return "ipc", f"one node: if the CUDA IPC probe passes at start (else the job stops){SIGNAL_NOTE}"
    return "ipc", (f"not NCCL: {not_nccl}; one node: CUDA IPC if its probe passes at start{SIGNAL_NOTE}, else "
                   f"{mpi[0]} ({mpi[1]}); "
                   f"{mpi[0]} for a job under {SMALL_JOB_TOKENS:,} tokens")


def nccl_refusal(comm, load_nccl=nccl_transport.load_nccl, identity=nccl_transport.gpu_identity) -> str:
    """Collective over comm: "" when NCCL can join every rank of comm, else why not (the same on every rank):
    two ranks on one GPU (NCCL refuses a communicator with both), or NCCL missing on some rank. The GPUs are
    compared first, so that ranks sharing one never load libnccl (a tenth of a second each)."""
    ident, why = None, ""
    try:
        ident = tuple(identity())
    except Exception as exc:  # noqa: BLE001 - a rank without a usable device says so
        why = f"no GPU identity ({type(exc).__name__}: {exc})"
    gathered = comm.allgather((why, ident))
    if not any(w for w, _ in gathered):  # every rank named its GPU: compare them, then load libnccl
        shared = nccl_transport.gpu_sharing([i for _, i in gathered])
        if shared:
            return f"workers share a GPU ({shared}); NCCL needs one rank per GPU (use more GPUs or fewer ranks)"
        why = load_nccl()[1]
    for rank, rank_why in enumerate(comm.allgather(why)):
        if rank_why:
            return f"rank {rank} of the workers: {rank_why}"
    return ""


def _join_nccl(comm, nccl):
    """Collective: (the NCCL communicator, "") when every rank made it, else (None, the first failure): the
    ranks that made one abort it, so that all take the same next step."""
    communicator, error = None, ""
    try:
        communicator = nccl_transport.bootstrap(comm, nccl)
    except Exception as exc:  # noqa: BLE001 - NCCL's own errors (no shared memory, no network, ...) are reported
        error = f"{type(exc).__name__}: {exc}"
    failed = [(rank, e) for rank, e in enumerate(comm.allgather(error)) if e]
    if not failed:
        return communicator, ""
    if communicator is not None:
        communicator.abort()
    return None, f"NCCL could not make its communicator (rank {failed[0][0]} of the workers: {failed[0][1]})"


def _agreed_cuda_aware(comm) -> tuple[bool, str]:
    """(every rank's MPI library is CUDA-aware by evidence, the evidence): one verdict for all ranks."""
    verdicts = comm.allgather(cuda_aware.detect_cuda_aware())
    for aware, evidence in verdicts:
        if not aware:
            return False, evidence
    return True, verdicts[0][1]


def _cupy():
    import cupy

    return cupy
