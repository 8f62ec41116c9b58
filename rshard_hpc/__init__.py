"""rshard_hpc: token-sharded private LLM inference for HPC clusters (see README.md)."""

__version__ = "0.1.0"

from rshard_hpc.dist.launcher import lean_rank_process as _lean_rank_process  # noqa: E402
from rshard_hpc.dist.launcher import share_cores_among_ranks as _share_cores_among_ranks  # noqa: E402

_share_cores_among_ranks()  # under a launcher: BLAS threads a rank = cores // ranks on the node, before NumPy loads
_lean_rank_process()  # and no huge pages for NumPy, freed memory kept, no cycle collection until set-up is done
