"""A host timeline of every rank, when asked (issue 13: where a decode step's time goes between ranks).

With RSHARD_TRACE=DIR set, `mark(label)` appends (monotonic ns, label) to this rank's list and the list is
written to DIR/rank<N>.json at exit. All ranks of one node read the same monotonic clock, so their marks can be
laid side by side: `rshard bench trace DIR` does that (bench/trace_report.py). Off (a bool test) otherwise.
"""
from __future__ import annotations

import atexit
import json
import os
import time

ENV_VAR = "RSHARD_TRACE"
MAX_EVENTS = 2_000_000  # a bound on the memory a long job's trace takes; later marks are dropped

_events: list = []
_on = False


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
    """Record that this rank reached `label` now (host time; GPU work shows where the host waits for it)."""
    if _on and len(_events) < MAX_EVENTS:
        _events.append((time.perf_counter_ns(), label))


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
    mark("exit")  # atexit runs this last of the handlers registered after tracing began (MPI's, CuPy's)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as fh:
        json.dump({"rank": rank, "events": _events}, fh)
