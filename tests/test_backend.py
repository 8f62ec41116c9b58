"""The GPU choice reads the MPI launcher's local rank before Slurm's (CPU-only: no GPU needed)."""
from rshard_hpc.backend import local_rank_from_env


def test_launcher_local_rank_wins_over_slurm():
    # mpiexec inside a Slurm allocation: every rank inherits SLURM_LOCALID=0, hydra sets MPI_LOCALRANKID
    assert local_rank_from_env({"SLURM_LOCALID": "0", "MPI_LOCALRANKID": "3"}) == (3, "MPI_LOCALRANKID")
    assert local_rank_from_env({"SLURM_LOCALID": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}) == (1, "OMPI_COMM_WORLD_LOCAL_RANK")
    # srun alone: Slurm's variable
    assert local_rank_from_env({"SLURM_LOCALID": "2"}) == (2, "SLURM_LOCALID")
    assert local_rank_from_env({}) == (None, None)
