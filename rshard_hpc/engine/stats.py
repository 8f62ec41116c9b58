"""Time per phase and bytes moved, per rank (for /stats and the benchmarks)."""
from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np


class PhaseTimer:
    """Wall seconds per phase. On a GPU (xp = cupy) each phase ends by waiting for the current stream, so a
    phase is charged for its kernels rather than the next blocking call (the transport syncs there anyway)."""

    def __init__(self, xp=np):
        self.seconds = {}
        self._sync = xp.cuda.get_current_stream().synchronize if xp is not np else None

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._sync is not None:
                self._sync()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


def rank_stats(topo, seconds: dict, transport) -> dict:
    """One rank's time per phase and its transport (which, and why) with its MPI/staging time and bytes (for
    /stats and benchmarks)."""
    out = {"rank": topo.rank, "role": topo.describe(), "transport": transport.mode, "transport_why": transport.reason}
    for phase in ("prepass", "attention", "postpass"):
        out[f"{phase}_s"] = seconds.get(phase, 0.0)
    out.update(transport.stats())
    return out
