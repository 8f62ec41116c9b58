"""The workers' loop and the CompNode (architecture.md §1-§3): the serving loop every worker runs (headers, steps,
ledgers), and a CompNode's per-token passes on its own positions with its two Alltoallv exchanges a layer. The
AttnNode is engine/attn_worker.py.
"""
from __future__ import annotations

import numpy as np

from rshard_hpc.dist.control import CLIENT, INPUTS, LEDGER, ROWS
from rshard_hpc.engine.routing import Routing, StepTokens, sequence_sums, step_tokens, wanted_local_rows
from rshard_hpc.engine import micro, step_graphs, trace
from rshard_hpc.engine.stats import PhaseTimer, event_clock
from rshard_hpc.models.client_layers import comp_input_form
from rshard_hpc.ops.arrays import to_host
from rshard_hpc.ops.precision import partial_slots, wire_dtype
from rshard_hpc.ops.wire import WireRoutes
from rshard_hpc.plan.ledger import LedgerRecorder, step_key_counts
from rshard_hpc.plan.schemes import PlanSpec, batch_plans
from rshard_hpc.run import profiling, termination

WARM_UP_ROWS = 64  # rows of zeros a GPU rank (worker or client) runs once at set-up (warm_up)


class _Worker:
    """State shared by CompNode and AttnNode loops."""

    def __init__(self, topo, spec: PlanSpec, cfg, transport, xp=np, dtype="float32", first_layer: int = 0):
        self.topo, self.spec, self.cfg, self.transport, self.xp = topo, spec, cfg, transport, xp
        self.first_layer = first_layer  # --client-layers K: the client ran layers 0 … K-1, the servers start at K
        self.wire = wire_dtype(dtype)  # element type of q/k/v and partials on the wire: float32 or bf16 bits
        self.slots = partial_slots(cfg.head_dim, self.wire)  # wire elements per (row, head) of a partial
        self.timer = PhaseTimer(xp)
        if xp is not np:
            trace.use_device_clock(*event_clock(xp))  # RSHARD_TRACE_DEVICE=1: marks timed on the GPU too
        self.plans = []
        self.ledger = LedgerRecorder()  # what this rank received (architecture.md §4)
        self.steps_in_lanes = 0  # steps run cut into micro-batches (engine/micro.py)

    def serve(self) -> None:
        trace.mark("role " + self.topo.describe())
        while True:
            header = self.topo.channel.header()
            termination.hold_if_stopping()  # after this rank's SIGTERM: no further step, the job ends
            op = header["op"]
            if op == "stop":
                self.topo.channel.flush()
                return
            if op == "batch":
                trace.mark("batch")
                self.plans = batch_plans(self.spec, header["lens"])
                trace.mark("plans")
                self.begin_batch()
                trace.mark("begun")
            elif op == "step":
                trace.mark("step")
                tokens = step_tokens(self.plans, header["ranges"])
                routing = Routing(tokens, self.topo.alpha, self.topo.beta)
                self.transport.begin_step(len(tokens), self.send_bytes(routing), self.cfg.causal)
                lanes = micro.lane_ranges(tokens.seq, header.get("micro", 1), self.cfg.causal)
                self.steps_in_lanes += len(lanes) > 1
                with profiling.step_scope(len(tokens)):
                    self.step(tokens, routing, header["want"], lanes, last=header.get("last", False))
                self.transport.end_step()
                trace.settle()
            elif op == "end":
                trace.mark("end")
                self.end_batch()
                # the batch's visibility ledger goes to the client (architecture.md §4); token content never does
                records = self.ledger.compact()
                trace.mark("ledger")
                self.topo.channel.send_object({"node": self.topo.node.name, "records": records}, CLIENT, LEDGER)
                trace.mark("ledger sent")
                self.ledger = LedgerRecorder()

    def send_bytes(self, routing: Routing) -> int:
        """The most bytes I send in one exchange of a step with this routing (its lanes send less)."""
        raise NotImplementedError

    def begin_batch(self):
        pass

    def end_batch(self):
        pass

    def record(self, form: str, tokens: StepTokens, idx: np.ndarray) -> None:
        self.ledger.add(form, tokens.seq[idx], tokens.pos[idx])


class CompWorker(_Worker):
    """A CompNode: per-token work on its own positions."""

    def __init__(self, topo, spec, model, transport, xp=np, dtype="float32", first_layer: int = 0):
        super().__init__(topo, spec, model.cfg, transport, xp, dtype, first_layer)
        if model.dtype != dtype:
            raise ValueError(f"the model's weights were placed for {model.dtype}, the worker runs {dtype}")
        self.model = model
        self._graphs = {}  # rows a step -> StepGraphs (GPU steps of a few rows)

    def send_bytes(self, routing: Routing) -> int:
        """Each of my rows goes to β AttnNodes as q (its query group's row) and to β as k and v (its key
        group's column)."""
        cfg = self.cfg
        rows = len(routing.comp_tokens[self.topo.comp_index])
        width = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        return self.topo.beta * rows * width * np.dtype(self.wire).itemsize

    def warm_up(self, rows: int = WARM_UP_ROWS) -> None:
        """Layer first_layer's per-token work once on `rows` rows of zeros and once on one row (a decode step's
        size, which may take other kernels: ops/small_rows_cuda.py), nothing sent, the results dropped: a GPU loads
        the kernels a step uses (CuPy's and kernels/*.cu, ~0.1 s the first time) at set-up, beside the other ranks'
        set-up, rather than inside the first step. A kernel that fails here fails the set-up on every rank."""
        for n in (rows, 1):
            self._warm_layer(n)

    def _warm_layer(self, rows: int) -> None:
        xp, cfg = self.xp, self.cfg
        pos = xp.arange(rows, dtype=xp.int32)
        if self.first_layer:
            h = xp.zeros((rows, cfg.hidden), dtype=xp.float32)  # as the control channel delivers the client's rows
        else:
            h = self.model.embed(xp.zeros(rows, dtype=xp.int64), pos)
        none = np.zeros(0, dtype=np.int64)
        routes = WireRoutes([np.arange(rows)] + [none] * (self.topo.beta - 1), rows, cfg.n_heads, cfg.n_kv_heads,
                            cfg.head_dim, self.wire, xp)  # every row in query group 0
        routes.pack(*self.model.pre(self.first_layer, h, pos))
        o = routes.merge(xp.zeros(self.topo.beta * rows * cfg.n_heads * self.slots, dtype=self.wire))
        self.model.final_rows(self.model.post(self.first_layer, h, o))

    def step(self, tokens: StepTokens, routing: Routing, want: str, lanes=None, last: bool = False) -> None:
        """One step: my rows through every server layer, then the wanted final rows to the client. lanes: the step's
        micro-batches (engine/micro.py lane_ranges); one lane, or None, runs the step whole. last (the batch's last
        step) matters to AttnNodes only."""
        k, xp = self.topo.comp_index, self.xp
        mine = routing.comp_tokens[k]
        pos = xp.asarray(tokens.pos[mine])
        h = self._receive_input(tokens, mine, pos)  # (n_k, d)
        if lanes is not None and len(lanes) > 1:
            h = self._layers_in_lanes(tokens, mine, h, pos, lanes)
        else:
            h = self._layers(routing, h, pos)
        self.record_partials(tokens, mine)
        final = self.model.final_rows(h)
        if want == "sums":  # each sequence's sum over my rows (mean pooling): a row a sequence, not a row a token
            rows = sequence_sums(final, tokens.seq[mine])  # (m, 2 d)
        else:
            rows = final[xp.asarray(wanted_local_rows(tokens, routing, k, want))]  # (n_wanted, d)
        trace.mark("rows")
        self.topo.channel.send_arrays({CLIENT: np.ascontiguousarray(to_host(rows), dtype=np.float32)}, ROWS)
        trace.mark("step end")

    def _layers(self, routing: Routing, h, pos):
        """h (n_k, d) through every server layer, the step whole: two exchanges a layer. Returns the last h."""
        k, cfg = self.topo.comp_index, self.cfg
        # the wire's index arrays, on the device once a step, not a layer
        routes = WireRoutes(routing.by_group[k], h.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, self.wire,
                            self.xp)
        send_counts, back_counts = self._send_counts(routes), self._back_counts(routing)
        graphs = self._step_graphs(h, routes, int(back_counts.sum()))  # small GPU steps: a launch a pass
        if graphs is not None:
            graphs.begin_step(h, pos, routes)
        for layer in range(self.first_layer, cfg.n_layers):
            trace.mark("layer")
            with self.timer("prepass"):
                if graphs is not None:
                    send = graphs.pre(layer, first=layer == self.first_layer)
                else:
                    q, key, val = self.model.pre(layer, h, pos)
                    send = routes.pack(q, key, val)  # one gather (one launch on a GPU), in the wire's type
            trace.mark("pre")
            self.transport.alltoallv(self.topo.work_comm, send, send_counts, np.zeros_like(send_counts))  # q/k/v out
            recv = self._receive_partials(back_counts, None if graphs is None else graphs.recv)
            with self.timer("postpass"):
                if graphs is not None:
                    h = graphs.post(layer)
                else:
                    o = routes.merge(recv)  # (n_k, H, D): unpack and merge, one launch on a GPU
                    h = self.model.post(layer, h, o)
            trace.mark("post")
        return h

    def _layers_in_lanes(self, tokens: StepTokens, mine: np.ndarray, h, pos, lanes: list):
        """h (n_k, d) through every server layer in micro-batches (engine/micro.py): lane by lane in the exchanges'
        schedule, so that the AttnNodes attend one lane while I compute another's passes. Returns the last h."""
        lanes = [self._lane(tokens, mine, h, pos, a, b) for a, b in lanes]
        no_counts = np.zeros(self.topo.work_comm.Get_size(), dtype=np.int64)
        for kind, m, layer in micro.schedule(len(lanes), range(self.first_layer, self.cfg.n_layers)):
            lane = lanes[m]
            if kind == "out":
                trace.mark("layer")
                with self.timer("prepass"):
                    send = lane.routes.pack(*self.model.pre(layer, lane.h, lane.pos))
                trace.mark("pre")
                self.transport.alltoallv(self.topo.work_comm, send, lane.send_counts, no_counts)
            else:
                recv = self._receive_partials(lane.back_counts)
                with self.timer("postpass"):
                    lane.h = self.model.post(layer, lane.h, lane.routes.merge(recv))
                trace.mark("post")
        return self.xp.concatenate([lane.h for lane in lanes])  # lanes are consecutive ranges of my rows

    def _lane(self, tokens: StepTokens, mine: np.ndarray, h, pos, a: int, b: int) -> "_CompLane":
        """Tokens a … b-1 of the step as a lane: my rows of it (a contiguous range: `mine` ascends), its wire."""
        k, cfg = self.topo.comp_index, self.cfg
        routing = Routing(tokens.subset(a, b), self.topo.alpha, self.topo.beta)
        lo, hi = (int(x) for x in np.searchsorted(mine, [a, b]))
        if hi - lo != len(routing.comp_tokens[k]):
            raise RuntimeError(f"lane {a} … {b}: {hi - lo} of my rows, its routing {len(routing.comp_tokens[k])}")
        routes = WireRoutes(routing.by_group[k], hi - lo, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, self.wire,
                            self.xp)
        return _CompLane(h[lo:hi], pos[lo:hi], routes, self._send_counts(routes), self._back_counts(routing))

    def _receive_input(self, tokens: StepTokens, mine: np.ndarray, pos):
        """My positions' token ids, embedded; or, with client layers (first_layer K > 0), their layer-K hidden rows
        as the client computed them. Recorded in the ledger as received: "token_id" or "hidden@K"."""
        self.record(comp_input_form(self.first_layer), tokens, mine)
        sent = self.topo.channel.recv_array(CLIENT, INPUTS, np.float32 if self.first_layer else np.int64)
        if self.first_layer:
            return self.xp.asarray(sent.reshape(-1, self.cfg.hidden))
        with self.timer("prepass"):
            return self.model.embed(self.xp.asarray(sent), pos)  # sent: (n_k,) token ids

    def record_partials(self, tokens: StepTokens, mine: np.ndarray) -> None:
        """Ledger: for each of my queries, the key count of the partial from each AttnNode of its row (every
        layer alike), from the plan: keys of group j computed so far, pos_k <= p when causal."""
        upto = np.zeros(len(self.plans), dtype=np.int64)  # sequence s: the AttnNodes hold keys 0 … upto[s]-1
        np.maximum.at(upto, tokens.seq, tokens.pos.astype(np.int64) + 1)
        plan_len = np.array([len(group) for _, group in self.plans], dtype=np.int64)
        groups = {len(group): group for _, group in self.plans}  # one plan a length (batch_plans)
        seq, pos = tokens.seq[mine], tokens.pos[mine]
        counts = step_key_counts(groups, plan_len, seq, pos.astype(np.int64), upto, self.topo.beta, self.cfg.causal)
        self.ledger.add_partials(seq, pos, counts)

    def _send_counts(self, routes: WireRoutes) -> np.ndarray:
        """Elements I send each AttnNode (i, j): q of my rows of group i, k and v of my rows of group j."""
        counts = np.zeros(self.topo.work_comm.Get_size(), dtype=np.int64)
        for i in range(self.topo.beta):
            for j in range(self.topo.beta):
                counts[self.topo.attn_work_rank(i, j)] = routes.send_sizes[i][j]
        return counts

    def _back_counts(self, routing: Routing) -> np.ndarray:
        """Elements each AttnNode (i, j) returns to me: an (o, lse) row per query of mine in group i."""
        topo, cfg = self.topo, self.cfg
        k = topo.comp_index
        width = cfg.n_heads * self.slots
        counts = np.zeros(topo.work_comm.Get_size(), dtype=np.int64)
        for i in range(topo.beta):
            for j in range(topo.beta):
                counts[topo.attn_work_rank(i, j)] = routing.counts[k, i] * width
        return counts

    def _receive_partials(self, recv_counts, out=None):
        """The flat receive buffer of (o, lse) partials from every AttnNode of each of my tokens' rows
        (ops/wire.py says its layout); into `out` when given."""
        return self.transport.alltoallv(self.topo.work_comm, self.xp.zeros(0, self.wire),
                                        np.zeros_like(recv_counts), recv_counts, out=out)

    def _step_graphs(self, h, routes: WireRoutes, n_recv: int):
        """The CUDA graphs for a step of these rows (engine/step_graphs.py), or None: a GPU step whose passes a
        graph may capture (the model says: Llama's few-row kernels), graphs on. One set per row count, kept for
        the job (the weights and the layout do not change)."""
        graph_safe = getattr(self.model, "graph_safe", None)
        if self.xp is np or not step_graphs.ENABLED or graph_safe is None or not graph_safe(h):
            return None
        graphs = self._graphs.get(routes.n)
        if graphs is None:
            graphs = self._graphs[routes.n] = step_graphs.StepGraphs(self.model, routes, n_recv)
        return graphs


class _CompLane:
    """A CompNode's lane of a step (engine/micro.py): h (n_m, d) its rows' residual stream, pos (n_m,), the wire."""

    def __init__(self, h, pos, routes: WireRoutes, send_counts: np.ndarray, back_counts: np.ndarray):
        self.h, self.pos, self.routes = h, pos, routes
        self.send_counts, self.back_counts = send_counts, back_counts
