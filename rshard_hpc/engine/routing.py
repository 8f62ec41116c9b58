"""Per-step routing (architecture.md §3): which tokens a step computes and who sends which rows to whom; built
once per step and reused by every layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rshard_hpc.ops.arrays import xp_of


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

    def subset(self, a: int, b: int) -> "StepTokens":
        """Tokens a … b-1 (a micro-batch's lane: engine/micro.py), as views."""
        return StepTokens(self.seq[a:b], self.pos[a:b], self.comp[a:b], self.group[a:b])


class Routing:
    """Who sends which rows to whom in one step; built once per step and reused by every layer.

    CompNode k holds its tokens in global order (`comp_tokens[k]`, indices into the step).
    `by_group[k][g]` are indices into k's local rows of its tokens of group g: those rows go as q
    to AttnNode row g and as k/v to AttnNode column g. AttnNode (i, j) stacks, over k = 0 … alpha-1,
    the q rows by_group[k][i] and the k/v rows by_group[k][j].
    """

    def __init__(self, tokens: StepTokens, alpha: int, beta: int):
        self.alpha = alpha
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


def step_tokens(plans, ranges) -> StepTokens:
    return StepTokens.from_plans(plans, [np.arange(a, b) for a, b in ranges])


WANTS = ("all", "last", "sums")  # what a step returns to the client: every row, each sequence's last, its sums


def wanted_local_rows(tokens: StepTokens, routing: Routing, k: int, want: str) -> np.ndarray:
    """Indices into CompNode k's local rows of the rows the client receives ("all" or "last")."""
    mine = routing.comp_tokens[k]
    if want == "all":
        return np.arange(len(mine))
    last = np.zeros(len(tokens), dtype=bool)
    last[last_of_each_sequence(tokens)] = True
    return np.flatnonzero(last[mine])


def last_of_each_sequence(tokens: StepTokens) -> np.ndarray:
    """Step indices of the highest position of each sequence in the step (tokens are in global order)."""
    return sequence_ends(tokens.seq)


def sequence_ends(seq: np.ndarray) -> np.ndarray:
    """Indices of the last row of each sequence in rows ordered by sequence (seq (n,) ascending)."""
    return np.flatnonzero(np.diff(np.append(seq, -1)) != 0)


def sequence_sums(rows, seq: np.ndarray):
    """rows (n, d) float32 of one CompNode, in step order; seq (n,) their sequences (ascending) -> (m, 2 d) float32:
    for each of the m sequences present, the float64 sum of its rows as two float32 halves (high, then the rest),
    so that a float32 wire carries it whole. Sums in float64 by a running sum (one pass, deterministic)."""
    xp = xp_of(rows)
    n, width = rows.shape
    if n == 0:
        return xp.zeros((0, 2 * width), dtype=xp.float32)
    ends = sequence_ends(seq)
    running = xp.cumsum(rows.astype(xp.float64), axis=0)[xp.asarray(ends)]  # (m, d)
    sums = running - xp.concatenate([xp.zeros((1, width), xp.float64), running[:-1]])
    high = sums.astype(xp.float32)
    return xp.concatenate([high, (sums - high).astype(xp.float32)], axis=1)


def add_sequence_sums(total: np.ndarray, seq_of_rows: np.ndarray, halves: np.ndarray) -> None:
    """Add one CompNode's sequence_sums (m, 2 d) to total (n_seq, d) float64; seq_of_rows: the sequences of the rows
    it summed (ascending), whose ends give its m sequences in sequence_sums' order."""
    width = total.shape[1]
    seqs = seq_of_rows[sequence_ends(seq_of_rows)]
    total[seqs] += halves[:, :width].astype(np.float64) + halves[:, width:].astype(np.float64)
