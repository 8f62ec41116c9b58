"""`rshard audit`: a vocab-matching attack with the real model against what one node saw (architecture.md §4).

Threat model (docs/audit.md): an honest-but-curious node knows the public weights, the plan (which
positions it sees) and the rows it received. The audit rebuilds exactly those rows from the plan with
the engine's own per-token passes (`Llama.pre` / `partial_attention` / `Llama.post`, NumPy, fp32) and
attacks them left to right:

* For every run of the node's view, the g unseen positions before the run plus the run's first token
  are unknown. Gap fillings are enumerated by a beam over the model's own next-token distribution
  (top-k per position, at most `beam` fillings, best joint log-probability first); for each filling,
  the run's first token is tried in the model's order: the top-k of every filling first, then the rest
  of the vocabulary ("exhaustive") while the budget lasts. A candidate is accepted when the row it
  produces at the chosen layer matches the observed row (relative L2 distance below `tol`).
* Later tokens of a run have a single unknown: the same search with g = 0.
* Without a match, the attacker keeps its nearest candidate (smallest distance over all it evaluated)
  and carries on; a wrong prefix makes later exact matches fail, which is the point of the gaps.

A "forward pass" (the budget unit) is one candidate row evaluated through layers 0..L at one position
against the cached prefix; the beam's ranking passes over the full model are reported apart. Budgets
are per unknown group (a gap plus its run's first token, or one later token).

Candidate rows are computed by a small PyTorch (CPU) re-implementation of the same Llama math from
the same weight file, batched over thousands of candidates against a shared prefix K/V cache; the
observed rows come from the engine's NumPy functions, so a true candidate matches to ~1e-6.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rshard_hpc.audit.torch_llama import TorchLlama, cat_cache
from rshard_hpc.errors import InputError
from rshard_hpc.plan.views import runs_of

PARTS = ("q", "k", "v")
ROW_PARTS = PARTS + ("h",)  # h: the residual stream entering the layer (a CompNode's row when the client runs layers < L)


DEFAULT_TOL = 1e-3


EVAL_CHUNK = 2048  # candidates per batched evaluation


def observed_rows(path_or_model, ids, layer: int) -> dict:
    """What the engine computes at `layer` for one sequence: {"q","k","v"}: (n, heads*D) float32, and "h": (n, d)
    the residual stream entering the layer.

    Built from the engine's own per-token passes and partial attention (NumPy, fp32), the functions
    the CompNodes run; a node receives the rows of its positions from this."""
    from rshard_hpc.models import load_model
    from rshard_hpc.ops.attention import partial_attention

    model = load_model(path_or_model) if not hasattr(path_or_model, "pre") else path_or_model
    cfg = model.cfg
    if layer < 0 or layer >= cfg.n_layers:
        raise InputError(f"--layer must lie in [0, {cfg.n_layers})")
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    pos = np.arange(n, dtype=np.int32)
    seq = np.zeros(n, dtype=np.int32)
    h = model.embed(ids, pos)
    for lyr in range(layer):
        q, k, v = model.pre(lyr, h, pos)
        o, _ = partial_attention(q, pos, seq, k, v, pos, seq, cfg.causal, 1.0 / np.sqrt(cfg.head_dim))
        h = model.post(lyr, h, o)
    q, k, v = model.pre(layer, h, pos)
    return {"q": np.asarray(q).reshape(n, -1), "k": np.asarray(k).reshape(n, -1), "v": np.asarray(v).reshape(n, -1),
            "h": np.asarray(h, dtype=np.float32)}


def node_parts(name: str, group: np.ndarray, n: int) -> dict:
    """{position: parts received} for a node: AttnNode (i, j) gets q of group i and k, v of group j;
    "control" (every position, as an AttnNode of a β = 1 grid) gets k and v of every position."""
    if name == "control":
        return {p: ("k", "v") for p in range(n)}
    if name.startswith("attn"):
        i, j = (int(x) for x in name[4:].split("_"))
        out = {}
        for p in range(n):
            parts = (("q",) if group[p] == i else ()) + (("k", "v") if group[p] == j else ())
            if parts:
                out[p] = parts
        return out
    raise InputError(f"unknown node {name!r}")


@dataclass
class Attack:
    tm: TorchLlama
    layer: int = 1
    top_k: int = 8
    budget: int = 4096  # candidate evaluations per unknown group
    beam: int = 8  # gap fillings kept at most
    tol: float = DEFAULT_TOL
    rank_ids: tuple = ()  # public context the ranking model reads first (e.g. the chat template's user turn)

    def __post_init__(self):
        self.tm.build_layer0_table()  # every candidate's layer-0 projections come from this table

    def _rank_start(self):
        """The ranking model's cache over `rank_ids` and its logits for the sequence's first token."""
        torch = self.tm.torch
        if not hasattr(self, "_rank0"):
            if self.rank_ids:
                logits, new = self.tm.extend(self.tm.empty_cache(), torch.tensor([list(self.rank_ids)]), 0)
                self._rank0 = (cat_cache(self.tm.empty_cache(), new), logits[0, -1])
            else:  # no context: a flat ranking (the search then walks the vocabulary in id order)
                self._rank0 = (self.tm.empty_cache(), torch.zeros(self.tm.cfg.vocab_size))
        return self._rank0

    def run(self, ids, obs: dict, parts: dict, given=None) -> dict:
        """Attack one sequence. obs: {"q","k","v"}: (n, ·) rows at self.layer; parts: {pos: parts seen};
        given: {pos: token} known outright. Returns per-position outcomes and counters."""
        torch = self.tm.torch
        given = dict(given or {})
        view = np.array(sorted(parts), dtype=np.int64)
        runs = runs_of(view)
        st = {"passes": 0, "rank_passes": 0, "seen": [], "recovered": [], "nearest_ok": [], "first_run": [],
              "unseen_recovered": 0, "unseen": 0, "false_matches": 0}
        off = len(self.rank_ids)
        with torch.no_grad():
            cache = self.tm.empty_cache()  # the hypothesis's rows, layers < L, true positions
            rank_cache, rank_logits = self._rank_start()  # the ranking model over the public context + hypothesis
            rank = {"cache": rank_cache, "logits": rank_logits}
            hyp = []
            cursor = 0
            for r, (start, length) in enumerate(runs):
                for p in range(start, start + length):
                    gap = list(range(cursor, p))  # unseen positions before p (only before a run's first token)
                    target = np.concatenate([obs[x][p] for x in parts[p]])
                    res = self._search(cache, rank, len(hyp), off, len(gap), target, parts[p], given.get(p), st)
                    tokens = list(res["filling"]) + [res["token"]]
                    true = [int(t) for t in ids[cursor:p + 1]]
                    if res["matched"] and (self.layer > 0 or p not in given):
                        # a match confirms what the row depends on: at layer 0 the token alone, above it the
                        # gap filling as well
                        confirmed = (tokens, true) if self.layer > 0 else (tokens[-1:], true[-1:])
                        if confirmed[0] != confirmed[1]:
                            st["false_matches"] += 1
                        if self.layer > 0:
                            st["unseen_recovered"] += sum(int(a == b) for a, b in zip(tokens[:-1], true[:-1]))
                    st["unseen"] += len(gap)
                    st["seen"].append(p)
                    st["first_run"].append(r == 0)
                    known = p in given  # given outright (a CompNode's ids) or recovered before (layer-0 assist)
                    st["recovered"].append(bool((res["matched"] or known) and tokens[-1] == true[-1]))
                    st["nearest_ok"].append(bool(tokens[-1] == true[-1]))
                    # carry on with the hypothesis (matched, or the nearest candidate)
                    toks = torch.tensor([tokens])
                    if self.layer:
                        _, new = self.tm.extend(cache, toks, len(hyp), upto=self.layer)
                        cache = cat_cache(cache, new, 0, upto=self.layer)
                    logits, new = self.tm.extend(rank["cache"], toks, off + len(hyp))
                    st["rank_passes"] += len(tokens)
                    rank = {"cache": cat_cache(rank["cache"], new), "logits": logits[0, -1]}
                    hyp += tokens
                    cursor = p + 1
        st["hypothesis"] = hyp
        return st

    def _fillings(self, rank, start: int, g: int, st) -> list:
        """Beam over g gap positions from `start` (ranking positions): [(tokens, logprob)], best first."""
        torch = self.tm.torch
        beams = [((), 0.0)]
        for step in range(g):
            if step == 0:
                lps = [torch.log_softmax(rank["logits"], -1)]
            else:
                toks = torch.tensor([b[0] for b in beams])
                logits, _ = self.tm.extend(rank["cache"], toks, start)
                st["rank_passes"] += toks.numel()
                lps = list(torch.log_softmax(logits[:, -1], -1))
            grown = []
            for (toks, lp), dist in zip(beams, lps):
                vals, idx = torch.topk(dist, self.top_k)
                grown += [(toks + (int(t),), lp + float(v)) for v, t in zip(vals, idx)]
            grown.sort(key=lambda x: -x[1])
            beams = grown[:self.beam]
        return beams

    def _search(self, cache, rank, start: int, off: int, g: int, target, parts, known, st) -> dict:
        """Find (filling of the g gap positions, token at start+g) whose row there matches `target`.

        The free position (enumerated down the model's ranking, exhaustively when the budget allows) is
        the run's first token, or, when that token is known (`known`: a CompNode's own id, or one
        recovered from layer 0), the last gap position; the positions before it come from the beam."""
        torch = self.tm.torch
        if known is not None and (g == 0 or self.layer == 0):
            # nothing unknown (or a context-free layer-0 row, which says nothing about the gap)
            filling = self._fillings(rank, off + start, g, st)[0][0] if g else ()
            return {"matched": g == 0, "filling": filling, "token": int(known), "dist": 0.0}
        target = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32))
        tnorm = float(torch.linalg.norm(target)) or 1.0
        fixed = g if known is None else g - 1
        suffix = [] if known is None else [int(known)]
        fillings = self._fillings(rank, off + start, fixed, st)
        if self.layer == 0:
            fillings = fillings[:1]  # a layer-0 row ignores its context: one filling serves every candidate
        ctxs = []
        for toks, _ in fillings:
            if fixed == 0:
                ctx, lg = cache, rank["logits"]
            else:
                t = torch.tensor([list(toks)])
                logits, _ = self.tm.extend(rank["cache"], t, off + start)
                st["rank_passes"] += fixed
                lg = logits[0, -1]
                ctx = cache
                if self.layer:
                    _, new = self.tm.extend(cache, t, start, upto=self.layer)
                    ctx = cat_cache(cache, new, 0, upto=self.layer)
            ctxs.append({"toks": toks, "ctx": ctx, "order": torch.argsort(lg, descending=True), "done": 0})
        left = self.budget
        first = int(ctxs[0]["order"][0])
        best = {"dist": float("inf"), "filling": fillings[0][0] + ((first,) if suffix else ()),
                "token": suffix[0] if suffix else first}

        def evaluate(c, upto_count):
            nonlocal left
            upto_count = min(upto_count, len(c["order"]))
            while c["done"] < upto_count and left > 0:
                take = min(EVAL_CHUNK, upto_count - c["done"], left)
                cand = c["order"][c["done"]:c["done"] + take]
                toks = cand[:, None]
                if suffix:
                    toks = torch.cat([toks, torch.tensor(suffix).expand(take, len(suffix))], dim=1)
                rows, _ = self.tm.extend(c["ctx"], toks, start + fixed, upto=self.layer)
                got = torch.cat([rows[ROW_PARTS.index(x)] for x in parts], dim=1)
                dist = torch.linalg.norm(got - target[None], dim=1) / tnorm
                c["done"] += take
                left -= take
                st["passes"] += take
                i = int(torch.argmin(dist))
                if float(dist[i]) < best["dist"]:
                    x = int(cand[i])
                    best.update(dist=float(dist[i]), filling=c["toks"] + ((x,) if suffix else ()),
                                token=suffix[0] if suffix else x)
                if float(dist[i]) < self.tol:
                    return True
            return False

        for limit in (self.top_k, None):  # the top-k of every filling first, then down the whole vocabulary
            for c in ctxs:
                if left <= 0:
                    break
                if evaluate(c, limit if limit is not None else len(c["order"])):
                    return {"matched": True, "filling": best["filling"], "token": best["token"], "dist": best["dist"]}
        return {"matched": False, "filling": best["filling"], "token": best["token"], "dist": best["dist"]}
