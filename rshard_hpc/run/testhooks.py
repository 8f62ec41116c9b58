"""Test-only hooks of `rshard run`. Production code calls one function, `at(event, **info)`; every hook is off
unless its environment variable is set (the failure and signal tests set them).

- `RSHARD_PID_DIR=DIR`: every rank writes `DIR/rank{R}.pid` (its process id) when it starts, and the client
  writes `DIR/batch{N}.done` once batch N is in the results file, so a test can kill a rank between batches.
- `RSHARD_TEST_SLOW_BATCH_S=SECONDS`: the client sleeps that long after every batch (a long job, made short).
- `RSHARD_TEST_FAIL_RANK=R`: rank R raises an unexpected exception once the ranks are set up (the abort path).
- `RSHARD_TEST_SLOW_WRITE_S=SECONDS`: every results append sleeps that long between writing its rows and
  committing their ids, after writing `DIR/writing{N}` (N counts the appends; DIR from RSHARD_PID_DIR).
- `RSHARD_TEST_SLOW_REPORTS_S=SECONDS`: the client writes `DIR/reports` and sleeps that long as it starts
  writing the final reports (/privacy/json, /stats), inside their protected write.
- `RSHARD_EXIT_DIR=DIR`: every rank writes `DIR/rank{R}.exit` with the status it is about to exit with,
  `DIR/rank{R}.gc` with its cycle collector's state then: "enabled frozen-object-count", and `DIR/rank{R}.sched`
  its scheduling policy: "batch" or "other" (dist/launcher.py).
"""
from __future__ import annotations

import gc
import os
import time


def at(event: str, **info) -> None:
    """The one entry point: `rank_started` (rank), `batch_finished` (batch, 1-based), `inside_results_write`,
    `writing_reports`, `rank_exiting` (rank, code)."""
    _HOOKS[event](**info)


def _rank_started(rank: int) -> None:
    folder = os.environ.get("RSHARD_PID_DIR")
    if folder:
        _write(os.path.join(folder, f"rank{rank}.pid"), str(os.getpid()))
    if os.environ.get("RSHARD_TEST_FAIL_RANK", "").strip() == str(rank):
        raise RuntimeError(f"RSHARD_TEST_FAIL_RANK={rank}: a failure injected by the test hook")


def _batch_finished(batch: int) -> None:
    folder = os.environ.get("RSHARD_PID_DIR")
    if folder:
        _write(os.path.join(folder, f"batch{batch}.done"), str(batch))
    pause = float(os.environ.get("RSHARD_TEST_SLOW_BATCH_S") or 0)
    if pause > 0:
        time.sleep(pause)


_writes = [0]


def _inside_results_write() -> None:
    """Between a batch's rows and their ids (inside the protected write)."""
    pause = float(os.environ.get("RSHARD_TEST_SLOW_WRITE_S") or 0)
    if pause <= 0:
        return
    _writes[0] += 1
    folder = os.environ.get("RSHARD_PID_DIR")
    if folder:
        _write(os.path.join(folder, f"writing{_writes[0]}"), str(_writes[0]))
    time.sleep(pause)


def _writing_reports() -> None:
    pause = float(os.environ.get("RSHARD_TEST_SLOW_REPORTS_S") or 0)
    if pause <= 0:
        return
    folder = os.environ.get("RSHARD_PID_DIR")
    if folder:
        _write(os.path.join(folder, "reports"), "1")
    time.sleep(pause)


def _rank_exiting(rank: int, code: int) -> None:
    folder = os.environ.get("RSHARD_EXIT_DIR")
    if folder:
        _write(os.path.join(folder, f"rank{rank}.exit"), str(code))
        _write(os.path.join(folder, f"rank{rank}.gc"), f"{int(gc.isenabled())} {gc.get_freeze_count()}")
        batch = hasattr(os, "SCHED_BATCH") and os.sched_getscheduler(0) == os.SCHED_BATCH
        _write(os.path.join(folder, f"rank{rank}.sched"), "batch" if batch else "other")


_HOOKS = {"rank_started": _rank_started, "batch_finished": _batch_finished,
          "inside_results_write": _inside_results_write, "writing_reports": _writing_reports,
          "rank_exiting": _rank_exiting}


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # readers never see a half-written file
