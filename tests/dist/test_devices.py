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

    class OneRank:
        def allgather(self, x):
            return [x]

    monkeypatch.setattr(transport_choice, "_try_device_ipc", lambda comm: (None, "not tried"))
    monkeypatch.setattr(cuda_aware, "detect_cuda_aware", lambda: (False, "MPIX_Query_cuda_support() = 0 in libmpi"))
    with pytest.raises(RshardError, match="not CUDA-aware.*--transport staged"):
        transport_choice.choose_transport(OneRank(), Transport(device=True), "mpi")
    monkeypatch.setattr(cuda_aware, "detect_cuda_aware", lambda: (False, cuda_aware.NO_EVIDENCE + " in MPICH"))
    t = Transport(device=True)
    assert "not confirmed" in transport_choice.choose_transport(OneRank(), t, "mpi") and t.gpu_aware
