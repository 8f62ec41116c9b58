"""SIGTERM — a Slurm time limit, `scancel`, `kill` — ends a run promptly and never in the middle of a results
write (a process killed while HDF5 writes can leave the whole file unreadable).

`guard()` (around `rshard run`) makes SIGTERM wake a watcher thread, which acts even while the main thread waits
inside MPI (mpi4py releases the GIL there):
  - the client ends the job at once — unless it is inside `protected()` (writing the results file): then as soon
    as that write is done. It prints what the results file holds and how to continue (--resume);
  - any other rank takes no further step (`hold_if_stopping`, between its steps) and waits TERM_GRACE_S: under a
    time limit every rank gets the signal together, and a worker that ended the job at once would have the
    launcher kill the client mid-write. If the client has not ended the job by then, the rank ends it (a lone
    `kill` of one worker); the client, waiting on the worker's next step, is then not inside a write (a worker
    that served on through its grace had its abort land on the client's write of a later batch).
The job then ends by MPI Abort on every rank with status EXIT_STATUS (128 + SIGTERM, as a shell reports it).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

TERM_GRACE_S = 5.0
EXIT_STATUS = 128 + signal.SIGTERM


class _State:
    def __init__(self):
        self.lock = threading.Lock()
        self.writing = 0  # depth of protected() blocks in progress
        self.pending = False  # SIGTERM came during a write: end the job when the write is done
        self.ending = False  # the job is being ended: no new write may start
        self.stopping = False  # a worker's SIGTERM came: it takes no further step
        self.is_client = False
        self.describe = lambda: "a rank"
        self.status = lambda: ""  # the client's line on what the results file holds


_state = _State()


def set_role(is_client: bool, describe) -> None:
    """Once the topology is known: whether this rank writes results, and its description for the message."""
    _state.is_client, _state.describe = is_client, describe


def set_status(status) -> None:
    """The client's callable returning what the results file holds, for the message."""
    _state.status = status


@contextmanager
def guard():
    """While inside: SIGTERM is handled as the module says (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    old_handler = signal.signal(signal.SIGTERM, _noop)  # caught, so that its number reaches the wakeup fd
    old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read_fd,), name="rshard-sigterm", daemon=True).start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGTERM, old_handler)
        os.close(write_fd)  # the watcher's read returns empty and it ends


@contextmanager
def protected():
    """A results write: a SIGTERM that arrives meanwhile takes effect when the outermost block ends."""
    with _state.lock:
        ending = _state.ending
        if not ending:
            _state.writing += 1
    if ending:  # the job is being ended right now: do not start a write it could cut
        _wait_for_the_end()
    try:
        yield
    finally:
        with _state.lock:
            _state.writing -= 1
            end_now = _state.writing == 0 and _state.pending
            if end_now:
                _state.ending = True
        if end_now:
            _end_job()


def _noop(signum, frame):
    """Python-level handler: the watcher thread does the work (this one would wait for MPI to return)."""


def _watch(read_fd: int) -> None:
    while True:
        data = os.read(read_fd, 64)
        if not data:
            os.close(read_fd)
            return
        if signal.SIGTERM in data:
            _on_sigterm()


def hold_if_stopping() -> None:
    """A worker between steps: once its SIGTERM came it takes no further step and waits here for the end, so that
    the client, waiting on it, is not inside a results write when the job is ended."""
    if _state.stopping:
        _wait_for_the_end()


def _on_sigterm() -> None:
    if not _state.is_client:
        _state.stopping = True
        time.sleep(TERM_GRACE_S)  # the client, signalled too, ends the job after its write
    with _state.lock:
        if _state.ending:
            return
        if _state.writing:  # only the client writes: end the job when the write is done
            _state.pending = True
            return
        _state.ending = True
    _end_job()


def _end_job() -> None:
    from rshard_hpc.dist import collectives

    if _state.is_client:
        status = _state.status()
        sys.stderr.write(f"rshard: terminated by SIGTERM{': ' + status if status else ''}\n")
    else:
        sys.stderr.write(f"rshard: {_state.describe()} terminated by SIGTERM\n")
    collectives.abort(EXIT_STATUS)


def _wait_for_the_end() -> None:
    while True:  # collectives.abort ends the process (every thread) shortly
        time.sleep(1.0)
