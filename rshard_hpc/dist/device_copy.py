"""Device-to-device byte ranges copied by a kernel (kernels/copy_ranges.cu), for the CUDA IPC exchange: one launch
for all of a call's peers, run on the SMs, instead of a copy-engine memcpy per peer, which may wait behind the
other processes' copies on a GPU that many ranks share. Opt-in (RSHARD_IPC_COPY=kernel): on one H200 (512-token
bf16 prefill, MPS on) it measured within the run-to-run spread at 13 ranks and not better at 7, where a launch
costs more host time than the one or two memcpys it replaces (architecture.md §7, docs/bench_suite_h200.md).
"""
from __future__ import annotations

import os

import numpy as np

from rshard_hpc.ops.cuda_build import _blocks, _cupy, _kernel

SOURCE = "copy_ranges.cu"
THREADS = 256
MAX_BLOCKS = 1024  # blocks a range at most (grid-stride beyond)
COPY_ENV = "RSHARD_IPC_COPY"  # "memcpy" (default) or "kernel"


def defines() -> dict:
    return {"PASS_THREADS": THREADS}


def kernel_copies() -> bool:
    """Whether the IPC exchange copies with the kernel (RSHARD_IPC_COPY, read at each exchange's creation)."""
    mode = os.environ.get(COPY_ENV, "memcpy")
    if mode not in ("kernel", "memcpy"):
        raise ValueError(f"{COPY_ENV} must be kernel or memcpy (got {mode!r})")
    return mode == "kernel"


def word_bytes(ranges) -> int:
    """The widest word (4, 2 or 1 bytes) dividing every source address, destination offset and size."""
    for unit in (4, 2):
        if all(src % unit == 0 and off % unit == 0 and n % unit == 0 for src, off, n in ranges):
            return unit
    return 1


class RangeCopier:
    """Copies a call's ranges [(source address, destination offset, bytes), …] into one destination in one launch
    on the current stream. The table lives in page-locked host memory the kernel reads: the caller synchronizes
    the stream before the next copy (the IPC exchange does, before anyone reads what it copied), so a table is
    never rewritten while a kernel reads it."""

    def __init__(self):
        self._memory, self._table = None, np.zeros(0, dtype=np.int64)

    def _table_for(self, n: int) -> np.ndarray:
        if self._table.size < 3 * n:
            cupy = _cupy()
            size = 3 * max(n, 16)
            self._memory = cupy.cuda.alloc_pinned_memory(size * 8)
            self._table = np.frombuffer(self._memory, dtype=np.int64, count=size)
        return self._table[:3 * n]

    def copy(self, dst_ptr: int, ranges: list) -> None:
        ranges = [r for r in ranges if r[2]]
        if not ranges:
            return
        table = self._table_for(len(ranges))
        table[:] = np.asarray(ranges, dtype=np.int64).ravel()
        unit = word_bytes(ranges)
        words = max(n for _, _, n in ranges) // unit
        grid = (_blocks(words, THREADS, MAX_BLOCKS)[0], min(len(ranges), 65535))
        _kernel(SOURCE, "copy_ranges", defines())(
            grid, (THREADS,), (np.uint64(dst_ptr), np.uint64(self._memory.ptr), np.int32(len(ranges)), np.int32(unit)))
