"""Time per phase and bytes moved, per rank (for /stats and the benchmarks)."""
from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np


HOST = "_host"  # suffix of a GPU phase's host seconds (PhaseTimer.seconds["prepass_host"])
MAX_PENDING = 4096  # GPU phases whose events are held before they are read


class PhaseTimer:
    """Seconds per phase. On the CPU, wall seconds. On a GPU (xp = cupy) a phase is timed by CUDA events recorded
    on the current stream at its start and end, read only when `seconds` is asked for: timing a phase never
    waits for the device (a wait at every phase end cost a synchronization per phase, three a layer)."""

    def __init__(self, xp=np):
        self._seconds = {}
        self._pending = []  # (phase, start event, end event) not yet read
        self._clock = event_clock(xp) if xp is not np else None  # (record, elapsed_ms) on the GPU

    @contextmanager
    def __call__(self, phase: str):
        if self._clock is None:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._seconds[phase] = self._seconds.get(phase, 0.0) + time.perf_counter() - t0
            return
        record = self._clock[0]
        start = record()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            end = record()
            self._pending.append((phase, start, end))
            host = phase + HOST  # the host's own time in the phase (launches, Python): what the GPU waits on
            self._seconds[host] = self._seconds.get(host, 0.0) + time.perf_counter() - t0
            if len(self._pending) >= MAX_PENDING:
                self.seconds  # noqa: B018 (read them: one wait per MAX_PENDING phases bounds the events held)

    @property
    def seconds(self) -> dict:
        """Phase -> seconds so far (waits for the recorded events; the dict may be cleared to start over)."""
        if self._pending:
            self._pending[-1][2].synchronize()  # one wait: every earlier event is complete then
            elapsed_ms = self._clock[1]
            for phase, start, end in self._pending:  # complete: read without a wait each
                self._seconds[phase] = self._seconds.get(phase, 0.0) + elapsed_ms(start, end, wait=False) / 1e3
            self._pending = []
        return self._seconds


def event_clock(cupy) -> tuple:
    """(record, elapsed_ms) on CUDA events, for PhaseTimer and engine/trace.py's device marks: record() an event on the
    current stream now; elapsed_ms(a, b) the ms from a to b once b is complete (it waits for b; wait=False where the
    caller knows both are: PhaseTimer reads many after one wait on the last)."""
    def record():
        event = cupy.cuda.Event()
        event.record()
        return event

    def elapsed_ms(start, end, wait: bool = True) -> float:
        if wait:
            end.synchronize()
        return cupy.cuda.get_elapsed_time(start, end)

    return record, elapsed_ms


PHASES = ("prepass", "attention", "postpass", "client_layers")  # client_layers: --client-layers K > 0


def rank_stats(topo, seconds: dict, transport) -> dict:
    """One rank's time per phase and its transport (which, and why) with its MPI/staging time and bytes (for
    /stats and benchmarks)."""
    out = {"rank": topo.rank, "role": topo.describe(), "transport": transport.mode, "transport_why": transport.reason}
    for phase in PHASES:
        out[f"{phase}_s"] = seconds.get(phase, 0.0)
    for phase in PHASES[:3]:  # GPU ranks: the host's part of each worker phase (benchmarks; not written to /stats)
        if phase + HOST in seconds:
            out[f"{phase}{HOST}_s"] = seconds[phase + HOST]
    out.update(transport.stats())
    return out
