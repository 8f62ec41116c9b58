"""Run under mpiexec: sharded prefill logits and greedy generation against a reference saved in an .npz.

usage: mpiexec -n W python tests/mpi/generate_check.py MODEL.h5 REF.npz ALPHA BETA C C_A [cpu|gpu [K]]
K (default 0): --client-layers, the client runs the first K layers (prefill and every decode step) and sends
CompNodes hidden rows; on gpu the client's layers run on its GPU too.
REF.npz holds prompts (object array of id lists), logits (n, vocab) at each prompt's last position,
greedy ids (n, T) and margins (n, T) (top-2 logit gap of the reference at each step).
Every rank exits 0 only if all checks pass (a collective verdict); rank 0 prints the measured numbers.
"""
import dataclasses
import sys

import numpy as np
from mpi4py import MPI

from rshard_hpc.dist.devices import connect_workers, rank_backend
from rshard_hpc.dist.topology import Topology
from rshard_hpc.dist.transport import Transport
from rshard_hpc.engine.client import Client
from rshard_hpc.engine.generate import GenerateSettings, LmHead, generate_batch
from rshard_hpc.models import load_model, weights
from rshard_hpc.models.client_layers import load_client_layers
from rshard_hpc.plan.schemes import PlanSpec

from equivalence import lanes_taken, serve_worker, small_lanes  # tests/mpi, beside this script

LOGIT_TOL = 1e-3
MARGIN = 0.02


class _IdCodec:
    def decode(self, ids):
        return " ".join(map(str, ids))


def agreeing_prefix_ok(got, want, margins) -> bool:
    """Identical ids up to the first step where the reference's top-2 margin is below MARGIN."""
    for t, (g, w) in enumerate(zip(got, want)):
        if margins[t] < MARGIN:
            return True
        if g != w:
            return False
    return len(got) >= len(want)


def client_checks(topo, spec, cfg, path, ref, layers=None) -> bool:
    prompts = [np.asarray(p, dtype=np.int64) for p in ref["prompts"]]
    client = Client(topo, spec, cfg, Transport(), layers=layers)
    head = LmHead(path, cfg)
    client.begin_batch([len(p) for p in prompts])
    rows = client.step([(0, len(p)) for p in prompts], prompts, "last")
    client.end_batch()
    logit_err = float(np.abs(head.logits(rows) - ref["logits"]).max())
    steps = ref["greedy"].shape[1]
    settings = GenerateSettings(max_new_tokens=steps)
    ids = [str(i) for i in range(len(prompts))]
    no_eos = dataclasses.replace(cfg, eos_token_ids=())  # the reference runs all steps too
    got, _ = generate_batch(client, _IdCodec(), no_eos, head, prompts, ids, settings)
    client.stop()
    same = [agreeing_prefix_ok(g, list(w), m) for g, w, m in zip(got, ref["greedy"], ref["margins"])]
    exact = sum(int(list(g) == list(w)) for g, w in zip(got, ref["greedy"]))
    k = layers.n_layers if layers else 0
    print(f"alpha={topo.alpha} beta={topo.beta} c={spec.c} c_a={spec.c_a} {sys.argv[7] if len(sys.argv) > 7 else 'cpu'} "
          f"K={k}: last-position logits max abs diff "
          f"{logit_err:.2e}; greedy ids identical for {exact}/{len(prompts)} prompts x {steps} tokens; "
          f"agree up to the first low-margin step: {sum(same)}/{len(prompts)}", flush=True)
    for g, w in zip(got, ref["greedy"]):
        if list(g) != list(w):
            print("  got ", list(g), "\n  want", list(w), flush=True)
    return logit_err <= LOGIT_TOL and all(same)


def main():
    path, ref_path = sys.argv[1], sys.argv[2]
    alpha, beta, c, c_a = map(int, sys.argv[3:7])
    device = sys.argv[7] if len(sys.argv) > 7 else "cpu"
    k = int(sys.argv[8]) if len(sys.argv) > 8 else 0
    world = MPI.COMM_WORLD
    topo = Topology.build(world, alpha, beta)
    small_lanes()
    spec = PlanSpec("strided", alpha, beta, c, c_a)
    cfg = weights.read_config(path)
    xp, transport = rank_backend(topo, device, client_gpu=k > 0)
    connect_workers(topo, transport)
    ok = True
    if topo.role == "client":
        ref = np.load(ref_path, allow_pickle=True)
        ok = client_checks(topo, spec, cfg, path, ref, load_client_layers(path, cfg, k, xp=xp))
    worker = serve_worker(topo, spec, cfg, transport, lambda: load_model(path, xp=xp), xp=xp, first_layer=k)
    ok = lanes_taken(world, worker) and ok
    verdict = world.allreduce(int(ok), op=MPI.MIN)
    sys.exit(0 if verdict else 1)


if __name__ == "__main__":
    main()
