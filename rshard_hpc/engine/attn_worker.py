"""The AttnNode (architecture.md §1-§3): partial attention of its (query group, key group) pair over a layer's
q/k/v from every CompNode, its KV cache, the partials sent back; the serving loop is engine/workers._Worker's.
"""
from __future__ import annotations

import numpy as np

from rshard_hpc.engine.kv_cache import KVCache, key_capacity
from rshard_hpc.engine.routing import Routing, StepTokens
from rshard_hpc.engine import micro, trace
from rshard_hpc.engine.workers import WARM_UP_ROWS, _Worker
from rshard_hpc.ops.attention import RowSource, prepare_attention
from rshard_hpc.ops.precision import pack_partial
from rshard_hpc.ops.wire import recv_row_offsets


class AttnWorker(_Worker):
    """AttnNode (i, j): queries of group i against keys/values of group j (kept as the KV cache)."""

    def __init__(self, topo, spec, cfg, transport, xp=np, dtype="float32", first_layer: int = 0):
        super().__init__(topo, spec, cfg, transport, xp, dtype, first_layer)  # q/k/v stay cached in the wire's type
        self.cache = None  # KVCache of the batch under way, sized at its start (engine/kv_cache.py)

    def warm_up(self, rows: int = WARM_UP_ROWS) -> None:
        """One step's attention preparation and one layer's attention on `rows` rows of zeros (one sequence, as if
        from CompNode 0), by the path a step of that size takes, the results dropped: CompWorker.warm_up says why."""
        xp, cfg = self.xp, self.cfg
        self.cache = KVCache(xp, 1, rows, cfg.n_kv_heads, cfg.head_dim, self.wire)
        counts = np.zeros(self.topo.alpha, dtype=np.int64)
        counts[0] = rows
        pos, seq = np.arange(rows, dtype=np.int32), np.zeros(rows, dtype=np.int32)
        k_pos, k_seq = self.cache.begin_step(pos, seq)
        attend = self._layer_function(counts, counts, pos, seq, k_pos, k_seq, small=False)
        attend(xp.zeros(rows * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, dtype=self.wire), 0)
        self.cache = None

    def send_bytes(self, routing: Routing) -> int:
        """What I send back in a layer: the partials of every CompNode's queries of my row group (_counts)."""
        return int(self._counts(routing)[1].sum()) * np.dtype(self.wire).itemsize

    def begin_batch(self):
        cfg = self.cfg
        capacity = key_capacity(self.plans, self.topo.attn_coords[1])
        layers = cfg.n_layers - self.first_layer  # the layers this AttnNode runs
        self.cache = KVCache(self.xp, layers, capacity, cfg.n_kv_heads, cfg.head_dim, self.wire)

    def end_batch(self):
        self.cache = None

    def step(self, tokens: StepTokens, routing: Routing, want: str, lanes=None, last: bool = False) -> None:
        """One step: each layer, the queries of my row against the keys of my column (CompWorker.step: lanes; last:
        no later step of the batch reads this step's keys)."""
        i, j = self.topo.attn_coords
        q_tok, kv_tok = routing.attn_q_tokens(i), routing.attn_kv_tokens(j)
        self.record("q", tokens, q_tok)
        self.record("k", tokens, kv_tok)
        self.record("v", tokens, kv_tok)
        parts = [(tokens, routing, q_tok, kv_tok)]  # the step whole: one lane
        if lanes is not None and len(lanes) > 1:  # micro-batches: no lane skips the cache (later lanes read it)
            parts, last = [self._lane_part(tokens.subset(a, b)) for a, b in lanes], False
        self._attend(self._lanes(parts, last))
        self.cache.end_step()
        trace.mark("step end")

    def _lane_part(self, sub: StepTokens) -> tuple:
        """(tokens, routing, my q tokens, my k/v tokens) of a lane's tokens."""
        i, j = self.topo.attn_coords
        routing = Routing(sub, self.topo.alpha, self.topo.beta)
        return sub, routing, routing.attn_q_tokens(i), routing.attn_kv_tokens(j)

    def _attend(self, lanes: list) -> None:
        """Every layer of the step, lane by lane in micro.schedule's order of exchanges (one lane: receive, attend,
        send back, a layer at a time). A lane received is attended at once when the CompNodes compute before the
        next exchange (they then run passes while I attend), else when its partials are due."""
        xp, topo = self.xp, self.topo
        no_counts = np.zeros(topo.work_comm.Get_size(), dtype=np.int64)
        received, ready = {}, {}  # lane -> (recv, layer) not attended yet; lane -> send buffer
        events = micro.schedule(len(lanes), range(self.first_layer, self.cfg.n_layers))
        for at, (kind, m, layer) in enumerate(events):
            lane = lanes[m]
            if kind == "out":
                trace.mark("layer")
                received[m] = (self.transport.alltoallv(topo.work_comm, xp.zeros(0, self.wire), no_counts,
                                                        lane.recv_counts), layer)
            else:
                if m not in ready:
                    ready[m] = self._attend_lane(lanes, received.pop(m), m)
                self.transport.alltoallv(topo.work_comm, ready.pop(m), lane.back_counts, no_counts)
            if at + 1 < len(events) and events[at + 1][0] == "out":  # the CompNodes compute before it
                for waiting in list(received):
                    ready[waiting] = self._attend_lane(lanes, received.pop(waiting), waiting)

    def _attend_lane(self, lanes: list, received, m: int):
        recv, layer = received
        with self.timer("attention"):
            send = lanes[m].attend(recv, layer - self.first_layer)  # the cache holds the layers this AttnNode runs
        trace.mark("attention")
        return send

    def _lanes(self, parts: list, last: bool) -> list:
        """Each lane's counts and layer function (made once a step: every layer has the same positions); the step's
        new keys reserved in the cache lane by lane, each lane attending the rows up to its own last (engine/micro.py
        says why that suffices). parts: _lane_part of each lane; last: see _layer_function."""
        i, j = self.topo.attn_coords
        k_pos, k_seq = self.cache.begin_step(np.concatenate([sub.pos[kv] for sub, _, _, kv in parts]),
                                             np.concatenate([sub.seq[kv] for sub, _, _, kv in parts]))
        lanes, start = [], 0
        for sub, routing, q_tok, kv_tok in parts:
            window = self.cache.lane(start, len(kv_tok))
            start += len(kv_tok)
            end = window.filled + window.new
            attend = self._layer_function(routing.counts[:, i], routing.counts[:, j], sub.pos[q_tok], sub.seq[q_tok],
                                          k_pos[:end], k_seq[:end], small=self.transport.small_step, cache=window,
                                          last=last)
            lanes.append(_AttnLane(*self._counts(routing), attend))
        trace.mark("attn prepared")
        return lanes

    def _layer_function(self, nq, nkv, q_pos, q_seq, k_pos, k_seq, small: bool, cache=None, last: bool = False):
        """attend(recv, slot) -> the flat send buffer of packed partials (nq_total, H, partial_slots) for one layer
        of this step, made once a step. nq[k], nkv[k]: the q and k/v rows CompNode k sends me (the receive buffer's
        layout); q_pos, q_seq: host ints of the queries; k_pos, k_seq: every cached key row's, from begin_step.
        On a GPU: a small step (the transport says: decode) takes the fused kernels of ops/decode_cuda.py (two
        launches a layer), a larger one the general plan with PlanLayers' unpack and pack (a launch each); on NumPy
        or where those are off, the general plan with the array code's unpack and pack. cache: where the step's new
        rows go and what is attended (a lane's window: KVCache.lane); the batch's cache by default. last: the
        batch's last step (no later step reads its keys): on NumPy, float32, a first step attends straight from
        the receive buffer and writes no cache rows."""
        xp, cfg = self.xp, self.cfg
        cache = self.cache if cache is None else cache
        scale = 1.0 / np.sqrt(cfg.head_dim)
        q_pos_d, q_seq_d = xp.asarray(q_pos), xp.asarray(q_seq)
        shape = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, self.wire)
        if xp is not np:
            from rshard_hpc.ops import decode_cuda

            if small and decode_cuda.supports(cfg.head_dim):
                return decode_cuda.DecodeLayers(cache, nq, nkv, q_pos_d, q_seq_d, *shape, cfg.causal, scale).layer
        plan = prepare_attention(q_pos_d, q_seq_d, k_pos, k_seq, causal=cfg.causal, scale=scale, xp=xp)
        if xp is not np and decode_cuda.plan_layers_support(cfg.head_dim):
            return decode_cuda.PlanLayers(cache, nq, nkv, plan, *shape).layer
        if last and xp is np and self.wire == np.float32 and cache.filled == 0:
            return self._attend_from_receive_buffer(nq, nkv, plan)

        def attend(recv, slot):
            o, lse = plan(self._unpack(cache, nq, nkv, recv, slot), *cache.rows(slot))
            return pack_partial(o, lse, self.wire).ravel()

        return attend

    def _attend_from_receive_buffer(self, nq, nkv, plan):
        """attend(recv, slot) that reads q, k and v where they arrived (ops/attention.RowSource over the receive
        buffer seen as rows of Hkv * D elements, every q, k and v row starting on such a row): no copy into the
        cache and no concatenation of the CompNodes' q rows, which an AttnNode's step spent ~30 % of its CPU time
        on (64-input MiniLM job, 13 ranks). The keys are the step's, in arrival order, as the cache would hold
        them (a first step: nothing cached before)."""
        cfg = self.cfg
        kv_width = cfg.n_kv_heads * cfg.head_dim
        q_src, k_src, v_src = recv_row_offsets(nq, nkv, cfg.n_heads * cfg.head_dim, kv_width)
        q_rows = (q_src // kv_width)[:, None] + np.arange(cfg.n_heads // cfg.n_kv_heads)  # (nq, G) base rows each
        q_tail, kv_tail = (cfg.n_heads, cfg.head_dim), (cfg.n_kv_heads, cfg.head_dim)

        def attend(recv, slot):
            rows = recv.reshape(-1, kv_width)
            o, lse = plan(RowSource(rows, q_rows, q_tail), RowSource(rows, k_src // kv_width, kv_tail),
                          RowSource(rows, v_src // kv_width, kv_tail))
            return pack_partial(o, lse, self.wire).ravel()

        return attend

    def _counts(self, routing: Routing):
        """Elements each CompNode sends me a layer (q of group i, k and v of group j) and I send it back."""
        cfg, topo = self.cfg, self.topo
        i, j = topo.attn_coords
        recv_counts = np.zeros(topo.work_comm.Get_size(), dtype=np.int64)
        back_counts = np.zeros_like(recv_counts)
        for k in range(topo.alpha):
            rank = topo.comp_work_rank(k)
            recv_counts[rank] = (routing.counts[k, i] * cfg.n_heads + 2 * routing.counts[k, j] * cfg.n_kv_heads) \
                * cfg.head_dim
            back_counts[rank] = routing.counts[k, i] * cfg.n_heads * self.slots
        return recv_counts, back_counts

    def _unpack(self, cache, nq_of, nkv_of, recv, slot: int):
        """Split the receive buffer, stacked over CompNodes (nq_of[k] q rows, then nkv_of[k] k and v rows from
        CompNode k): q (nq, H, D) returned, k and v (nkv, Hkv, D) written straight into the cache's new rows."""
        xp, cfg = self.xp, self.cfg
        k_new, v_new = cache.new_rows(slot)
        qs, offset, row = [], 0, 0
        q_width, kv_width = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        for k in range(self.topo.alpha):
            nq, nkv = int(nq_of[k]), int(nkv_of[k])
            qs.append(recv[offset:offset + nq * q_width].reshape(nq, cfg.n_heads, cfg.head_dim))
            offset += nq * q_width
            for out in (k_new, v_new):
                out[row:row + nkv] = recv[offset:offset + nkv * kv_width].reshape(nkv, cfg.n_kv_heads, cfg.head_dim)
                offset += nkv * kv_width
            row += nkv
        return qs[0] if len(qs) == 1 else xp.concatenate(qs)


class _AttnLane:
    """An AttnNode's lane of a step: elements each CompNode sends me a layer and I send it back, its layer function."""

    def __init__(self, recv_counts: np.ndarray, back_counts: np.ndarray, attend):
        self.recv_counts, self.back_counts, self.attend = recv_counts, back_counts, attend
