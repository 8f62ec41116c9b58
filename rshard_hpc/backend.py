"""The array-module switch: NumPy on CPUs, CuPy on GPUs. Model math asks `xp_of(array)`."""
from __future__ import annotations

import numpy as np


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
