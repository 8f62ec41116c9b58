"""The GPU choice reads the MPI launcher's local rank before Slurm's (CPU-only: no GPU needed)."""
import pytest

from rshard_hpc.dist.launcher import local_rank_from_env


def test_launcher_local_rank_wins_over_slurm():
    # mpiexec inside a Slurm allocation: every rank inherits SLURM_LOCALID=0, hydra sets MPI_LOCALRANKID
    assert local_rank_from_env({"SLURM_LOCALID": "0", "MPI_LOCALRANKID": "3"}) == (3, "MPI_LOCALRANKID")
    assert local_rank_from_env({"SLURM_LOCALID": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}) == (1, "OMPI_COMM_WORLD_LOCAL_RANK")
    # srun alone: Slurm's variable
    assert local_rank_from_env({"SLURM_LOCALID": "2"}) == (2, "SLURM_LOCALID")
    assert local_rank_from_env({}) == (None, None)


class _Ranks:
    """A communicator stand-in whose allgather returns what `n` ranks alike would give."""

    def __init__(self, n: int):
        self.n = n

    def allgather(self, x):
        return [x] * self.n

    def Get_size(self):
        return self.n


def test_transport_modes_without_gpu():
    """Without a GPU: host transports say so; a device transport is staged until chosen otherwise; an unknown
    --transport is an error before any communication."""
    from rshard_hpc.dist.transport import Transport
    from rshard_hpc.dist.transport_choice import choose_transport
    from rshard_hpc.errors import RshardError

    assert Transport().mode == "host"
    t = Transport(device=True)
    assert t.mode == "staged" and Transport(gpu_aware=True, device=True).mode == "cuda-aware MPI"
    assert choose_transport(None, t, "staged") == "--transport staged" and t.mode == "staged"
    with pytest.raises(RshardError, match="--transport"):
        choose_transport(None, t, "sometimes")


def test_explicit_mpi_transport_is_refused_where_the_library_says_no(monkeypatch):
    """A library's own "not CUDA-aware" refuses --transport mpi (a device buffer would crash it); with no
    evidence either way the request is trusted."""
    from rshard_hpc.dist import cuda_aware, transport_choice
    from rshard_hpc.dist.transport import Transport
    from rshard_hpc.errors import RshardError

    monkeypatch.setattr(transport_choice, "_try_device_ipc", lambda comm: (None, "not tried"))
    monkeypatch.setattr(cuda_aware, "detect_cuda_aware", lambda: (False, "MPIX_Query_cuda_support() = 0 in libmpi"))
    with pytest.raises(RshardError, match="not CUDA-aware.*--transport staged"):
        transport_choice.choose_transport(_Ranks(1), Transport(device=True), "mpi")
    monkeypatch.setattr(cuda_aware, "detect_cuda_aware", lambda: (False, cuda_aware.NO_EVIDENCE + " in MPICH"))
    t = Transport(device=True)
    assert "not confirmed" in transport_choice.choose_transport(_Ranks(1), t, "mpi") and t.gpu_aware


def test_auto_skips_nccl_and_ipc_for_a_small_job(monkeypatch):
    """A job under SMALL_JOB_TOKENS tokens takes the MPI/staged path at once (no libnccl, no IPC probe) and says
    why; at the threshold, and for an explicit --transport ipc, both are tried as before."""
    from rshard_hpc.dist import cuda_aware, transport_choice
    from rshard_hpc.dist.transport import Transport

    tried = []
    monkeypatch.setattr(transport_choice, "_try_device_ipc", lambda comm: tried.append("ipc") or (None, "no IPC"))
    monkeypatch.setattr(cuda_aware, "detect_cuda_aware", lambda: (False, "MPIX_Query_cuda_support() = 0 in libmpi"))
    load = lambda: tried.append("nccl") or (None, "no libnccl")  # noqa: E731
    own_gpu = lambda: ("h", "0")  # noqa: E731
    small = transport_choice.SMALL_JOB_TOKENS - 1
    t = Transport(device=True)
    why = transport_choice.choose_transport(_Ranks(1), t, "auto", load_nccl=load, identity=own_gpu, job_tokens=small)
    assert t.mode == "staged" and not tried, (why, tried)
    assert why.startswith(f"staged through pinned host buffers (not NCCL or CUDA IPC: a small job ({small:,} tokens")
    t = Transport(device=True)
    why = transport_choice.choose_transport(_Ranks(1), t, "auto", load_nccl=load, identity=own_gpu,
                                            job_tokens=small + 1)
    assert tried == ["nccl", "ipc"] and "not NCCL: rank 0 of the workers: no libnccl" in why and t.mode == "staged"
    tried.clear()
    with pytest.raises(Exception, match="--transport ipc"):
        transport_choice.choose_transport(_Ranks(1), Transport(device=True), "ipc", job_tokens=small)
    assert tried == ["ipc"]


def test_workers_sharing_a_gpu_never_load_nccl():
    """NCCL is refused for workers on one GPU, or with a rank that has no GPU identity, before libnccl is loaded
    (a tenth of a second a rank); with a GPU each, a rank that cannot load it is named."""
    from rshard_hpc.dist.transport_choice import nccl_refusal

    loads = []
    load = lambda: loads.append(1) or (None, "no libnccl")  # noqa: E731
    why = nccl_refusal(_Ranks(3), load, identity=lambda: ("h", "0000:01:00.0"))
    assert why.startswith("workers share a GPU") and not loads, why
    assert nccl_refusal(_Ranks(1), load, identity=lambda: ("h", "0")) == "rank 0 of the workers: no libnccl"
    assert loads == [1]

    def no_device():
        raise RuntimeError("no CUDA device")

    why = nccl_refusal(_Ranks(2), load, identity=no_device)  # refused by the identity alone: libnccl not loaded
    assert why == "rank 0 of the workers: no GPU identity (RuntimeError: no CUDA device)" and loads == [1], why


def test_alltoallv_receives_into_a_given_buffer():
    """`out=`: what arrives lands in the caller's buffer (a captured CUDA graph reads it), which must fit exactly."""
    mpi = pytest.importorskip("mpi4py.MPI")
    import numpy as np

    from rshard_hpc.dist.transport import Transport

    t, send = Transport(), np.arange(5, dtype=np.float32)
    out = np.full(5, np.nan, dtype=np.float32)
    got = t.alltoallv(mpi.COMM_SELF, send, [5], [5], out=out)
    assert got is out and np.array_equal(out, send)
    for wrong in (np.empty(4, np.float32), np.empty(5, np.uint16)):
        with pytest.raises(ValueError, match="out holds"):
            t.alltoallv(mpi.COMM_SELF, send, [5], [5], out=wrong)


def test_mps_is_seen_where_cuda_looks_for_its_pipe(tmp_path):
    from rshard_hpc.dist.devices import MPS_DEFAULT_PIPE, mps_visible

    assert not mps_visible({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)})
    (tmp_path / "control").touch()  # the control daemon's pipe
    assert mps_visible({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)})
    looked = []
    assert not mps_visible({}, exists=lambda p: looked.append(p) or False)
    assert looked == [f"{MPS_DEFAULT_PIPE}/control"]


def test_ranks_sharing_a_gpu_without_mps_are_named():
    from rshard_hpc.dist.devices import shared_without_mps

    a, b = ("n1", "0000:19:00.0"), ("n1", "0000:3b:00.0")
    assert shared_without_mps([None, (*a, False), (*b, False)]) == ""  # a GPU each
    assert shared_without_mps([None, (*a, True), (*a, True), (*b, False)]) == ""  # shared under MPS
    assert shared_without_mps([None, (*a, True), (*a, False), (*b, False)]) == "n1 GPU 0000:19:00.0 (2 ranks)"
    assert shared_without_mps([(*b, False)] * 3 + [(*a, False)] * 2) == ("n1 GPU 0000:19:00.0 (2 ranks), "
                                                                         "n1 GPU 0000:3b:00.0 (3 ranks)")


class _Gather:
    """A communicator stand-in whose gather gives the root every rank's object (these ranks' objects)."""

    def __init__(self, objects: list, rank: int = 0):
        self.objects, self.rank = objects, rank

    def gather(self, obj, root=0):
        return [obj] + self.objects[1:] if self.rank == root else None


def test_the_client_notes_a_shared_gpu_without_mps(monkeypatch):
    from rshard_hpc.dist import devices, nccl

    monkeypatch.setattr(nccl, "gpu_identity", lambda: ("n1", "0000:19:00.0"))
    monkeypatch.setattr(devices, "mps_visible", lambda: False)
    workers = [None] + [("n1", "0000:19:00.0", False)] * 2
    note = devices.gpu_sharing_note(_Gather(workers), on_gpu=False)
    assert "without CUDA MPS (n1 GPU 0000:19:00.0 (2 ranks))" in note and "RSHARD_MPS=1" in note
    assert devices.gpu_sharing_note(_Gather(workers, rank=1), on_gpu=True) == ""  # said by the client alone
    assert devices.gpu_sharing_note(_Gather([None] + [("n1", "0000:19:00.0", True)] * 2), on_gpu=False) == ""


def test_a_rank_that_cannot_name_its_gpu_still_joins_the_gather(monkeypatch):
    from rshard_hpc.dist import devices, nccl

    def broken():
        raise RuntimeError("no bus id")

    monkeypatch.setattr(nccl, "gpu_identity", broken)
    calls = []

    class _Worker(_Gather):
        def gather(self, obj, root=0):
            calls.append(obj)
            return None

    assert devices.gpu_sharing_note(_Worker([]), on_gpu=True) == "" and calls == [None]
