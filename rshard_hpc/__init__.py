"""rshard_hpc: token-sharded private LLM inference for HPC clusters (see README.md)."""

__version__ = "0.1.0"

from rshard_hpc.dist.launcher import share_cores_among_ranks as _share_cores_among_ranks  # noqa: E402

_share_cores_among_ranks()  # under a launcher: BLAS threads a rank = cores // ranks on the node, before NumPy loads

import sys as _sys  # noqa: E402

from rshard_hpc.dist import early_gpu as _early_gpu  # noqa: E402

_early_gpu.start_from_argv(_sys.argv)  # `rshard run --device gpu` under a launcher: CUDA starts now, in a thread
