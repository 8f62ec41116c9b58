"""`rshard audit`: a vocab-matching attack with the real model against what one node saw (DESIGN §4).

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

import json
import time
from dataclasses import asdict, dataclass

import numpy as np

from rshard_hpc.errors import InputError
from rshard_hpc.plan import PlanSpec, make_plan, plan_views, runs_of
from rshard_hpc.privacy import plan_report

PARTS = ("q", "k", "v")
DEFAULT_TOL = 1e-3
EVAL_CHUNK = 2048  # candidates per batched evaluation


# ------------------------------------------------------------------------------------ torch model

class TorchLlama:
    """The Llama of rshard_hpc.models.llama in PyTorch fp32 on CPU, with a prefix cache shared by a batch."""

    def __init__(self, cfg, tensors: dict):
        import torch

        from rshard_hpc.models import weights
        from rshard_hpc.models.llama import LAYER_KEYS, rope_inv_freq

        if cfg.arch != "llama":
            raise InputError(f"rshard audit attacks causal Llama models; {cfg.name!r} is {cfg.arch!r} "
                             "(encoders: see docs/audit.md)")
        self.torch = torch
        self.cfg = cfg
        t = lambda key: torch.from_numpy(np.ascontiguousarray(tensors[key], dtype=np.float32))
        self.embed = t("embed/word")
        self.layers = [{name: t(weights.layer_key(i, name)) for name in LAYER_KEYS} for i in range(cfg.n_layers)]
        self.final_norm = t("final_norm/w")
        self.lm_head = self.embed if cfg.tie_embeddings else t("lm_head/w")
        self.inv_freq = torch.from_numpy(rope_inv_freq(cfg))
        self.scale = 1.0 / float(np.sqrt(cfg.head_dim))
        self._qkv0 = None  # (V, (H + 2 Hkv) D): layer-0 projections before RoPE, context-free

    @classmethod
    def from_file(cls, path):
        from rshard_hpc.models import weights
        from rshard_hpc.models.llama import Llama

        cfg = weights.read_config(path)
        keys = list(Llama.tensor_keys(cfg)) if cfg.arch == "llama" else []
        keys += [k for k in (Llama.head_keys(cfg) if cfg.arch == "llama" else []) if k not in keys]
        if cfg.arch != "llama":
            raise InputError(f"rshard audit attacks causal Llama models; {cfg.name!r} is {cfg.arch!r} "
                             "(encoders: see docs/audit.md)")
        return cls(cfg, weights.read_tensors(path, keys))

    # -- pieces
    def _rms(self, x, w):
        torch = self.torch
        return x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + self.cfg.norm_eps) * w

    def _rope(self, x, pos):
        """x: (..., m, heads, D); pos: (m,) long."""
        torch = self.torch
        ang = pos.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat([ang, ang], dim=-1)
        cos, sin = torch.cos(emb)[:, None, :], torch.sin(emb)[:, None, :]
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    def _proj(self, layer, h, tokens=None):
        """(…, d) -> q (…, H, D), k, v (…, Hkv, D) before RoPE; layer 0 of known tokens from a table."""
        c = self.cfg
        if layer == 0 and tokens is not None and self._qkv0 is not None:
            qkv = self._qkv0[tokens]
        else:
            w = self.layers[layer]
            x = self._rms(h, w["attn_norm_w"])
            qkv = x @ self._wqkv(layer).T
        hq, hk = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        shape = qkv.shape[:-1]
        q = qkv[..., :hq].reshape(*shape, c.n_heads, c.head_dim)
        k = qkv[..., hq:hq + hk].reshape(*shape, c.n_kv_heads, c.head_dim)
        v = qkv[..., hq + hk:].reshape(*shape, c.n_kv_heads, c.head_dim)
        return q, k, v

    def _wqkv(self, layer):
        w = self.layers[layer]
        if "_wqkv" not in w:
            w["_wqkv"] = self.torch.cat([w["wq"], w["wk"], w["wv"]], dim=0)
        return w["_wqkv"]

    def build_layer0_table(self):
        """Every token's layer-0 q, k, v before RoPE: a layer-0 row needs only its token and position."""
        if self._qkv0 is None:
            with self.torch.no_grad():
                x = self._rms(self.embed, self.layers[0]["attn_norm_w"])
                self._qkv0 = x @ self._wqkv(0).T
        return self._qkv0

    def empty_cache(self):
        torch = self.torch
        c = self.cfg
        z = torch.zeros(0, c.n_kv_heads, c.head_dim)
        return [(z, z) for _ in range(c.n_layers)]

    def extend(self, cache, tokens, start: int, upto=None):
        """Run B candidate continuations against one shared prefix cache.

        cache: per layer (K, V), each (n, Hkv, D), positions 0..n-1 (n == start), shared by the batch.
        tokens: (B, m) long at positions start .. start+m-1.
        upto=None: every layer; returns (logits (B, m, V), new per-layer (K, V) of shape (B, m, Hkv, D)).
        upto=L: layers 0..L-1 in full, then returns the layer-L rows (q, k, v after RoPE) of the last
        position, each (B, heads*D), and the new (K, V) of layers 0..L-1.
        """
        torch = self.torch
        c = self.cfg
        B, m = tokens.shape
        pos = torch.arange(start, start + m)
        h = self.embed[tokens]  # (B, m, d)
        n_run = c.n_layers if upto is None else upto
        new = []
        causal = torch.ones(m, m, dtype=torch.bool).tril()
        g = c.n_heads // c.n_kv_heads
        for layer in range(n_run):
            q, k, v = self._proj(layer, h, tokens if layer == 0 else None)
            q, k = self._rope(q, pos), self._rope(k, pos)
            new.append((k, v))
            kc, vc = cache[layer]
            qh = q.reshape(B, m, c.n_kv_heads, g, c.head_dim)
            s_c = torch.einsum("bmkgd,nkd->bkgmn", qh, kc) * self.scale
            s_n = torch.einsum("bmkgd,bjkd->bkgmj", qh, k) * self.scale
            s_n = s_n.masked_fill(~causal, float("-inf"))
            p = torch.softmax(torch.cat([s_c, s_n], dim=-1), dim=-1)
            n = kc.shape[0]
            o = torch.einsum("bkgmn,nkd->bmkgd", p[..., :n], vc) + torch.einsum("bkgmj,bjkd->bmkgd", p[..., n:], v)
            w = self.layers[layer]
            h = h + o.reshape(B, m, c.n_heads * c.head_dim) @ w["wo"].T
            x = self._rms(h, w["mlp_norm_w"])
            h = h + (torch.nn.functional.silu(x @ w["w_gate"].T) * (x @ w["w_up"].T)) @ w["w_down"].T
        if upto is None:
            logits = self._rms(h, self.final_norm) @ self.lm_head.T
            return logits, new
        last = h[:, -1]
        q, k, v = self._proj(upto, last, tokens[:, -1] if upto == 0 else None)
        lp = pos[-1:]
        q, k = self._rope(q[:, None], lp)[:, 0], self._rope(k[:, None], lp)[:, 0]
        return (q.reshape(B, -1), k.reshape(B, -1), v.reshape(B, -1)), new


def cat_cache(cache, new, b: int = 0, upto=None):
    """The shared prefix cache extended by candidate b's new rows (layers < upto, or all)."""
    import torch

    n_layers = len(new) if upto is None else min(upto, len(new))
    out = []
    for layer in range(len(cache)):
        if layer < n_layers:
            k, v = new[layer]
            out.append((torch.cat([cache[layer][0], k[b]]), torch.cat([cache[layer][1], v[b]])))
        else:
            out.append(cache[layer])
    return out


# ------------------------------------------------------------------------------------ observed rows

def observed_rows(path_or_model, ids, layer: int) -> dict:
    """What the engine computes at `layer` for one sequence: {"q","k","v"}: (n, heads*D) float32.

    Built from the engine's own per-token passes and partial attention (NumPy, fp32), the functions
    the CompNodes run; a node receives the rows of its positions from this."""
    from rshard_hpc.attention import partial_attention
    from rshard_hpc.models import load_model

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
    return {"q": np.asarray(q).reshape(n, -1), "k": np.asarray(k).reshape(n, -1), "v": np.asarray(v).reshape(n, -1)}


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


# ------------------------------------------------------------------------------------ the attack

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
                got = torch.cat([rows[PARTS.index(x)] for x in parts], dim=1)
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


# ------------------------------------------------------------------------------------ the audit

@dataclass
class NodeResult:
    node: str
    fraction_seen: float = 0.0
    min_gap: float = float("inf")
    seen: int = 0
    recovered: int = 0
    first_seen: int = 0
    first_recovered: int = 0
    interior_seen: int = 0
    interior_recovered: int = 0
    nearest_ok: int = 0
    unseen: int = 0
    unseen_recovered: int = 0
    false_matches: int = 0
    passes: int = 0
    rank_passes: int = 0
    seconds: float = 0.0
    given: bool = False  # CompNode: token ids received outright

    def add(self, st: dict, given: bool = False) -> None:
        rec = np.array(st["recovered"], dtype=bool)
        first = np.array(st["first_run"], dtype=bool)
        self.seen += len(rec)
        self.recovered += int(rec.sum())
        self.first_seen += int(first.sum())
        self.first_recovered += int((rec & first).sum())
        self.interior_seen += int((~first).sum())
        self.interior_recovered += int((rec & ~first).sum())
        self.nearest_ok += int(np.sum(st["nearest_ok"]))
        self.unseen += st["unseen"]
        self.unseen_recovered += st["unseen_recovered"]
        self.false_matches += st["false_matches"]
        self.passes += st["passes"]
        self.rank_passes += st["rank_passes"]


def load_prompts(path) -> list:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                line = json.loads(line)["text"]
            texts.append(line)
    if not texts:
        raise InputError(f"{path}: no prompts")
    return texts


def rank_context(path, cfg) -> list:
    """Public text a prompt is assumed to follow, for ranking only: the chat template up to the user's
    message (SmolLM2: its default system turn, then "<|im_start|>user\\n"), else the BOS token, else nothing.
    The attacked rows are computed without it, at the prompt's true positions."""
    from rshard_hpc.models.llama import apply_chat_template
    from rshard_hpc.tokenizer import TextCodec

    if cfg.chat_template:
        marker = "\x00AUDIT\x00"
        text = apply_chat_template(cfg, [{"role": "user", "content": marker}], add_generation_prompt=False)
        return TextCodec(path, cfg).encode(text.split(marker)[0])
    return [cfg.bos_token_id] if cfg.bos_token_id is not None and cfg.bos_token_id >= 0 else []


def run_audit(model, prompts, spec: PlanSpec, layer: int = 1, top_k: int = 8, budget: int = 4096,
              beam: int = 8, nodes=None, all_nodes: bool = False, max_tokens: int = 32, tol: float = DEFAULT_TOL,
              control: bool = True, assist_layer0: bool = False, rank_with_template: bool = True,
              echo=None) -> dict:
    """The audit over `prompts` (texts or id lists) for one plan; returns a JSON-able report."""
    from rshard_hpc.defaults import resolve_model
    from rshard_hpc.models import load_model
    from rshard_hpc.tokenizer import TextCodec

    spec.check()
    path = resolve_model(model) if isinstance(model, str) else model
    np_model = load_model(path)
    cfg = np_model.cfg
    if cfg.arch != "llama":
        raise InputError(f"rshard audit attacks causal (Llama) models; {cfg.name!r} is an encoder "
                         "(bidirectional attention: see docs/audit.md)")
    tm = TorchLlama.from_file(path)
    codec = None
    seqs = []
    for p in prompts:
        if isinstance(p, str):
            codec = codec or TextCodec(path, cfg)
            ids = codec.encode(p)
        else:
            ids = list(p)
        if len(ids) < 2:
            raise InputError("every audited prompt needs at least 2 tokens")
        seqs.append(np.asarray(ids[:max_tokens], dtype=np.int64))
    prior = tuple(rank_context(path, cfg)) if rank_with_template else ()
    attack = Attack(tm, layer=layer, top_k=top_k, budget=budget, beam=beam, tol=tol, rank_ids=prior)
    # layer-0 candidates are table lookups: the assist always affords the whole vocabulary
    attack0 = Attack(tm, layer=0, top_k=top_k, budget=max(budget, cfg.vocab_size + top_k), beam=beam, tol=tol,
                     rank_ids=prior) \
        if assist_layer0 and layer > 0 else None

    n_max = max(len(s) for s in seqs)
    comp_max, group_max = make_plan(spec, n_max)
    summary = plan_report(spec, n_max)
    names = list(plan_views(comp_max, group_max, spec.alpha, spec.beta))
    if nodes:
        unknown = [x for x in nodes if x not in names]
        if unknown:
            raise InputError(f"unknown node(s) {', '.join(unknown)}; this plan has {', '.join(names)}")
        chosen = list(nodes)
    else:
        chosen = [x for x in names if x.startswith("attn") or all_nodes]
    if control:
        chosen = chosen + ["control"]
    results = {}
    for name in chosen:
        res = NodeResult(node=name)
        if name in summary["nodes"]:
            res.fraction_seen = summary["nodes"][name]["fraction_seen"]
            res.min_gap = summary["nodes"][name]["min_gap"]
        else:
            res.fraction_seen, res.min_gap = 1.0, float("inf")
        t0 = time.perf_counter()
        for ids in seqs:
            n = len(ids)
            comp, group = make_plan(spec, n)
            obs = observed_rows(np_model, ids, layer)
            if name.startswith("comp"):
                k = int(name[4:])
                seen = np.flatnonzero(comp == k)
                parts = {int(p): PARTS for p in seen}  # a CompNode computes q, k, v (and h) of its rows
                given = {int(p): int(ids[p]) for p in seen}
                res.given = True
            else:
                parts = node_parts(name, group, n)
                given = {}
                if attack0 is not None:  # tokens of the view first, from the same node's layer-0 rows
                    obs0 = observed_rows(np_model, ids, 0)
                    st0 = attack0.run(ids, obs0, parts)
                    res.passes += st0["passes"]
                    given = {p: t for p, t, ok in zip(st0["seen"], [st0["hypothesis"][p] for p in st0["seen"]],
                                                      st0["recovered"]) if ok}
            st = attack.run(ids, obs, parts, given)
            res.add(st)
        res.seconds = time.perf_counter() - t0
        results[name] = res
        if echo:
            echo(_row(res))
    return {"model": str(model), "plan": spec.params(), "delta": summary["delta"], "layer": layer,
            "top_k": top_k, "budget": budget, "beam": beam, "tol": tol, "assist_layer0": bool(attack0),
            "prompts": len(seqs), "tokens": int(sum(len(s) for s in seqs)),
            "nodes": {k: asdict(v) for k, v in results.items()}}


HEADER = ("| node | seen frac | min gap | seen | recovered | first run | interior runs | nearest ok "
          "| unseen recovered | passes | s |\n|---|---|---|---|---|---|---|---|---|---|---|")


def _frac(a, b):
    return f"{a}/{b}" if b else "-"


def _row(r: NodeResult) -> str:
    gap = "∞" if r.min_gap == float("inf") else f"{int(r.min_gap)}"
    rec = f"{r.recovered}/{r.seen} (given)" if r.given else _frac(r.recovered, r.seen)
    return (f"| {r.node} | {r.fraction_seen:.2f} | {gap} | {r.seen} | {rec} | "
            f"{_frac(r.first_recovered, r.first_seen)} | {_frac(r.interior_recovered, r.interior_seen)} | "
            f"{_frac(r.nearest_ok, r.seen)} | {_frac(r.unseen_recovered, r.unseen)} | {r.passes} | {r.seconds:.1f} |")


def format_report(rep: dict) -> str:
    p = rep["plan"]
    delta = rep["delta"]
    head = (f"plan {p['scheme']} α={p['alpha']} β={p['beta']} c={p['c']} c_a={p['c_a']} δ={delta:g}, "
            f"layer {rep['layer']}, top-k {rep['top_k']}, budget {rep['budget']}/group, beam {rep['beam']}"
            f"{', layer-0 assist' if rep['assist_layer0'] else ''}; {rep['prompts']} prompts, {rep['tokens']} tokens")
    lines = [head, "", HEADER]
    for d in rep["nodes"].values():
        lines.append(_row(NodeResult(**d)))
    ctl = rep["nodes"].get("control")
    if ctl and ctl["seen"]:
        frac = ctl["recovered"] / ctl["seen"]
        lines.append("")
        lines.append(f"control: {frac:.1%} recovered" + ("" if frac >= 0.95 else
                                                           "  <-- below 95%: the attack is broken or under-budgeted"))
    return "\n".join(lines)
