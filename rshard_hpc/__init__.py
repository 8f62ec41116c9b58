"""rshard_hpc: token-sharded private LLM inference for HPC clusters (see README.md)."""

__version__ = "0.1.0"
