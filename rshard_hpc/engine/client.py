"""Rank 0's side of the per-layer choreography: drives batches and steps with small broadcast headers (no token
content), scatters each CompNode only the ids of its own positions (with --client-layers K, their layer-K hidden
rows: the client runs the first K layers itself), gathers back only the final rows.

  {"op": "batch", "lens": [...]}        a new batch; plans are made for these total lengths
  {"op": "step", "ranges": [(a, b)...], "want": "all" | "last"}
                                         compute positions a … b-1 of each sequence
  {"op": "end"}                          the batch is done: AttnNodes drop their KV cache; every rank's
                                         visibility ledger of the batch is gathered to the client
  {"op": "stop"}                         the job is done
"""
from __future__ import annotations

import numpy as np

from rshard_hpc.dist import collectives
from rshard_hpc.engine import trace
from rshard_hpc.engine.routing import Routing, last_of_each_sequence, step_tokens, wanted_local_rows
from rshard_hpc.engine.stats import PhaseTimer
from rshard_hpc.engine.workers import WARM_UP_ROWS
from rshard_hpc.ops.arrays import to_host
from rshard_hpc.plan.schemes import PlanSpec, batch_plans


class Client:
    """Rank 0: drives batches and steps; holds whole prompts; receives only final rows it is entitled to."""

    def __init__(self, topo, spec: PlanSpec, cfg, transport, layers=None, xp=np):
        self.topo, self.spec, self.cfg, self.transport = topo, spec, cfg, transport
        self.xp = xp  # the client's array module: CuPy when it has a GPU (RunOptions.client_on_gpu)
        self.layers = layers  # models.client_layers.ClientLayers (--client-layers K > 0), else None: ids go out
        self.plans = []
        self.timer = PhaseTimer()
        self.ledgers = []  # per finished batch: the gathered ledgers, by world rank (None for the client)

    def warm_up(self, rows: int = WARM_UP_ROWS) -> None:
        """With client layers: their forward once on `rows` token ids 0 of one sequence, then a fresh start (see
        CompWorker.warm_up: a GPU loads its kernels at set-up, not inside the first batch)."""
        if self.layers is None:
            return
        self.layers.forward(np.zeros(rows, np.int64), np.arange(rows, dtype=np.int32), np.zeros(rows, np.int32))
        self.layers.reset()

    def begin_batch(self, lens) -> None:
        lens = [int(n) for n in lens]
        self._announce_batch(lens)
        self.plans = self._new_batch(lens)

    def _announce_batch(self, lens) -> None:
        """The batch header: every worker makes the batch's plans (and AttnNodes their KV caches)."""
        collectives.bcast(self.topo.world, {"op": "batch", "lens": lens})

    def _new_batch(self, lens):
        """The plans of a batch of these lengths; the client layers start afresh."""
        if self.layers is not None:
            self.layers.reset()
        return batch_plans(self.spec, lens)

    def step(self, ranges, ids_per_seq, want: str = "all"):
        """ids_per_seq[b]: token ids of positions ranges[b]. Returns the final rows (n_rows, d) in step order
        (all step tokens for "all"; one row per sequence with a non-empty range for "last")."""
        step = self._send(self._prepare(self.plans, ranges, ids_per_seq, want))
        return self._place(step, self._gather(step))

    def _prepare(self, plans, ranges, ids_per_seq, want: str) -> "_Step":
        """A step's routing and inputs, made on the client alone (no MPI): what _send scatters."""
        ranges = [(int(a), int(b)) for a, b in ranges]
        tokens = step_tokens(plans, ranges)
        routing = Routing(tokens, self.topo.alpha, self.topo.beta)
        flat_ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids_per_seq]) if len(tokens) else np.zeros(0, np.int64)
        mine = [routing.comp_tokens[k] for k in range(self.topo.alpha)]
        counts = [0] + [len(m) for m in mine]
        if self.layers is None:  # token ids, CompNode by CompNode
            inputs = flat_ids[np.concatenate(mine)] if mine else flat_ids
        else:
            with self.timer("client_layers"):
                hidden = self.layers.forward(flat_ids, tokens.pos, tokens.seq)  # (n, d) step order, client's device
                # CompNode by CompNode: one gather where the rows are (the GPU), then one copy to the host
                inputs = to_host(hidden[self.xp.asarray(np.concatenate(mine))])
        return _Step(ranges, want, tokens, routing, inputs, counts)

    def _send(self, step: "_Step") -> "_Step":
        """The step header to every rank, then each CompNode its inputs; the workers start on it."""
        trace.mark("step")
        collectives.bcast(self.topo.world, {"op": "step", "ranges": step.ranges, "want": step.want})
        if self.layers is None:
            self.transport.scatter_ids(self.topo.client_comm, step.inputs, step.counts)
        else:
            self.transport.scatter_rows(self.topo.client_comm, step.inputs, step.counts, self.cfg.hidden)
        trace.mark("inputs sent")
        return step

    def _gather(self, step: "_Step") -> list:
        """The step's final rows as the CompNodes sent them: [None, CompNode 0's rows, …] (collective)."""
        parts = self.transport.gather_rows(self.topo.client_comm, np.zeros((0, self.cfg.hidden), np.float32),
                                           self.cfg.hidden)
        trace.mark("rows")
        return parts

    def _place(self, step: "_Step", parts: list):
        """The gathered rows in step order (see step): no MPI, so it may wait until the workers have more work."""
        tokens, routing = step.tokens, step.routing
        rows = np.empty((len(tokens), self.cfg.hidden), dtype=np.float32)
        for k in range(self.topo.alpha):
            rows[routing.comp_tokens[k][wanted_local_rows(tokens, routing, k, step.want)]] = parts[k + 1]
        if step.want == "all":
            return rows
        return rows[last_of_each_sequence(tokens)]

    def end_batch(self) -> None:
        collectives.bcast(self.topo.world, {"op": "end"})
        trace.mark("end sent")
        if self.layers is not None:
            self.layers.reset()
        self.ledgers.append(collectives.gather_ledger(self.topo.world, None))
        trace.mark("ledgers")

    def take_ledgers(self) -> list:
        """The ledgers of the batches finished since the last call (and forget them)."""
        out, self.ledgers = self.ledgers, []
        return out

    def stop(self) -> None:
        collectives.bcast(self.topo.world, {"op": "stop"})

    def encode(self, sequences):
        """One batch through the encoder: list of (n_b,) ids -> list of final rows (n_b, d)."""
        return next(self.encode_batches([sequences]))

    def encode_batches(self, batches):
        """Each batch (a list of (n_b,) id arrays) through the encoder, in order: yields its rows per sequence.

        Pipelined: batch b+1's inputs (with client layers, its first K layers) are prepared while the workers run
        batch b, and sent before batch b is yielded, so the caller's work on batch b's rows (pooling, writing)
        overlaps the workers' on batch b+1; so does putting batch b's rows in step order. A batch's ledger is
        gathered before it is yielded (take_ledgers)."""
        batches = list(batches)
        in_flight = self._send_batch(self._prepare_batch(batches[0])) if batches else None
        for b in range(len(batches)):
            upcoming = self._prepare_batch(batches[b + 1]) if b + 1 < len(batches) else None
            lens, step = in_flight
            parts = self._gather(step)
            self.end_batch()
            if upcoming is not None:
                in_flight = self._send_batch(upcoming)
            rows = self._place(step, parts)  # in step order, while the workers run batch b+1 (~5 ms at 8k tokens)
            trace.mark("rows placed")
            bounds = np.cumsum([0] + lens)
            yield [rows[a:z] for a, z in zip(bounds[:-1], bounds[1:])]

    def _prepare_batch(self, sequences):
        """(lens, the batch's one step prepared, on plans of its own: batch b may still be in flight)."""
        lens = [len(s) for s in sequences]
        return lens, self._prepare(self._new_batch(lens), [(0, n) for n in lens], sequences, "all")

    def _send_batch(self, prepared):
        """The batch header, then its step: the workers make the batch's plans and start computing."""
        lens, step = prepared
        self._announce_batch(lens)
        return lens, self._send(step)


class _Step:
    """A step prepared on the client: its header fields, routing, and the CompNodes' inputs in rank order."""

    def __init__(self, ranges, want, tokens, routing, inputs, counts):
        self.ranges, self.want, self.tokens, self.routing = ranges, want, tokens, routing
        self.inputs, self.counts = inputs, counts  # (sum counts, ...) ids or hidden rows; counts[0] = 0 (client)
