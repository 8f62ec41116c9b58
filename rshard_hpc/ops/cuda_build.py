"""Building and launching the CUDA sources in kernels/ (architecture.md §7), for every ops/*_cuda.py module: where
the sources are, the program text NVRTC compiles (a #define preamble + kernels/common.cuh + the source), one
compiled module per (source, defines, device), and the small launch helpers they share.
"""
from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path

import rshard_hpc

COMMON_HEADER = "common.cuh"  # prepended to every source (NVRTC compiles each program alone)
NVRTC_OPTIONS = ("--std=c++17",)


def _cupy():
    import cupy

    return cupy


def preamble(defines: dict) -> str:
    return "".join(f"#define {name} {value}\n" for name, value in defines.items())


def kernel_dir():
    """Where the CUDA sources are: kernels/ beside the imported package in a source checkout (on PYTHONPATH: a
    worktree's sources go with its Python code, even when an editable install of another checkout maps
    rshard_hpc.kernels there), else the installed package data rshard_hpc.kernels (a wheel). kernels/ has no
    __init__.py: as a package at the top of a checkout it would hide the `kernels` that transformers imports
    whenever the checkout is on sys.path (`python -m pytest`), so rshard_hpc.kernels is a namespace package, and
    its folder inside the installed rshard_hpc comes first (another install on the path may add a portion)."""
    package = Path(rshard_hpc.__file__).resolve().parent
    for folder in (package.parent / "kernels", package / "kernels"):
        if (folder / COMMON_HEADER).is_file():
            return folder
    return importlib.resources.files("rshard_hpc.kernels")


def kernel_source(source: str, defines: dict | None = None) -> str:
    """The program text compiled for kernels/<source>: the #define preamble, kernels/common.cuh, the source."""
    parts = []
    folder = kernel_dir()
    for name in (COMMON_HEADER, source):
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"CUDA source {name} is missing from {folder} (rshard_hpc.kernels: reinstall "
                                    f"the package)")
        parts.append(f"// ---- kernels/{name}\n" + path.read_text())
    return preamble(defines or {}) + "\n".join(parts)


@functools.lru_cache(maxsize=None)
def _module(source: str, defines: tuple, device_id: int):
    """The compiled RawModule of kernel_source(source, dict(defines)) for one device (memoized)."""
    cupy = _cupy()
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=kernel_source(source, dict(defines)), options=NVRTC_OPTIONS)
        module.compile()
    return module


def _kernel(source: str, name: str, defines: dict | None = None):
    key = tuple((defines or {}).items())
    return _module(source, key, _cupy().cuda.Device().id).get_function(name)


def _blocks(n: int, threads: int, most: int = 65535) -> tuple:
    """Grid of a grid-stride kernel over n elements, `threads` a block, at most `most` blocks."""
    return (max(1, min(-(-n // threads), most)),)


@functools.lru_cache(maxsize=None)
def _sm_count_of(device_id: int) -> int:
    return int(_cupy().cuda.Device(device_id).attributes["MultiProcessorCount"])


def _sm_count() -> int:
    return _sm_count_of(_cupy().cuda.Device().id)
