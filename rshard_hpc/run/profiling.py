"""Profile every rank when asked: with RSHARD_PROFILE=DIR set, each rank runs under cProfile and writes
DIR/rank<N>.txt at exit (the 40 costliest functions by own time and by cumulative time). For finding where a
job's time goes before optimizing it (issue 13); off unless the variable is set. With RSHARD_PROFILE_MIN_TOKENS=N
as well, a worker's profile covers only its steps of at least N tokens (a prefill's, not the set-up's or the
decode steps'): `step_scope`. With RSHARD_PROFILE_CPU=1 the profile counts this process's CPU time instead of wall
time: where ranks outnumber cores, a rank's wall time includes the time others held its core."""
from __future__ import annotations

import atexit
import io
import os
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rshard_hpc.dist.launcher import world_rank
from rshard_hpc.engine import trace

if TYPE_CHECKING:
    import cProfile

ENV_VAR = "RSHARD_PROFILE"
MIN_TOKENS_VAR = "RSHARD_PROFILE_MIN_TOKENS"
CPU_CLOCK_VAR = "RSHARD_PROFILE_CPU"  # "1": time by this process's CPU clock, not the wall (ranks outnumber cores)
TOP = 40
_scoped = {}  # the profiler when it runs only in steps: {"profiler": Profile, "min_tokens": int}


def start_if_asked() -> None:
    trace.start_if_asked(world_rank())  # RSHARD_TRACE=DIR: a host timeline of marks (engine/trace.py)
    folder = os.environ.get(ENV_VAR)
    if not folder:
        return
    profiler = new_profiler()
    atexit.register(_write, profiler, folder, world_rank())
    min_tokens = os.environ.get(MIN_TOKENS_VAR)
    if min_tokens:
        _scoped.update(profiler=profiler, min_tokens=int(min_tokens))
    else:
        profiler.enable()


def new_profiler() -> cProfile.Profile:
    """A profiler on the wall clock, or on this process's CPU clock with RSHARD_PROFILE_CPU=1."""
    import cProfile  # here, not at the top: every rank imports this module, few profile

    return cProfile.Profile(time.process_time) if os.environ.get(CPU_CLOCK_VAR) == "1" else cProfile.Profile()


@contextmanager
def step_scope(tokens: int):
    """Around a worker's step of `tokens` tokens: profiled when RSHARD_PROFILE_MIN_TOKENS asks for steps that size."""
    profiler = _scoped.get("profiler")
    if profiler is None or tokens < _scoped["min_tokens"]:
        yield
        return
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()


def _write(profiler: cProfile.Profile, folder: str, rank: int) -> None:
    profiler.disable()
    if not profiler.getstats():
        return  # a scoped profile with no step of that size
    import pstats

    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    for order in ("tottime", "cumulative"):
        out.write(f"==== rank {rank}, by {order}\n")
        stats.sort_stats(order).print_stats(TOP)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank{rank}.txt"), "w") as fh:
        fh.write(out.getvalue())
    stats.dump_stats(os.path.join(folder, f"rank{rank}.prof"))  # for pstats' callers and callees
