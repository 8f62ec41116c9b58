"""A host timeline of every rank, when asked (issue 13: where a decode step's time goes between ranks).

With RSHARD_TRACE=DIR set, `mark(label)` appends (monotonic ns, label) to this rank's list and the list is
written to DIR/rank<N>.json at exit. All ranks of one node read the same monotonic clock, so their marks can be
laid side by side: `rshard bench trace DIR` does that (bench/trace_report.py). Off (a bool test) otherwise.

With RSHARD_TRACE_DEVICE=1 as well, a GPU worker's marks also record a CUDA event on its stream
(`use_device_clock`), timed once the stream has drained (`settle`, at each step's end): a mark then holds the
time at which the GPU reached that point of the stream too (ns after the rank's first device mark), so the
report can say where a step's device time went (a wait for peers, a kernel) where the host only queues it.
"""
from __future__ import annotations

import atexit
import json
import os
import time

ENV_VAR = "RSHARD_TRACE"
DEVICE_ENV = "RSHARD_TRACE_DEVICE"  # "1": GPU ranks' marks record a CUDA event too
MAX_EVENTS = 2_000_000  # a bound on the memory a long job's trace takes; later marks are dropped

_events: list = []  # (host ns, label) or, timed on the device too, (host ns, label, device ns)
_on = False
_clock = None  # (record, elapsed_ms) when GPU marks are asked for (use_device_clock)
_pending: list = []  # (index into _events, event) recorded and not yet timed
_first_event = None  # the rank's first device mark: device times count from it


def start_if_asked(rank: int) -> None:
    """Turn tracing on where RSHARD_TRACE names a folder; the marks go to <folder>/rank<rank>.json at exit."""
    global _on
    folder = os.environ.get(ENV_VAR)
    if not folder or _on:
        return
    _on = True
    started = _process_start_ns()
    if started is not None:
        _events.append((started, "exec"))  # the process began (imports lie between it and "process")
    mark("process")
    atexit.register(_write, folder, rank)


def enabled() -> bool:
    return _on


def mark(label: str) -> None:
    """Record that this rank reached `label` now (host time; GPU work shows where the host waits for it), and
    with a device clock, an event where its stream reaches this point."""
    if _on and len(_events) < MAX_EVENTS:
        _events.append((time.perf_counter_ns(), label))
        if _clock is not None:
            _pending.append((len(_events) - 1, _clock[0]()))


def use_device_clock(record, elapsed_ms) -> None:
    """A GPU rank's clock for its marks, taken where tracing is on and RSHARD_TRACE_DEVICE=1: record() records an
    event on the current stream and returns it; elapsed_ms(a, b) waits for b and gives ms from a to b."""
    global _clock
    if _on and os.environ.get(DEVICE_ENV, "").strip() == "1":
        _clock = (record, elapsed_ms)


def settle() -> None:
    """Time the device marks recorded so far (call where the stream has drained: a step's end). A no-op without a
    device clock."""
    global _first_event
    if not _pending:
        return
    elapsed_ms = _clock[1]
    if _first_event is None:
        _first_event = _pending[0][1]
    for index, event in _pending:
        host_ns, label = _events[index][:2]
        _events[index] = (host_ns, label, int(round(elapsed_ms(_first_event, event) * 1e6)))
    _pending.clear()


def _process_start_ns() -> int | None:
    """When this process began, on the monotonic clock (Linux: /proc/self/stat's start time since boot)."""
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat(5): start time in clock ticks after boot
        return int(ticks / os.sysconf("SC_CLK_TCK") * 1e9)
    except (OSError, ValueError, IndexError):
        return None


def _write(folder: str, rank: int) -> None:
    try:
        settle()  # marks after the last step's end, where the GPU can still say when it reached them
    except Exception:  # noqa: BLE001 - at exit the CUDA context may be gone: those marks keep their host time
        _pending.clear()
    mark("exit")  # atexit runs this last of the handlers registered after tracing began (MPI's, CuPy's)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as fh:
        json.dump({"rank": rank, "events": _events}, fh)
