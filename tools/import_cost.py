"""CPU seconds a rank spends importing what it runs a job with, beyond NumPy, click and mpi4py (issue 13: 13 ranks
on 2 cores pay every module 13 times at start-up). Fresh processes, alternating between the trees given, medians.

    python tools/import_cost.py                      # this checkout
    python tools/import_cost.py .old     # and older code: git archive REV rshard_hpc | tar -x -C .old
"""
import os
import resource
import statistics
import subprocess
import sys

WORKER = "import rshard_hpc.cli, rshard_hpc.run.job, rshard_hpc.engine.workers, rshard_hpc.engine.attn_worker"
BASE = "import numpy, click, mpi4py.MPI"  # imported by every rank whatever rshard does


def cpu_seconds(code: str, tree: str) -> float:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), PYTHONSAFEPATH="1")  # that tree before any install
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd="/")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def main(trees: list, runs: int = 30) -> None:
    seconds = {tree: [] for tree in trees}
    base = []
    for _ in range(runs):
        for tree in trees:
            seconds[tree].append(cpu_seconds(f"{BASE}; {WORKER}", tree))
        base.append(cpu_seconds(BASE, trees[0]))
    print(f"{BASE}: {1e3 * statistics.median(base):.0f} ms CPU (median of {runs}; least {1e3 * min(base):.0f})")
    for tree, values in seconds.items():
        median, least = statistics.median(values), min(values)
        print(f"{tree}: a worker's imports {1e3 * median:.0f} ms CPU (least {1e3 * least:.0f}): "
              f"{1e3 * (median - statistics.median(base)):.0f} ms beyond the base's median, "
              f"{1e3 * (least - min(base)):.0f} beyond its least")


if __name__ == "__main__":
    main([os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] + sys.argv[1:])
