"""Profile every rank when asked: with RSHARD_PROFILE=DIR set, each rank runs under cProfile and writes
DIR/rank<N>.txt at exit (the 40 costliest functions by own time and by cumulative time). For finding where a
job's time goes before optimizing it (issue 13); off unless the variable is set."""
from __future__ import annotations

import atexit
import cProfile
import io
import os
import pstats

from rshard_hpc.dist.launcher import world_rank
from rshard_hpc.engine import trace

ENV_VAR = "RSHARD_PROFILE"
TOP = 40


def start_if_asked() -> None:
    trace.start_if_asked(world_rank())  # RSHARD_TRACE=DIR: a host timeline of marks (engine/trace.py)
    folder = os.environ.get(ENV_VAR)
    if not folder:
        return
    profiler = cProfile.Profile()
    atexit.register(_write, profiler, folder, world_rank())
    profiler.enable()


def _write(profiler: cProfile.Profile, folder: str, rank: int) -> None:
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    for order in ("tottime", "cumulative"):
        out.write(f"==== rank {rank}, by {order}\n")
        stats.sort_stats(order).print_stats(TOP)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank{rank}.txt"), "w") as fh:
        fh.write(out.getvalue())
