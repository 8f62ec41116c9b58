"""The CUDA sources of the attention kernels, shipped as package data (rshard_hpc.kernels) and read as text."""
