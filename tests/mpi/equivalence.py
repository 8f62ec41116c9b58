"""Run under mpiexec: the sharded engine against the single-process reference on a random model.

usage: mpiexec -n W python tests/mpi/equivalence.py MODEL.h5 ALPHA BETA C C_A SEED [DTYPE [K]]
K (default 0): --client-layers, the client runs the first K layers and sends CompNodes hidden rows.
DTYPE float32 (default): max abs difference to the reference <= 1e-5.
DTYPE bfloat16: relative error ‖got − ref‖/‖ref‖ per sequence to the float32 reference <= 2e-2, and
> 1e-5 (bf16 did take effect); the bf16 single-process forward (same rounding) is printed beside it.
Every rank exits 0 only if every check passes (a collective verdict).
"""
import sys

import numpy as np
from mpi4py import MPI

from rshard_hpc.dist.topology import Topology
from rshard_hpc.dist.transport import Transport
from rshard_hpc.engine import micro
from rshard_hpc.engine.client import Client
from rshard_hpc.engine.attn_worker import AttnWorker
from rshard_hpc.engine.workers import CompWorker
from rshard_hpc.models import load_model, weights
from rshard_hpc.models.client_layers import load_client_layers
from rshard_hpc.models.reference import reference_forward
from rshard_hpc.plan.schemes import PlanSpec

TOL = 1e-5
TOL_BF16_REL = 2e-2  # against float32, relative (the bound for bf16)
MIN_BF16_REL = 1e-5  # below this the run was not bf16 at all


def rel_err(got, ref) -> float:
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def ragged_batch(rng, vocab):
    lens = [1, 237, 5, 64, 2, 130]
    return [rng.integers(0, vocab, n) for n in lens]


SUMS_TOL_REL = 1e-12  # want="sums" against the float64 sums of the same rows: only the float64 order differs


def sums_error(client, seqs, rows) -> float:
    """A third batch with want="sums" (the rows' float64 sum per sequence, as mean pooling asks for) against the
    float64 sums of `rows`, the final rows an earlier batch of the same sequences returned: relative error."""
    sums = client.encode(seqs, want="sums")
    want = np.stack([np.asarray(r, dtype=np.float64).sum(axis=0) for r in rows])
    return float(np.abs(sums - want).max() / max(np.abs(want).max(), 1e-30))


def serve_worker(topo, spec, cfg, transport, comp_model, **options):
    """This rank's worker, made and served until the client stops; None on the client. A CompNode gets the model
    comp_model() loads, an AttnNode the config; options (xp, dtype, first_layer) go to either."""
    if topo.role == "client":
        return None
    if topo.role == "comp":
        worker = CompWorker(topo, spec, comp_model(), transport, **options)
    else:
        worker = AttnWorker(topo, spec, cfg, transport, **options)
    worker.serve()
    return worker


def lanes_taken(world, worker) -> bool:
    """Collective: with RSHARD_MICRO_BATCHES > 1, whether the workers ran steps in lanes (printed by rank 0), so a
    lanes test cannot pass on steps that were never cut; True without it."""
    steps = world.allreduce(getattr(worker, "steps_in_lanes", 0), op=MPI.MAX)
    if world.Get_rank() == 0:
        print(f"steps in lanes (most on a worker): {steps}", flush=True)
    return micro.requested() == 1 or steps > 0


def small_lanes() -> None:
    """With RSHARD_MICRO_BATCHES set (the client cuts large steps into lanes), lanes of a few tokens, so that this
    script's small batches are cut too (every rank runs this alike)."""
    if micro.requested() > 1:
        micro.MIN_LANE_TOKENS = 8


def main():
    path, alpha, beta, c, c_a, seed = sys.argv[1], *map(int, sys.argv[2:7])
    dtype = sys.argv[7] if len(sys.argv) > 7 else "float32"
    k = int(sys.argv[8]) if len(sys.argv) > 8 else 0
    world = MPI.COMM_WORLD
    topo = Topology.build(world, alpha, beta)
    spec = PlanSpec("strided", alpha, beta, c, c_a)
    cfg = weights.read_config(path)
    transport = Transport()
    small_lanes()
    ok = 1
    if topo.role == "client":
        seqs = ragged_batch(np.random.default_rng(seed), cfg.vocab_size)
        client = Client(topo, spec, cfg, transport, layers=load_client_layers(path, cfg, k, dtype))
        got = client.encode(seqs)
        got2 = client.encode(seqs[::-1])  # a second batch reuses every worker
        sums_err = sums_error(client, seqs, got)
        client.stop()
        both = got + got2[::-1]
        ref = reference_forward(load_model(path, dtype=dtype), seqs)
        same = max(float(np.abs(g - r).max()) for g, r in zip(both, ref + ref))
        tag = f"alpha={alpha} beta={beta} c={c} c_a={c_a} {dtype} K={k}"
        print(f"{tag}: want=sums relative error {sums_err:.1e}", flush=True)
        if dtype == "float32":
            ok = int(same <= TOL and sums_err <= SUMS_TOL_REL)
            print(f"{tag}: max abs diff {same:.3e}", flush=True)
        else:
            ref32 = reference_forward(load_model(path), seqs)
            rel = max(rel_err(g, r) for g, r in zip(both, ref32 + ref32))
            ref_rel = max(rel_err(r, r32) for r, r32 in zip(ref, ref32))
            ok = int(MIN_BF16_REL < rel <= TOL_BF16_REL and sums_err <= SUMS_TOL_REL)
            print(f"{tag}: max relative error to float32 {rel:.3e} (single-process bf16: {ref_rel:.3e}); "
                  f"max abs diff to the bf16 single-process forward {same:.3e}", flush=True)
    worker = serve_worker(topo, spec, cfg, transport, lambda: load_model(path, dtype=dtype), dtype=dtype, first_layer=k)
    ok = int(lanes_taken(world, worker)) * ok
    ok = world.allreduce(ok, op=MPI.MIN)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
