"""Run under mpirun: the sharded engine on GPUs (or CPUs) against references, on a random model.

usage: mpirun -n W python tests/mpi/gpu_equivalence.py --model M.h5 --alpha A --beta B [--c C] [--c-a CA]
           [--device gpu|cpu] [--transport auto|staged|mpi|ipc|nccl] [--case short|long] [--seed S]
           [--dtype float32|bfloat16]

case short: a ragged batch (lengths 1 … 1500), compared with the NumPy single-process forward on the client
            and with the single-process forward on the GPU.
case long:  one 16384-token sequence plus a short one, compared with a float64 forward on the client's GPU
            whose attention is torch's scaled_dot_product_attention in float64.
Every rank exits 0 only if the worst relative error ‖got − ref‖ / ‖ref‖ (per sequence) is <= 1e-4 for
float32, and in (1e-5, 2e-2] for bfloat16 (the references stay float32 / float64: bf16 is measured against
full precision, and must have taken effect).
"""
import argparse
import sys
import time

import numpy as np
from mpi4py import MPI

from rshard_hpc.dist import devices
from rshard_hpc.dist.topology import Topology
from rshard_hpc.dist.transport import Transport
from rshard_hpc.dist.transport import TRANSPORTS
from rshard_hpc.engine.client import Client
from rshard_hpc.models import load_model, model_class, weights
from rshard_hpc.models.reference import reference_forward
from rshard_hpc.ops import arrays
from rshard_hpc.plan.schemes import PlanSpec

from equivalence import SUMS_TOL_REL, lanes_taken, serve_worker, small_lanes, sums_error  # tests/mpi

TOL = {"float32": 1e-4, "bfloat16": 2e-2}
MIN_BF16 = 1e-5  # a bf16 run closer than this to full precision did not run in bf16


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def batch(rng, vocab, case):
    lens = {"short": [1, 237, 5, 64, 2, 130, 1500], "small": [1, 5, 20, 9], "long": [16384, 300]}[case]
    return [rng.integers(0, vocab, n) for n in lens]


def small_steps(client, seqs, causal: bool, tail: int = 3):
    """Encode with steps of at most transport.SMALL_STEP_TOKENS tokens (the AttnNodes' fused small-step path):
    for a causal model a prefix, then one token a sequence a step (decode-like); else one step. Rows per seq."""
    lens = [len(s) for s in seqs]
    client.begin_batch(lens)
    cuts = [max(n - tail, 0) if causal else n for n in lens]
    parts = [[] for _ in seqs]
    ranges = [(0, c) for c in cuts]
    for _ in range(tail + 1 if causal else 1):
        rows = client.step(ranges, [s[a:b] for s, (a, b) in zip(seqs, ranges)], "all")  # sequence-major
        at = 0
        for b, (lo, hi) in enumerate(ranges):
            parts[b].append(rows[at:at + hi - lo])
            at += hi - lo
        ranges = [(hi, min(hi + 1, n)) for (_, hi), n in zip(ranges, lens)]
    client.end_batch()
    return [np.concatenate(p) for p in parts]


def torch_attention64(q, pos, seq, k, v, causal, scale, block=2048):
    """float64 attention through torch SDPA (cupy in, cupy out). q: (n, H, D); k, v: (n, Hkv, D)."""
    import cupy
    import torch
    import torch.nn.functional as F

    qt, kt, vt = (torch.from_dlpack(a) for a in (q, k, v))
    group = qt.shape[1] // kt.shape[1]
    kt = kt.repeat_interleave(group, dim=1).transpose(0, 1)  # (H, n, D)
    vt = vt.repeat_interleave(group, dim=1).transpose(0, 1)
    pos_t, seq_t = torch.from_dlpack(cupy.asarray(pos)), torch.from_dlpack(cupy.asarray(seq))
    out = torch.empty_like(qt)
    for a in range(0, qt.shape[0], block):
        b = min(a + block, qt.shape[0])
        mask = seq_t[a:b, None] == seq_t[None, :]
        if causal:
            mask &= pos_t[None, :] <= pos_t[a:b, None]
        o = F.scaled_dot_product_attention(qt[a:b].transpose(0, 1), kt, vt, attn_mask=mask, scale=scale)
        out[a:b] = o.transpose(0, 1)
    return cupy.from_dlpack(out)


def forward64(path, cfg, sequences):
    """float64 single-process forward on the GPU: the model's own per-token passes, torch attention."""
    import cupy

    tensors = weights.read_tensors(path, model_class(cfg).tensor_keys(cfg))
    cls = model_class(cfg)
    t64 = {k: v.astype(np.float64) for k, v in tensors.items()}
    try:
        model = cls(cfg, t64, xp=cupy, dtype="float64")
    except TypeError:
        model = cls(cfg, t64, xp=cupy)
    lens = [len(s) for s in sequences]
    ids = cupy.asarray(np.concatenate(sequences).astype(np.int64))
    pos = cupy.asarray(np.concatenate([np.arange(n) for n in lens]).astype(np.int32))
    seq = cupy.asarray(np.repeat(np.arange(len(lens)), lens).astype(np.int32))
    h = model.embed(ids, pos)
    for layer in range(cfg.n_layers):
        q, k, v = model.pre(layer, h, pos)
        o = torch_attention64(q, pos, seq, k, v, cfg.causal, 1.0 / np.sqrt(cfg.head_dim))
        h = model.post(layer, h, o)
    rows = cupy.asnumpy(model.final_rows(h))
    bounds = np.cumsum([0] + lens)
    return [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--alpha", type=int, default=2)
    ap.add_argument("--beta", type=int, default=2)
    ap.add_argument("--c", type=int, default=1)
    ap.add_argument("--c-a", type=int, default=1)
    ap.add_argument("--device", choices=["cpu", "gpu"], default="gpu")
    ap.add_argument("--transport", choices=list(TRANSPORTS), default="auto")
    ap.add_argument("--case", choices=["short", "small", "long"], default="short")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args()
    tol = TOL[args.dtype]
    low = MIN_BF16 if args.dtype == "bfloat16" else -1.0

    world = MPI.COMM_WORLD
    topo = Topology.build(world, args.alpha, args.beta)
    small_lanes()
    spec = PlanSpec("strided", args.alpha, args.beta, args.c, args.c_a)
    cfg = weights.read_config(args.model)
    xp = np
    if args.device == "gpu":
        dev = devices.select_device()
        xp = arrays.array_module("gpu")
        if topo.rank == 1:
            print(f"rank 1: GPU {dev}", flush=True)
    transport = Transport(device=args.device == "gpu" and topo.role != "client")
    why = devices.connect_workers(topo, transport, args.transport)  # the workers alone, together
    if topo.rank == 1:
        print(f"rank 1: transport {transport.mode} ({why})", flush=True)
    worst = None
    if topo.role == "client":
        seqs = batch(np.random.default_rng(args.seed), cfg.vocab_size, args.case)
        client = Client(topo, spec, cfg, transport)
        t0 = time.perf_counter()
        encode = (lambda x: small_steps(client, x, cfg.causal)) if args.case == "small" else client.encode
        got = encode(seqs)
        t1 = time.perf_counter()
        got2 = encode(seqs[::-1])  # a second batch reuses every worker
        sums_err = None if args.case == "small" else sums_error(client, seqs, got)  # one step a batch only
        client.stop()
        tag = (f"{cfg.arch} causal={cfg.causal} alpha={args.alpha} beta={args.beta} c={args.c} c_a={args.c_a} "
               f"device={args.device} dtype={args.dtype} case={args.case} tokens={sum(len(s) for s in seqs)}")
        errs = {}
        if args.case in ("short", "small"):
            ref = reference_forward(load_model(args.model), seqs)  # NumPy, single process
            errs["sharded vs numpy"] = max(rel_err(g, r) for g, r in zip(got + got2[::-1], ref + ref))
            if args.device == "gpu":
                import cupy

                ref_gpu = reference_forward(load_model(args.model, xp=cupy), seqs)
                errs["gpu single-process vs numpy"] = max(rel_err(cupy.asnumpy(g), r) for g, r in zip(ref_gpu, ref))
        else:
            ref = forward64(args.model, cfg, seqs)
            errs["sharded vs torch fp64"] = max(rel_err(g, r) for g, r in zip(got + got2[::-1], ref + ref))
        worst = max(errs.values())
        detail = ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
        sharded = [v for k, v in errs.items() if k.startswith("sharded")]
        passed = worst <= tol and min(sharded) > low and (sums_err is None or sums_err <= SUMS_TOL_REL)
        if sums_err is not None:
            detail += f", want=sums vs the rows' sums {sums_err:.1e}"
        print(f"{tag}: first batch {t1 - t0:.2f} s; max rel err: {detail} -> "
              f"{'PASS' if passed else 'FAIL'}", flush=True)
    worker = serve_worker(topo, spec, cfg, transport, lambda: load_model(args.model, dtype=args.dtype, xp=xp), xp=xp,
                          dtype=args.dtype)
    if topo.rank == 1:
        print(f"rank 1: {transport.signalled_steps} steps signalled on the device", flush=True)
    passed = world.bcast(passed if topo.role == "client" else None, root=0)
    passed = lanes_taken(world, worker) and passed
    ok = world.allreduce(int(passed), op=MPI.MIN)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
