"""dist/device_copy.RangeCopier on a GPU: one launch copies every range to its offset (word sizes 4, 2, 1), and
its page-locked table is reused call after call. The CUDA IPC exchange built on it runs in
tests/engine/test_gpu_engine.py (tests/mpi/gpu_transport.py); skipped without a GPU."""
import numpy as np
import pytest
from conftest import require_gpu

from rshard_hpc.dist.device_copy import RangeCopier


@pytest.mark.parametrize("step", [4, 2, 1])
def test_ranges_copied_on_the_device(step):
    cupy = require_gpu()
    rng = np.random.default_rng(step)
    copier = RangeCopier()
    for call in range(3):  # the same copier: its table rewritten after each synchronized call
        sizes = [int(n) * step for n in rng.integers(0, 5000, 4 + call)] + [40 * step]
        sources = [cupy.asarray(rng.integers(0, 256, n + 8, dtype=np.uint8)) for n in sizes]
        ranges, at = [], 0
        for src, n in zip(sources, sizes):
            ranges.append((src.data.ptr + step, at, n))
            at += n + step
        dst = cupy.full(at, 0xAB, dtype=cupy.uint8)
        copier.copy(dst.data.ptr, ranges)
        cupy.cuda.get_current_stream().synchronize()
        want = np.full(at, 0xAB, dtype=np.uint8)
        for src, (_, offset, n) in zip(sources, ranges):
            want[offset:offset + n] = src.get()[step:step + n]
        np.testing.assert_array_equal(dst.get(), want)
