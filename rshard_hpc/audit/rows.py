"""Row attacks of the extended audit (docs/privacy.md): what a node reads, position by position, from the rows it
receives at the first layer a server runs (K, the layers run on the client), with no exact-match search.

* nearest neighbour ("nn"): a row against every vocabulary token's row at that layer as if the residual stream
  were the token's embedding alone: the embedding table for a CompNode's hidden row, the layer-K projections
  for q, k, v (q and k derotated: positions are public). Exact at K = 0 (cosine 1 for the true token).
* learned inverters ("linear": ridge regression, "mlp": one hidden layer) from a row to the embedding space,
  trained on rows of public text, decoded by the nearest (cosine) embedding of the whole vocabulary, so they
  also name tokens they never saw in training.
* scores: what the q·kᵀ scores an AttnNode computes reveal: pairs of its positions that hold the same token (a
  logistic detector over the heads' scores) and adjacency (the best previous-token head's argmax).
* fill: unseen positions guessed by the model's own argmax given the attacker's hypothesis.

Row kinds: "h" (a CompNode's hidden row), "q" (an AttnNode's query row), "kv" (its key and value rows), "qkv"
(positions of an AttnNode's own query and key group, i = j, or a control).
"""
from __future__ import annotations

import numpy as np

KIND_PARTS = {"h": ("h",), "q": ("q",), "kv": ("k", "v"), "qkv": ("q", "k", "v")}
DECODE_CHUNK = 512  # rows scored against the whole vocabulary at once


def node_rows(name: str, comp: np.ndarray, group: np.ndarray, client_layers: int) -> dict:
    """{row kind: positions} a node receives at layer K = client_layers for one sequence.

    CompNode k: its token ids when K = 0 ("ids": it reads them outright), else the hidden rows entering layer K
    of its positions. AttnNode (i, j): q of group i, k and v of group j ("qkv" where i = j). The controls see
    every position: "control_h" (a CompNode of α = 1) and "control_qkv" (an AttnNode of β = 1)."""
    n = len(comp)
    every = np.arange(n)
    if name == "control_h":
        return {"h": every}
    if name == "control_qkv":
        return {"qkv": every}
    if name.startswith("comp"):
        mine = np.flatnonzero(comp == int(name[4:]))
        return {"ids" if client_layers == 0 else "h": mine}
    i, j = (int(x) for x in name[4:].split("_"))
    q, kv = group == i, group == j
    out = {"qkv": np.flatnonzero(q & kv), "q": np.flatnonzero(q & ~kv), "kv": np.flatnonzero(kv & ~q)}
    return {k: v for k, v in out.items() if len(v)}


def features(tm, rows: dict, kind: str, pos) -> dict:
    """{part: (len(pos), ·) torch rows} of one sequence's layer rows at `pos`; q and k derotated."""
    pos = np.asarray(pos, dtype=np.int64)
    out = {}
    for part in KIND_PARTS[kind]:
        x = rows[part][pos]
        out[part] = tm.derotate(x, pos) if part in ("q", "k") else x
    return out


def references(tm, layer: int, kind: str, cache: dict) -> dict:
    """{part: (V, ·)} every vocabulary token's context-free row at `layer` (the embedding table for "h")."""
    if kind == "h":
        return {"h": tm.embed}
    if layer not in cache:
        cache[layer] = tm.token_projections(layer)
    return {p: cache[layer][p] for p in KIND_PARTS[kind]}


def nearest(feats: dict, refs: dict):
    """Per row, the vocabulary id whose reference row (the parts concatenated) has the largest cosine."""
    import torch

    parts = list(feats)
    ref_norm = torch.sqrt(sum((refs[p] * refs[p]).sum(1) for p in parts)).clamp_min(1e-12)  # (V,)
    n = feats[parts[0]].shape[0]
    out = []
    for s in range(0, n, DECODE_CHUNK):
        dots = sum(feats[p][s:s + DECODE_CHUNK] @ refs[p].T for p in parts)  # (rows, V); row norms don't matter
        out.append(torch.argmax(dots / ref_norm, dim=1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _flat(feats: dict):
    import torch

    return torch.cat([feats[p] for p in sorted(feats)], dim=1)


class Adam:
    """A plain Adam step (torch.optim imports torch._dynamo, seconds of start-up on a small CPU machine)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        import torch

        self.params, self.lr, self.betas, self.eps, self.t = params, lr, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        import torch

        self.t += 1
        b1, b2 = self.betas
        with torch.no_grad():
            for p, m, v in zip(self.params, self.m, self.v):
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                step = (m / (1 - b1 ** self.t)) / ((v / (1 - b2 ** self.t)).sqrt() + self.eps)
                p.sub_(self.lr * step)


class Inverter:
    """A learned map from a row (the parts concatenated) to the embedding space, decoded by cosine against every
    token's embedding. "linear": ridge regression (its penalty picked on a held-out 15% of the training rows);
    "mlp": one hidden layer trained with a sampled softmax over the vocabulary."""

    def __init__(self, kind: str, emb, seed: int = 0):
        import torch

        self.kind, self.seed = kind, seed
        self.emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (V, d) unit rows
        self.torch = torch

    def _standardize(self, x, fit=False):
        if fit:
            self.mu, self.sd = x.mean(0), x.std(0).clamp_min(1e-6)
        return (x - self.mu) / self.sd

    def decode(self, x):
        """(n, d_in) rows -> (n,) token ids."""
        return nearest({"e": self.predict(x)}, {"e": self.emb})

    def accuracy(self, x, y) -> float:
        return float((self.decode(x) == y).float().mean()) if len(y) else 0.0


class LinearInverter(Inverter):
    def fit(self, x, y):
        torch = self.torch
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(y), generator=g)
        cut = max(1, int(0.85 * len(y)))
        fit, val = order[:cut], order[cut:]
        best = None
        for lam in (1e-3, 1e-2, 1e-1, 1.0):
            self._solve(x[fit], y[fit], lam)
            acc = self.accuracy(x[val], y[val])
            if best is None or acc > best[0]:
                best = (acc, lam)
        self._solve(x, y, best[1])
        self.penalty = best[1]
        return self

    def _solve(self, x, y, lam: float):
        torch = self.torch
        xs = self._standardize(x, fit=True)
        xs = torch.cat([xs, torch.ones(len(xs), 1)], dim=1)  # (n, d_in + 1) with a bias column
        a = xs.T @ xs + lam * len(xs) * torch.eye(xs.shape[1])
        self.w = torch.linalg.solve(a.double(), (xs.T @ self.emb[y]).double()).float()  # (d_in + 1, d)

    def predict(self, x):
        xs = self._standardize(x)
        return self.torch.cat([xs, self.torch.ones(len(xs), 1)], dim=1) @ self.w


class MlpInverter(Inverter):
    hidden, epochs, batch, negatives, lr, temperature = 512, 20, 256, 512, 2e-3, 0.05

    def fit(self, x, y):
        torch = self.torch
        torch.manual_seed(self.seed)
        xs = self._standardize(x, fit=True)
        d_in, d = xs.shape[1], self.emb.shape[1]
        self.net = torch.nn.Sequential(torch.nn.Linear(d_in, self.hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(self.hidden, d))
        opt = Adam(list(self.net.parameters()), lr=self.lr)
        V = self.emb.shape[0]
        for _ in range(self.epochs):
            for idx in torch.randperm(len(y)).split(self.batch):
                cands = torch.unique(torch.cat([y[idx], torch.randint(0, V, (self.negatives,))]))  # sorted
                target = torch.searchsorted(cands, y[idx])
                pred = torch.nn.functional.normalize(self.net(xs[idx]), dim=1)
                loss = torch.nn.functional.cross_entropy(pred @ self.emb[cands].T / self.temperature, target)
                opt.zero_grad()
                loss.backward()
                opt.step()
        return self

    def predict(self, x):
        with self.torch.no_grad():
            return self.net(self._standardize(x))


INVERTERS = {"linear": LinearInverter, "mlp": MlpInverter}


# ------------------------------------------------------------------------------------------ q·kᵀ scores
def head_scores(tm, rows: dict, qpos, kpos):
    """The scores an AttnNode computes: (H, len(qpos), len(kpos)) q·kᵀ/√D per head, -inf where a key lies after
    the query (causal)."""
    import torch

    c = tm.cfg
    q = rows["q"][np.asarray(qpos)].reshape(len(qpos), c.n_heads, c.head_dim)
    k = rows["k"][np.asarray(kpos)].reshape(len(kpos), c.n_kv_heads, c.head_dim)
    k = k.repeat_interleave(c.n_heads // c.n_kv_heads, dim=1)  # (m, H, D)
    s = torch.einsum("ahd,bhd->hab", q, k) * tm.scale
    later = torch.as_tensor(np.asarray(kpos))[None, :] > torch.as_tensor(np.asarray(qpos))[:, None]
    return s.masked_fill(later[None], float("-inf"))


def pair_features(s, qpos, kpos):
    """Per (query, earlier key) pair: each head's score and its score less the query's mean over its keys, and
    log(1 + distance): ((pairs, 2H + 1) features, (pairs, 2) query/key positions)."""
    import torch

    qpos, kpos = torch.as_tensor(np.asarray(qpos)), torch.as_tensor(np.asarray(kpos))
    ok = kpos[None, :] < qpos[:, None]  # (a, b): distinct positions, key before query
    finite = torch.where(torch.isinf(s), torch.zeros_like(s), s)
    count = (~torch.isinf(s[0])).sum(1).clamp_min(1)  # keys per query
    centred = s - (finite.sum(2) / count)[:, :, None]
    a, b = torch.nonzero(ok, as_tuple=True)
    dist = (qpos[a] - kpos[b]).float()
    feats = torch.cat([s[:, a, b].T, centred[:, a, b].T, torch.log1p(dist)[:, None]], dim=1)
    return feats, torch.stack([qpos[a], kpos[b]], dim=1)


class SameTokenDetector:
    """Logistic regression (class-balanced) on pair_features: does a (query, key) pair hold the same token?
    Also picks the previous-token head: the head whose argmax over earlier keys is most often the position
    just before."""

    def fit(self, pairs_x, same, prev_hits):
        import torch

        torch.manual_seed(0)
        self.mu, self.sd = pairs_x.mean(0), pairs_x.std(0).clamp_min(1e-6)
        x = (pairs_x - self.mu) / self.sd
        y = same.float()
        pos_w = (len(y) - y.sum()) / y.sum().clamp_min(1)
        self.lin = torch.nn.Linear(x.shape[1], 1)
        opt = Adam(list(self.lin.parameters()), lr=0.05)
        for _ in range(200):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(self.lin(x)[:, 0], y, pos_weight=pos_w)
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.prev_head = int(torch.argmax(prev_hits))
        return self

    def predict(self, pairs_x):
        import torch

        with torch.no_grad():
            return self.lin((pairs_x - self.mu) / self.sd)[:, 0] > 0


def previous_token_hits(s, qpos, kpos):
    """Per head: how many queries whose previous position is among the keys put their largest score there (over
    the earlier keys); and how many such queries there are."""
    import torch

    qpos, kpos = np.asarray(qpos), np.asarray(kpos)
    earlier = torch.as_tensor(kpos[None, :] < qpos[:, None])
    s = s.masked_fill(~earlier[None], float("-inf"))
    has_prev = np.isin(qpos - 1, kpos)
    if not has_prev.any():
        return torch.zeros(s.shape[0]), 0
    best = torch.argmax(s[:, torch.as_tensor(has_prev)], dim=2)  # (H, queries with a previous key)
    want = torch.as_tensor(np.searchsorted(kpos, qpos[has_prev] - 1))
    return (best == want[None]).sum(1).float(), int(has_prev.sum())


# ------------------------------------------------------------------------------------------ the unseen positions
def prior_start(tm, prior) -> tuple:
    """The model's cache over the public context `prior` and its logits for the first position ((V,) zeros when
    there is no context: then position 0 is guessed as token 0)."""
    import torch

    from rshard_hpc.audit.torch_llama import cat_cache

    with torch.no_grad():
        if not prior:
            return tm.empty_cache(), torch.zeros(tm.cfg.vocab_size), 0
        logits, new = tm.extend(tm.empty_cache(), torch.as_tensor([list(prior)]), 0)
        return cat_cache(tm.empty_cache(), new), logits[0, -1], len(prior)


def lm_fill(tm, start, hyps, known):
    """Guess every unknown position with the model's argmax given the attacker's hypothesis so far, left to right
    (each guess joins the hypothesis). start: prior_start's (cache, first logits, offset); hyps: (B, n) long, the
    decoded tokens at known positions; known: (B, n) bool. Sequences of different lengths may be padded at the
    end (causal: padding changes nothing before it). Returns (B, n) long."""
    import torch

    cache, first, off = start
    B, n = hyps.shape
    cache = [(k.expand(B, *k.shape), v.expand(B, *v.shape)) for k, v in cache]  # one per sequence from here
    out = hyps.clone()
    guess = torch.argmax(first).expand(B)
    with torch.no_grad():
        for p in range(n):
            out[:, p] = torch.where(known[:, p], hyps[:, p], guess)
            if p == n - 1 or known[:, p + 1:].all():
                break
            logits, new = tm.extend(cache, out[:, p:p + 1], off + p)
            cache = [(torch.cat([kc, k], 1), torch.cat([vc, v], 1)) for (kc, vc), (k, v) in zip(cache, new)]
            guess = torch.argmax(logits[:, -1], dim=1)
    return out
