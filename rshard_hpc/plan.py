"""Sharding plans (DESIGN §3), the per-step routing tables, and privacy accounting (§4).

A plan for a sequence of N positions is two int32 arrays:
  comp[p]  in [0, alpha): the CompNode that owns position p;
  group[p] in [0, beta):  p's index group (q goes to AttnNode row group[p], k/v to column group[p]).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from rshard_hpc.errors import InputError

SCHEMES = ("strided", "random", "explicit")
DEFAULT_DELTA = 2  # the δ `rshard run` requires unless told otherwise (docs/privacy.md says why)


@dataclass(frozen=True)
class PlanSpec:
    scheme: str = "strided"
    alpha: int = 1
    beta: int = 1
    c: int = 1  # CompNode chunk length
    c_a: int = 1  # index-group chunk length
    seed: int = 0  # for scheme "random"
    explicit: dict = field(default=None, compare=False, hash=False)  # {"comp": [...], "group": [...]}
    target_delta: int = DEFAULT_DELTA  # scheme "random": the CompNode gap its choices keep (DESIGN §4)

    def check(self) -> None:
        if self.scheme not in SCHEMES:
            raise InputError(f"unknown plan scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        if self.c < 1 or self.c_a < 1:
            raise InputError(f"chunk lengths must be >= 1 (got c={self.c}, c_a={self.c_a})")
        if self.scheme == "explicit" and not self.explicit:
            raise InputError("plan scheme 'explicit' needs a plan file (--plan-file)")

    def params(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "explicit"}
        return out


def make_plan(spec: PlanSpec, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(comp, group), each int32 of shape (n,), for a sequence of n positions."""
    p = np.arange(n, dtype=np.int64)
    if spec.scheme == "strided":
        comp = (p // spec.c) % spec.alpha
        group = (p // spec.c_a) % spec.beta
    elif spec.scheme == "random":
        rng = np.random.default_rng([spec.seed, n])
        # CompNode k's next chunk comes at least ceil(δ/c) chunks after its last one (when alpha allows it)
        comp_window = min(spec.alpha - 1, max(1, -(-spec.target_delta // spec.c)))
        comp = _random_chunks(rng, n, spec.c, spec.alpha, comp_window)
        group = _random_chunks(rng, n, spec.c_a, spec.beta, 1, third_distinct=True)
    else:
        comp, group = _explicit(spec, n)
    return comp.astype(np.int32), group.astype(np.int32)


def _random_chunks(rng, n: int, chunk: int, parts: int, window: int, third_distinct: bool = False) -> np.ndarray:
    """Chunks of `chunk` positions; each chunk's part is drawn uniformly among the parts not used by the
    `window` chunks before it (so a part's chunks are >= window * chunk positions apart). With
    `third_distinct` the third chunk also avoids the first two parts (3 parts in the first 3 chunks: no
    pair of index groups covers a sequence longer than 2 chunks)."""
    n_chunks = -(-n // chunk) if n else 0
    labels = np.zeros(n_chunks, dtype=np.int64)
    draws = rng.random(n_chunks)
    for t in range(n_chunks):
        allowed = list(range(parts))
        for back in range(2 if (third_distinct and t == 2) else window, 0, -1):  # widest window that leaves a part
            recent = set(labels[max(0, t - back):t].tolist())
            if len(recent) < parts:
                allowed = [x for x in range(parts) if x not in recent]
                break
        labels[t] = allowed[int(draws[t] * len(allowed))]
    return np.repeat(labels, chunk)[:n]


def _explicit(spec: PlanSpec, n: int) -> tuple[np.ndarray, np.ndarray]:
    comp = np.asarray(spec.explicit["comp"], dtype=np.int64)
    group = np.asarray(spec.explicit["group"], dtype=np.int64)
    if comp.shape != group.shape or comp.ndim != 1:
        raise InputError("explicit plan: 'comp' and 'group' must be lists of equal length")
    if len(comp) < n:
        raise InputError(f"explicit plan covers {len(comp)} positions, a sequence needs {n}")
    if comp.min(initial=0) < 0 or comp.max(initial=0) >= spec.alpha:
        raise InputError(f"explicit plan: 'comp' values must lie in [0, {spec.alpha})")
    if group.min(initial=0) < 0 or group.max(initial=0) >= spec.beta:
        raise InputError(f"explicit plan: 'group' values must lie in [0, {spec.beta})")
    return comp[:n], group[:n]


@dataclass
class StepTokens:
    """The tokens a step computes, in global order (by sequence, then position). All (n,) int32."""

    seq: np.ndarray  # batch-local sequence index
    pos: np.ndarray  # true position within its sequence
    comp: np.ndarray  # owning CompNode
    group: np.ndarray  # index group

    @classmethod
    def from_plans(cls, plans: list, positions: list) -> "StepTokens":
        """plans[b] = (comp, group) of sequence b; positions[b] = the positions of b in this step."""
        seq, pos, comp, group = [], [], [], []
        for b, ((c, g), ps) in enumerate(zip(plans, positions)):
            ps = np.asarray(ps, dtype=np.int64)
            seq.append(np.full(len(ps), b, dtype=np.int32))
            pos.append(ps.astype(np.int32))
            comp.append(c[ps])
            group.append(g[ps])
        cat = lambda xs: np.concatenate(xs).astype(np.int32) if xs else np.zeros(0, np.int32)
        return cls(cat(seq), cat(pos), cat(comp), cat(group))

    def __len__(self) -> int:
        return len(self.seq)


class Routing:
    """Who sends which rows to whom in one step; built once per step and reused by every layer.

    CompNode k holds its tokens in global order (`comp_tokens[k]`, indices into the step).
    `by_group[k][g]` are indices into k's local rows of its tokens of group g: those rows go as q
    to AttnNode row g and as k/v to AttnNode column g. AttnNode (i, j) stacks, over k = 0 … alpha-1,
    the q rows by_group[k][i] and the k/v rows by_group[k][j].
    """

    def __init__(self, tokens: StepTokens, alpha: int, beta: int):
        self.tokens = tokens
        self.alpha, self.beta = alpha, beta
        self.comp_tokens = [np.flatnonzero(tokens.comp == k) for k in range(alpha)]
        self.by_group = []
        for k in range(alpha):
            local_group = tokens.group[self.comp_tokens[k]]
            self.by_group.append([np.flatnonzero(local_group == g) for g in range(beta)])
        # counts[k, g]: tokens of CompNode k in group g
        self.counts = np.array([[len(ix) for ix in row] for row in self.by_group], dtype=np.int64)

    def attn_q_tokens(self, i: int) -> np.ndarray:
        """Step indices of the queries AttnNode row i receives, in arrival order."""
        return np.concatenate([self.comp_tokens[k][self.by_group[k][i]] for k in range(self.alpha)])

    def attn_kv_tokens(self, j: int) -> np.ndarray:
        """Step indices of the keys/values AttnNode column j receives, in arrival order."""
        return self.attn_q_tokens(j)


# ---------------------------------------------------------------- views, runs and gaps (§4)
# The rest of the privacy accounting (reports, δ of a job, layout search, ledgers) is in privacy.py.

def comp_name(k: int) -> str:
    return f"comp{k}"


def attn_name(i: int, j: int) -> str:
    return f"attn{i}_{j}"


def run_bounds(sorted_positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) int64 of the maximal runs of consecutive positions in a sorted unique array."""
    sorted_positions = np.asarray(sorted_positions, dtype=np.int64)
    if len(sorted_positions) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    breaks = np.flatnonzero(np.diff(sorted_positions) != 1) + 1
    first = np.concatenate([[0], breaks])
    last = np.concatenate([breaks, [len(sorted_positions)]])
    return sorted_positions[first], (last - first).astype(np.int64)


def runs_of(positions: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of consecutive positions in a sorted array, as (start, length)."""
    starts, lengths = run_bounds(positions)
    return list(zip(starts.tolist(), lengths.tolist()))


def plan_views(comp: np.ndarray, group: np.ndarray, alpha: int, beta: int) -> dict:
    """Positions seen by every node: CompNode k -> comp == k; AttnNode (i, j) -> group i ∪ group j."""
    views = {comp_name(k): np.flatnonzero(comp == k) for k in range(alpha)}
    for i in range(beta):
        for j in range(beta):
            views[attn_name(i, j)] = np.flatnonzero((group == i) | (group == j))
    return views


def view_runs(view, public_prefix: int = 0):
    """(starts, lengths, gaps) of a node's runs, public positions counted as seen.

    gaps[r] is the number of unseen positions just before run r (for the first run: from position 0, or from
    the end of the public prefix). A run of public positions alone is not the node's run."""
    view = np.asarray(view, dtype=np.int64)
    known = np.union1d(view, np.arange(public_prefix)) if public_prefix else np.unique(view)
    starts, lengths = run_bounds(known)
    origin = 0
    if len(starts) and starts[0] + lengths[0] <= public_prefix:  # public positions only
        starts, lengths, origin = starts[1:], lengths[1:], int(public_prefix)
    ends = starts + lengths
    gaps = starts - np.concatenate([[origin], ends[:-1]]).astype(np.int64)
    return starts, lengths, gaps


def min_interior_gap(view: np.ndarray, public_prefix: int = 0) -> float:
    """Smallest unseen gap before any run after the view's first run (inf if the view has one run).

    The first run of a view is reported apart (first-run exposure, DESIGN §4): whoever holds it can
    recover it. Public positions (a BOS or template prefix) count as seen."""
    later = view_runs(view, public_prefix)[2][1:]
    return float(later.min()) if len(later) else float("inf")
