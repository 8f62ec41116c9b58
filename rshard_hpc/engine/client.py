"""Rank 0's side of the per-layer choreography: drives batches and steps with small broadcast headers (no token
content), scatters each CompNode only the ids of its own positions (with --client-layers K, their layer-K hidden
rows: the client runs the first K layers itself), gathers back only the final rows.

  {"op": "batch", "lens": [...]}        a new batch; plans are made for these total lengths
  {"op": "step", "ranges": [(a, b)...], "want": "all" | "last" | "sums", "micro": M, "last": bool}
                                         compute positions a … b-1 of each sequence; return every final row,
                                         each sequence's last, or each sequence's sum of rows (mean pooling);
                                         in up to M micro-batches when the step is large (engine/micro.py);
                                         "last": no later step of this batch (an encoder's batch: one step)
  {"op": "end"}                          the batch is done: AttnNodes drop their KV cache; every rank's
                                         visibility ledger of the batch is gathered to the client
  {"op": "stop"}                         the job is done
"""
from __future__ import annotations

import numpy as np

from rshard_hpc.dist.control import INPUTS, LEDGER, ROWS
from rshard_hpc.dist.topology import comp_world_rank
from rshard_hpc.engine import micro, trace
from rshard_hpc.engine.routing import (
    WANTS,
    Routing,
    add_sequence_sums,
    last_of_each_sequence,
    step_tokens,
    wanted_local_rows,
)
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
        self.micro = micro.requested()  # lanes a large step is cut into (RSHARD_MICRO_BATCHES; 1: none)

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
        self.topo.channel.send_to_workers({"op": "batch", "lens": lens})

    def _new_batch(self, lens):
        """The plans of a batch of these lengths; the client layers start afresh."""
        if self.layers is not None:
            self.layers.reset()
        return batch_plans(self.spec, lens)

    def step(self, ranges, ids_per_seq, want: str = "all"):
        """ids_per_seq[b]: token ids of positions ranges[b]. Returns the final rows (n_rows, d) in step order
        (all step tokens for "all"; one row per sequence with a non-empty range for "last"), or for "sums" each
        sequence's float64 sum of its rows in this step (n_seq, d)."""
        step = self._send(self._prepare(self.plans, ranges, ids_per_seq, want))
        return self._place(step, self._gather(step))

    def _prepare(self, plans, ranges, ids_per_seq, want: str, last: bool = False) -> "_Step":
        """A step's routing and inputs, made on the client alone (no MPI): what _send scatters. last: the batch has
        no later step (encode_batches: a batch is one step), which lets AttnNodes keep no KV cache rows."""
        if want not in WANTS:
            raise ValueError(f"want must be one of {WANTS}, not {want!r}")
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
                inputs = np.ascontiguousarray(to_host(hidden[self.xp.asarray(np.concatenate(mine))]), np.float32)
        return _Step(ranges, want, tokens, routing, inputs, counts, last)

    def _send(self, step: "_Step", wait: bool = True) -> "_Step":
        """The step header to every rank, then each CompNode its inputs; the workers start on it. wait=False: the
        inputs' sends are left under way (step.sending) for _inputs_sent to finish, so that the client can read
        the ledgers meanwhile (encode_batches)."""
        trace.mark("step")
        header = {"op": "step", "ranges": step.ranges, "want": step.want, "micro": self.micro, "last": step.last}
        self.topo.channel.send_to_workers(header)
        bounds = np.cumsum(step.counts)  # CompNode k's inputs: rows bounds[k] … bounds[k+1]-1 (counts[0] = 0)
        step.sending = self.topo.channel.start_arrays({comp_world_rank(k): step.inputs[bounds[k]:bounds[k + 1]]
                                                       for k in range(self.topo.alpha)}, INPUTS)
        if wait:
            self._inputs_sent(step)
        return step

    def _inputs_sent(self, step: "_Step") -> None:
        """Wait until every CompNode has the step's inputs."""
        self.topo.channel.finish(step.sending)
        step.sending = []
        trace.mark("inputs sent")

    def _gather(self, step: "_Step") -> list:
        """The step's final rows as the CompNodes sent them: [None, CompNode 0's rows, …]."""
        width = self.cfg.hidden * (2 if step.want == "sums" else 1)  # sums: float64 as two float32 halves
        channel = self.topo.channel
        parts = [None] + [channel.recv_array(comp_world_rank(k), ROWS, np.float32).reshape(-1, width)
                          for k in range(self.topo.alpha)]
        trace.mark("rows")
        return parts

    def _place(self, step: "_Step", parts: list):
        """The gathered rows in step order (see step), or for "sums" (n_seq, d) float64 sums of each sequence's rows:
        no MPI, so it may wait until the workers have more work."""
        tokens, routing = step.tokens, step.routing
        if step.want == "sums":
            sums = np.zeros((len(step.ranges), self.cfg.hidden), dtype=np.float64)
            for k in range(self.topo.alpha):
                add_sequence_sums(sums, tokens.seq[routing.comp_tokens[k]], parts[k + 1])
            return sums
        rows = np.empty((len(tokens), self.cfg.hidden), dtype=np.float32)
        for k in range(self.topo.alpha):
            rows[routing.comp_tokens[k][wanted_local_rows(tokens, routing, k, step.want)]] = parts[k + 1]
        if step.want == "all":
            return rows
        return rows[last_of_each_sequence(tokens)]

    def end_batch(self) -> None:
        self._send_end()
        self._collect_ledgers()

    def _send_end(self) -> None:
        """The end header: AttnNodes drop the batch's KV cache, every worker sends its ledger (_collect_ledgers)."""
        self.topo.channel.send_to_workers({"op": "end"})
        trace.mark("end sent")
        if self.layers is not None:
            self.layers.reset()

    def _collect_ledgers(self) -> None:
        """The ended batch's visibility ledgers, by world rank (None for the client), to self.ledgers."""
        channel = self.topo.channel
        self.ledgers.append([None] + [channel.recv_object(rank, LEDGER) for rank in channel.workers()])
        trace.mark("ledgers")

    def take_ledgers(self) -> list:
        """The ledgers of the batches finished since the last call (and forget them)."""
        out, self.ledgers = self.ledgers, []
        return out

    def stop(self) -> None:
        self.topo.channel.send_to_workers({"op": "stop"})
        self.topo.channel.flush()

    def encode(self, sequences, want: str = "all"):
        """One batch through the encoder: list of (n_b,) ids -> list of final rows (n_b, d) (want "sums": (B, d)
        float64, each sequence's sum of final rows)."""
        return next(self.encode_batches([sequences], want))

    def encode_batches(self, batches, want: str = "all"):
        """Each batch (a list of (n_b,) id arrays) through the encoder, in order: yields its rows per sequence, or
        with want="sums" a (B, d) float64 array of each sequence's sum of rows (what mean pooling needs: the
        CompNodes send a row a sequence instead of a row a token).

        Pipelined: batch b+1's inputs (with client layers, its first K layers) are prepared while the workers run
        batch b, and sent before batch b is yielded, so the caller's work on batch b's rows (pooling, writing)
        overlaps the workers' on batch b+1; so does putting batch b's rows in step order. A batch's ledger is
        gathered before it is yielded (take_ledgers), while batch b+1's inputs move: a ledger too large to go at once
        moves only while its worker calls MPI, which it does reading its next headers, not while it computes."""
        batches = list(batches)
        in_flight = self._send_batch(self._prepare_batch(batches[0], want), wait=True) if batches else None
        for b in range(len(batches)):
            upcoming = self._prepare_batch(batches[b + 1], want) if b + 1 < len(batches) else None
            lens, step = in_flight
            parts = self._gather(step)
            self._send_end()
            if upcoming is not None:  # sent before the ledgers are read: the workers need not wait for the client
                in_flight = self._send_batch(upcoming, wait=False)
            self._collect_ledgers()  # while the inputs move: a worker's ledger moves as it reads its next headers
            if upcoming is not None:
                self._inputs_sent(in_flight[1])  # before the client leaves MPI to write (a large send needs it)
            rows = self._place(step, parts)  # in step order, while the workers run batch b+1 (~5 ms at 8k tokens)
            trace.mark("rows placed")
            if want == "sums":
                yield rows
                continue
            bounds = np.cumsum([0] + lens)
            yield [rows[a:z] for a, z in zip(bounds[:-1], bounds[1:])]

    def _prepare_batch(self, sequences, want: str):
        """(lens, the batch's one step prepared, on plans of its own: batch b may still be in flight)."""
        lens = [len(s) for s in sequences]
        prepared = lens, self._prepare(self._new_batch(lens), [(0, n) for n in lens], sequences, want, last=True)
        trace.mark("batch prepared")  # not "prepared": a start-up mark of that name (run/job.py, trace_report)
        return prepared

    def _send_batch(self, prepared, wait: bool):
        """The batch header, then its step: the workers make the batch's plans and start computing (wait: as
        _send's)."""
        lens, step = prepared
        self._announce_batch(lens)
        return lens, self._send(step, wait)


class _Step:
    """A step prepared on the client: its header fields, routing, and the CompNodes' inputs in rank order."""

    def __init__(self, ranges, want, tokens, routing, inputs, counts, last: bool = False):
        self.ranges, self.want, self.tokens, self.routing = ranges, want, tokens, routing
        self.last = last  # the batch's last step
        self.inputs, self.counts = inputs, counts  # (sum counts, ...) ids or hidden rows; counts[0] = 0 (client)
        self.sending = []  # the inputs' sends under way (Client._send with wait=False)
