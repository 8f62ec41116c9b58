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
