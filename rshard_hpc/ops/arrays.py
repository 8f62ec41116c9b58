"""The array-module switch: NumPy on CPUs, CuPy on GPUs. Model math asks `xp_of(array)`."""
from __future__ import annotations

import numpy as np

from rshard_hpc.errors import RshardError

DEVICES = ("cpu", "gpu")


def xp_of(array):
    """The array module (numpy or cupy) that owns `array`."""
    module = type(array).__module__
    if module.startswith("cupy"):
        import cupy

        return cupy
    return np


def to_host(array) -> np.ndarray:
    """A NumPy copy (or view) of a NumPy or CuPy array."""
    if isinstance(array, np.ndarray):
        return array
    return array.get()


def array_module(device: str):
    """numpy for "cpu", cupy for "gpu" (a clear RshardError when CuPy or a GPU is missing)."""
    if device == "cpu":
        return np
    if device != "gpu":
        raise RshardError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    try:
        import cupy
    except ImportError as exc:
        raise RshardError(f"--device gpu needs CuPy (pip install cupy-cuda12x or cupy-cuda13x): {exc}") from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise RshardError(f"--device gpu: CUDA finds no usable GPU ({exc})") from exc
    if count < 1:
        raise RshardError("--device gpu: CUDA finds no GPU on this node")
    return cupy
