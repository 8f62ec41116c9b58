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

    def begin_batch(self, lens) -> None:
        lens = [int(n) for n in lens]
        collectives.bcast(self.topo.world, {"op": "batch", "lens": lens})
        self.plans = batch_plans(self.spec, lens)
        if self.layers is not None:
            self.layers.reset()

    def step(self, ranges, ids_per_seq, want: str = "all"):
        """ids_per_seq[b]: token ids of positions ranges[b]. Returns the final rows (n_rows, d) in step order
        (all step tokens for "all"; one row per sequence with a non-empty range for "last")."""
        ranges = [(int(a), int(b)) for a, b in ranges]
        trace.mark("step")
        collectives.bcast(self.topo.world, {"op": "step", "ranges": ranges, "want": want})
        tokens = step_tokens(self.plans, ranges)
        routing = Routing(tokens, self.topo.alpha, self.topo.beta)
        flat_ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids_per_seq]) if len(tokens) else np.zeros(0, np.int64)
        self._send_inputs(tokens, routing, flat_ids)
        trace.mark("inputs sent")
        parts = self.transport.gather_rows(self.topo.client_comm, np.zeros((0, self.cfg.hidden), np.float32),
                                           self.cfg.hidden)
        trace.mark("rows")
        rows = np.empty((len(tokens), self.cfg.hidden), dtype=np.float32)
        for k in range(self.topo.alpha):
            rows[routing.comp_tokens[k][wanted_local_rows(tokens, routing, k, want)]] = parts[k + 1]
        if want == "all":
            return rows
        return rows[last_of_each_sequence(tokens)]

    def _send_inputs(self, tokens, routing: Routing, flat_ids: np.ndarray) -> None:
        """Each CompNode gets its positions' token ids, or with client layers their layer-K hidden rows."""
        mine = [routing.comp_tokens[k] for k in range(self.topo.alpha)]
        if self.layers is None:
            self.transport.scatter_ids(self.topo.client_comm, [np.zeros(0, np.int64)] + [flat_ids[m] for m in mine])
            return
        with self.timer("client_layers"):
            hidden = self.layers.forward(flat_ids, tokens.pos, tokens.seq)  # (n, d) step order, client's device
            # CompNode by CompNode: one gather where the rows are (the GPU), then one copy to the host
            rows = to_host(hidden[self.xp.asarray(np.concatenate(mine))])
        self.transport.scatter_rows(self.topo.client_comm, rows, [0] + [len(m) for m in mine], self.cfg.hidden)

    def end_batch(self) -> None:
        collectives.bcast(self.topo.world, {"op": "end"})
        if self.layers is not None:
            self.layers.reset()
        self.ledgers.append(collectives.gather_ledger(self.topo.world, None))

    def take_ledgers(self) -> list:
        """The ledgers of the batches finished since the last call (and forget them)."""
        out, self.ledgers = self.ledgers, []
        return out

    def stop(self) -> None:
        collectives.bcast(self.topo.world, {"op": "stop"})

    def encode(self, sequences):
        """One batch through the encoder: list of (n_b,) ids -> list of final rows (n_b, d)."""
        lens = [len(s) for s in sequences]
        self.begin_batch(lens)
        rows = self.step([(0, n) for n in lens], sequences, "all")
        self.end_batch()
        bounds = np.cumsum([0] + lens)
        return [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
