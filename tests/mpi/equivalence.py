"""Run under mpiexec: the sharded engine against the single-process reference on a random model.

usage: mpiexec -n W python tests/mpi/equivalence.py MODEL.h5 ALPHA BETA C C_A SEED
Every rank exits 0 only if the max abs difference is within tolerance (a collective verdict).
"""
import sys

import numpy as np
from mpi4py import MPI

from rshard_hpc.comm import Transport
from rshard_hpc.engine import AttnWorker, Client, CompWorker
from rshard_hpc.models import load_model
from rshard_hpc.models import weights
from rshard_hpc.models.reference import reference_forward
from rshard_hpc.plan import PlanSpec
from rshard_hpc.topology import Topology

TOL = 1e-5


def ragged_batch(rng, vocab):
    lens = [1, 237, 5, 64, 2, 130]
    return [rng.integers(0, vocab, n) for n in lens]


def main():
    path, alpha, beta, c, c_a, seed = sys.argv[1], *map(int, sys.argv[2:7])
    world = MPI.COMM_WORLD
    topo = Topology.build(world, alpha, beta)
    spec = PlanSpec("strided", alpha, beta, c, c_a)
    cfg = weights.read_config(path)
    transport = Transport()
    worst = None
    if topo.role == "client":
        model = load_model(path)
        seqs = ragged_batch(np.random.default_rng(seed), cfg.vocab_size)
        client = Client(topo, spec, cfg, transport)
        got = client.encode(seqs)
        got2 = client.encode(seqs[::-1])  # a second batch reuses every worker
        client.stop()
        ref = reference_forward(model, seqs)
        worst = max(float(np.abs(g - r).max()) for g, r in zip(got + got2[::-1], ref + ref))
        print(f"alpha={alpha} beta={beta} c={c} c_a={c_a}: max abs diff {worst:.3e}", flush=True)
    elif topo.role == "comp":
        CompWorker(topo, spec, load_model(path), transport).serve()
    else:
        AttnWorker(topo, spec, cfg, transport).serve()
    worst = world.bcast(worst, root=0)
    ok = world.allreduce(int(worst <= TOL), op=MPI.MIN)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
