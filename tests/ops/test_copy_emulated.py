"""kernels/copy_ranges.cu (the CUDA IPC exchange's copies, dist/device_copy.py) run on the CPU under the emulation
shim: every range lands at its offset, in every word size, nothing else is written. Skipped without a C++20
compiler; tests/engine/test_gpu_engine.py runs the exchange itself on a GPU."""
import ctypes

import numpy as np
import pytest
from cuda_emulation import build

from rshard_hpc.dist import device_copy


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return build(tmp_path_factory.mktemp("copy"), device_copy.SOURCE, device_copy.defines())


def _address(a: np.ndarray, offset: int = 0) -> int:
    return a.ctypes.data + offset


@pytest.mark.parametrize("sizes,step", [([64, 0, 36, 4], 4), ([6, 10, 2], 2), ([3, 7, 1, 5], 1), ([4096 * 8], 4)])
def test_ranges_land_at_their_offsets(lib, sizes, step):
    rng = np.random.default_rng(len(sizes) * step)
    sources = [rng.integers(0, 256, n + 8, dtype=np.uint8) for n in sizes]  # each read from byte `step` on
    ranges, at = [], 0
    for src, n in zip(sources, sizes):
        ranges.append((_address(src, step), at, n))
        at += n + step  # a gap of `step` bytes after each range stays unwritten
    dst = np.full(at, 0xAB, dtype=np.uint8)
    unit = device_copy.word_bytes(ranges)
    assert unit == min(step, 4)
    table = np.asarray(ranges, dtype=np.int64).ravel()
    lib.launch_copy_ranges(ctypes.c_void_p(dst.ctypes.data), ctypes.c_void_p(table.ctypes.data),
                           ctypes.c_int(len(ranges)), ctypes.c_int(unit))
    want = np.full_like(dst, 0xAB)
    for src, (_, offset, n) in zip(sources, ranges):
        want[offset:offset + n] = src[step:step + n]
    np.testing.assert_array_equal(dst, want)


def test_word_bytes():
    assert device_copy.word_bytes([(8, 4, 12), (16, 0, 4)]) == 4
    assert device_copy.word_bytes([(8, 4, 12), (18, 0, 4)]) == 2
    assert device_copy.word_bytes([(8, 4, 12), (16, 0, 3)]) == 1


def test_copy_mode_from_the_environment(monkeypatch):
    monkeypatch.delenv(device_copy.COPY_ENV, raising=False)
    assert not device_copy.kernel_copies()  # the default: a memcpy per range
    monkeypatch.setenv(device_copy.COPY_ENV, "kernel")
    assert device_copy.kernel_copies()
    monkeypatch.setenv(device_copy.COPY_ENV, "dma")
    with pytest.raises(ValueError, match="kernel or memcpy"):
        device_copy.kernel_copies()
