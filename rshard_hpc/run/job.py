"""`rshard run`: set up every rank, agree on errors before work, then play the role this rank has."""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np

from rshard_hpc.dist import collectives
from rshard_hpc.dist.devices import connect_workers, gpu_sharing_note, rank_backend
from rshard_hpc.dist.launcher import resume_collection
from rshard_hpc.dist.topology import Topology
from rshard_hpc.engine import trace
from rshard_hpc.engine.stats import rank_stats
from rshard_hpc.errors import JobAborted, RshardError
from rshard_hpc.models.client_layers import check_client_layers
from rshard_hpc.run import termination, testhooks
from rshard_hpc.run.client_job import _prepare_client
from rshard_hpc.run.options import RunOptions
from rshard_hpc.run.progress import say

WARM_UP_ENV = "RSHARD_WARM_UP"  # "0": no set-up warm-up (compare first steps); "1": CPU ranks too (tests)


def _warms_up(xp) -> bool:
    """GPU ranks run one tiny pass at set-up (worker.warm_up), unless RSHARD_WARM_UP=0; =1 makes CPU ranks too."""
    asked = os.environ.get(WARM_UP_ENV)
    return asked == "1" or (xp is not np and asked != "0")


def run(opts: RunOptions) -> None:
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    trace.mark("mpi up")
    opts, chosen = opts.with_layout(world.Get_size())  # a pure function of the size: alike on every rank
    if opts.client_layers is not None:  # a negative K: refused on every rank alike (K >= layers: by the client)
        check_client_layers(opts.client_layers)
    topo = Topology.build(world, opts.alpha, opts.beta)  # a bad size raises on every rank alike
    if chosen and topo.is_client:
        say(chosen)
    termination.set_role(topo.is_client, topo.describe)
    testhooks.at("rank_started", rank=topo.rank)  # off unless RSHARD_PID_DIR / RSHARD_TEST_FAIL_RANK
    spec = opts.plan_spec()
    job = _prepare_client(topo, opts, spec) if topo.is_client else None
    trace.mark("prepared")
    try:
        worker = _set_up(world, topo, opts, spec, job)
        trace.mark("set up")
        resume_collection()  # the start-up's objects frozen: no collection walks them, not even at exit
        _play(world, topo, job, worker)
    finally:
        if job is not None:
            job.close()  # the results file's lock (and a staging file that never got a batch)


def _set_up(world, topo, opts: RunOptions, spec, job):
    """Every rank's backend and worker; any rank's error is every rank's error (status 2, no work done)."""
    prepared = collectives.bcast(world, job.prepared if job else None)
    if prepared.error:
        raise RshardError(prepared.error)
    # K as the client decided it for this model, and the device (a small job's: the CPUs, RunOptions.device_for)
    opts = replace(opts, client_layers=prepared.client_layers, device=prepared.device)
    xp, transport, error = np, None, None
    try:
        xp, transport = rank_backend(topo, opts.device, client_gpu=opts.client_on_gpu(prepared.job_tokens))
    except RshardError as exc:
        error = str(exc)
    trace.mark("device")
    collectives.agree(world, error)  # every rank has its device before the workers probe CUDA IPC together
    worker, error = None, None
    try:
        trace.mark("device agreed")
        connect_workers(topo, transport, opts.transport, job_tokens=prepared.job_tokens)
        trace.mark("transport")
        worker = _make_worker(topo, spec, prepared.model_path, prepared.cfg, xp, transport, opts.dtype,
                              opts.client_layers)
        if _warms_up(xp):
            worker.warm_up()  # the step's kernels load here, beside the other ranks' set-up
            trace.mark("warmed up")
    except RshardError as exc:
        error = str(exc)
    collectives.agree(world, error)
    note = gpu_sharing_note(world, xp is not np) if opts.device == "gpu" else ""  # collective; the client says it
    if note:
        say(note)
    return worker


def _play(world, topo, job, worker) -> None:
    """The client runs the job; the workers serve it. Past the set-up no error is collective: a user-facing
    error ends the job by abort (JobAborted), said by the rank that met it."""
    try:
        if topo.is_client:
            job.run(worker)
        else:
            worker.serve()
            collectives.gather_objects(world, rank_stats(topo, worker.timer.seconds, worker.transport))
    except JobAborted:
        raise
    except RshardError as exc:
        raise JobAborted(str(exc)) from exc
    trace.mark("played")
    collectives.barrier(world)  # the client's reports are written: no rank ends (or is signalled out) before


def _make_worker(topo, spec, model_path, cfg, xp, transport, dtype="float32", client_layers: int = 0):
    """cfg: the model's config as the client read it (an AttnNode never opens the weight file)."""
    from rshard_hpc.engine.client import Client
    from rshard_hpc.engine.attn_worker import AttnWorker
    from rshard_hpc.engine.workers import CompWorker
    from rshard_hpc.models.client_layers import load_client_layers

    if topo.role == "comp":
        from rshard_hpc.models import build_model, read_model_tensors

        # CompNode 0 reads the weights (layers K … L-1 only with client layers); the others receive them over comp_comm
        tensors = collectives.load_on_root(topo.comp_comm, lambda: read_model_tensors(model_path, cfg, client_layers))
        return CompWorker(topo, spec, build_model(cfg, tensors, dtype, xp), transport, xp=xp, dtype=dtype,
                          first_layer=client_layers)
    if topo.role == "attn":
        return AttnWorker(topo, spec, cfg, transport, xp=xp, dtype=dtype, first_layer=client_layers)
    # the client reads only the first K layers and the embeddings (none for K = 0)
    return Client(topo, spec, cfg, transport, layers=load_client_layers(model_path, cfg, client_layers, dtype, xp),
                  xp=xp)
