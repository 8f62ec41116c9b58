from setuptools import find_packages, setup

# rshard_hpc.kernels is the top-level kernels/ folder (setup.cfg's package_dir): the CUDA sources ship in the wheel.
setup(packages=find_packages(include=["rshard_hpc", "rshard_hpc.*"]) + ["rshard_hpc.kernels"])
