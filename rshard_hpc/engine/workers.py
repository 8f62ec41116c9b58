"""The CompNode and AttnNode loops (architecture.md §1-§3): per-token passes on a CompNode's own positions,
partial attention on an AttnNode's (query group, key group) pair, two Alltoallv exchanges a layer.
"""
from __future__ import annotations

import numpy as np

from rshard_hpc.dist import collectives
from rshard_hpc.engine.routing import Routing, StepTokens, step_tokens, wanted_local_rows
from rshard_hpc.engine.stats import PhaseTimer
from rshard_hpc.ops.attention import merge_partials, prepare_attention
from rshard_hpc.ops.precision import pack_partial, partial_slots, to_bf16_bits, unpack_partial, wire_dtype
from rshard_hpc.plan.ledger import LedgerRecorder, step_key_counts
from rshard_hpc.plan.schemes import PlanSpec, batch_plans


class _Worker:
    """State shared by CompNode and AttnNode loops."""

    def __init__(self, topo, spec: PlanSpec, cfg, transport, xp=np, dtype="float32"):
        self.topo, self.spec, self.cfg, self.transport, self.xp = topo, spec, cfg, transport, xp
        self.wire = wire_dtype(dtype)  # element type of q/k/v and partials on the wire: float32 or bf16 bits
        self.slots = partial_slots(cfg.head_dim, self.wire)  # wire elements per (row, head) of a partial
        self.timer = PhaseTimer(xp)
        self.plans = []
        self.ledger = LedgerRecorder()  # what this rank received (architecture.md §4)

    def serve(self) -> None:
        while True:
            header = collectives.bcast(self.topo.world, None)
            op = header["op"]
            if op == "stop":
                return
            if op == "batch":
                self.plans = batch_plans(self.spec, header["lens"])
                self.begin_batch()
            elif op == "step":
                tokens = step_tokens(self.plans, header["ranges"])
                self.step(tokens, Routing(tokens, self.topo.alpha, self.topo.beta), header["want"])
            elif op == "end":
                self.end_batch()
                # the batch's visibility ledger goes to the client (architecture.md §4); token content never does
                collectives.gather_ledger(self.topo.world, {"node": self.topo.node.name, "records": self.ledger.compact()})
                self.ledger = LedgerRecorder()

    def begin_batch(self):
        pass

    def end_batch(self):
        pass

    def record(self, form: str, tokens: StepTokens, idx: np.ndarray) -> None:
        self.ledger.add(form, tokens.seq[idx], tokens.pos[idx])


class CompWorker(_Worker):
    """A CompNode: per-token work on its own positions."""

    def __init__(self, topo, spec, model, transport, xp=np, dtype="float32"):
        super().__init__(topo, spec, model.cfg, transport, xp, dtype)
        if model.dtype != dtype:
            raise ValueError(f"the model's weights were placed for {model.dtype}, the worker runs {dtype}")
        self.model = model

    def step(self, tokens: StepTokens, routing: Routing, want: str) -> None:
        k, xp, cfg = self.topo.comp_index, self.xp, self.cfg
        mine = routing.comp_tokens[k]
        ids = self.transport.scatter_ids(self.topo.client_comm, None)
        self.record("token_id", tokens, mine)
        pos = xp.asarray(tokens.pos[mine])
        rows_of_group = [xp.asarray(ix) for ix in routing.by_group[k]]  # on the device once a step, not a layer
        back_counts = self._back_counts(routing)
        with self.timer("prepass"):
            h = self.model.embed(xp.asarray(ids), pos)  # (n_k, d)
        for layer in range(cfg.n_layers):
            with self.timer("prepass"):
                q, key, val = self.model.pre(layer, h, pos)
                send, counts = self._pack_qkv(rows_of_group, q, key, val)
            self.transport.alltoallv(self.topo.work_comm, send, counts, np.zeros_like(counts))  # q/k/v out
            o_parts, lse_parts = self._exchange_back(routing, rows_of_group, back_counts, len(mine))
            with self.timer("postpass"):
                o, _ = merge_partials(o_parts, lse_parts)  # (n_k, H, D)
                h = self.model.post(layer, h, o)
        self.record_partials(tokens, mine)
        rows = self.model.final_rows(h)[xp.asarray(wanted_local_rows(tokens, routing, k, want))]
        self.transport.gather_rows(self.topo.client_comm, rows, cfg.hidden)

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

    def _pack_qkv(self, rows_of_group, q, key, val):
        """Flat send buffer (wire dtype): for AttnNode (i, j) in work order, q of group i then k, v of group j.
        rows_of_group[g]: (device) indices of my rows in group g."""
        xp, topo, beta = self.xp, self.topo, self.topo.beta
        q, key, val = (self._to_wire(a) for a in (q, key, val))
        pieces = []
        counts = np.zeros(topo.work_comm.Get_size(), dtype=np.int64)
        for i in range(beta):
            for j in range(beta):
                part = [q[rows_of_group[i]].ravel(), key[rows_of_group[j]].ravel(), val[rows_of_group[j]].ravel()]
                pieces += part
                counts[topo.attn_work_rank(i, j)] = sum(int(p.size) for p in part)
        send = xp.concatenate(pieces) if pieces else xp.zeros(0, self.wire)
        return send, counts

    def _to_wire(self, x):
        """(n, heads, D) float -> the wire's element type (bf16 bits are rounded to nearest even once here)."""
        if self.wire == np.uint16:
            return to_bf16_bits(x)
        return x.astype(self.xp.float32, copy=False)

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

    def _exchange_back(self, routing: Routing, rows_of_group, recv_counts, n_local: int):
        """Receive (o, lse) partials from every AttnNode of each of my tokens' rows; (β, n, H, D), (β, n, H)
        float32 (bf16 o widened exactly)."""
        xp, topo, cfg, beta = self.xp, self.topo, self.cfg, self.topo.beta
        k = topo.comp_index
        slots = self.slots
        width = cfg.n_heads * slots
        recv = self.transport.alltoallv(topo.work_comm, xp.zeros(0, self.wire),
                                        np.zeros_like(recv_counts), recv_counts)
        with self.timer("postpass"):
            packed = xp.zeros((beta, n_local, cfg.n_heads, slots), dtype=self.wire)
            offset = 0
            for i in range(beta):
                n_rows = int(routing.counts[k, i])
                for j in range(beta):
                    seg = recv[offset:offset + n_rows * width]
                    packed[j, rows_of_group[i]] = seg.reshape(n_rows, cfg.n_heads, slots)
                    offset += n_rows * width
            return unpack_partial(packed, self.wire)  # (β, n, H, D), (β, n, H) float32


class AttnWorker(_Worker):
    """AttnNode (i, j): queries of group i against keys/values of group j (kept as the KV cache)."""

    def __init__(self, topo, spec, cfg, transport, xp=np, dtype="float32"):
        super().__init__(topo, spec, cfg, transport, xp, dtype)  # q/k/v stay in the KV cache in the wire's type
        self.cache = {}  # layer -> (k (n, Hkv, D), v, pos (n,), seq (n,))

    def begin_batch(self):
        self.cache = {}

    def end_batch(self):
        self.cache = {}

    def step(self, tokens: StepTokens, routing: Routing, want: str) -> None:
        xp, cfg, topo = self.xp, self.cfg, self.topo
        i, j = topo.attn_coords
        q_tok, kv_tok = routing.attn_q_tokens(i), routing.attn_kv_tokens(j)
        self.record("q", tokens, q_tok)
        self.record("k", tokens, kv_tok)
        self.record("v", tokens, kv_tok)
        q_pos, q_seq = xp.asarray(tokens.pos[q_tok]), xp.asarray(tokens.seq[q_tok])
        qw = cfg.n_heads * cfg.head_dim
        kvw = cfg.n_kv_heads * cfg.head_dim
        n_work = topo.work_comm.Get_size()
        recv_counts = np.zeros(n_work, dtype=np.int64)
        for k in range(topo.alpha):
            recv_counts[topo.comp_work_rank(k)] = routing.counts[k, i] * qw + 2 * routing.counts[k, j] * kvw
        back_counts = np.zeros(n_work, dtype=np.int64)
        width = cfg.n_heads * self.slots
        for k in range(topo.alpha):
            back_counts[topo.comp_work_rank(k)] = routing.counts[k, i] * width
        scale = 1.0 / np.sqrt(cfg.head_dim)
        plan = None  # every layer of a step has the same query and key positions: one preparation a step
        for layer in range(cfg.n_layers):
            recv = self.transport.alltoallv(topo.work_comm, xp.zeros(0, self.wire),
                                            np.zeros(n_work, dtype=np.int64), recv_counts)
            with self.timer("attention"):
                q, key, val = self._unpack(routing, recv, i, j)
                k_all, v_all, k_pos, k_seq = self._append_cache(layer, key, val, tokens, kv_tok)
                if plan is None:
                    plan = prepare_attention(q_pos, q_seq, k_pos, k_seq, causal=cfg.causal, scale=scale, xp=xp)
                o, lse = plan(q, k_all, v_all)
                send = pack_partial(o, lse, self.wire).ravel()  # (nq, H, partial_slots) per row
            self.transport.alltoallv(topo.work_comm, send, back_counts, np.zeros(n_work, dtype=np.int64))

    def _unpack(self, routing: Routing, recv, i: int, j: int):
        """Split the receive buffer into q (nq, H, D), k, v (nkv, Hkv, D), stacked over CompNodes."""
        xp, cfg = self.xp, self.cfg
        qs, ks, vs = [], [], []
        offset = 0
        for k in range(self.topo.alpha):
            nq, nkv = int(routing.counts[k, i]), int(routing.counts[k, j])
            for n_rows, heads, out in ((nq, cfg.n_heads, qs), (nkv, cfg.n_kv_heads, ks), (nkv, cfg.n_kv_heads, vs)):
                size = n_rows * heads * cfg.head_dim
                out.append(recv[offset:offset + size].reshape(n_rows, heads, cfg.head_dim))
                offset += size
        return xp.concatenate(qs), xp.concatenate(ks), xp.concatenate(vs)

    def _append_cache(self, layer, key, val, tokens, kv_tok):
        xp = self.xp
        pos, seq = xp.asarray(tokens.pos[kv_tok]), xp.asarray(tokens.seq[kv_tok])
        if layer in self.cache:
            k0, v0, p0, s0 = self.cache[layer]
            key, val = xp.concatenate([k0, key]), xp.concatenate([v0, val])
            pos, seq = xp.concatenate([p0, pos]), xp.concatenate([s0, seq])
        self.cache[layer] = (key, val, pos, seq)
        return key, val, pos, seq
