"""Views, runs and gaps (architecture.md §4), plain NumPy.

Vocabulary (docs/privacy.md has the long form):
  view        the positions a node receives rows of: CompNode k {p : comp[p] = k}; AttnNode (i, j) group i ∪ j.
  known       view ∪ the public prefix [0, public_prefix) (BOS, [CLS], a template: known to everyone).
  run         a maximal stretch of consecutive known positions; a run of public positions alone is no run.
  gap         the unseen positions just before a run; recovering the run by vocab-matching costs about
              V^(gap+1) forward passes, reported as the exponent log10 V^(gap+1) = (gap+1)·log10 V.
  first run   a node's first run, reported apart as first-run exposure (its holder can recover it).
  δ           the smallest gap before any later run, over all nodes; 0 when a node sees every position.
"""
from __future__ import annotations

import math

import numpy as np

from rshard_hpc.dist.topology import attn_name, comp_name


def sorted_unique(positions) -> np.ndarray:
    """The sorted distinct values of an int array (np.unique, which hashes and is slow on long arrays in
    NumPy 2.x: a sort and a compare instead)."""
    a = np.sort(np.asarray(positions, dtype=np.int64).ravel())
    return a[np.concatenate([[True], a[1:] != a[:-1]])] if a.size else a


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
    known = sorted_unique(np.concatenate([view, np.arange(public_prefix)]) if public_prefix else view)
    starts, lengths = run_bounds(known)
    origin = 0
    if len(starts) and starts[0] + lengths[0] <= public_prefix:  # public positions only
        starts, lengths, origin = starts[1:], lengths[1:], int(public_prefix)
    ends = starts + lengths
    gaps = starts - np.concatenate([[origin], ends[:-1]]).astype(np.int64)
    return starts, lengths, gaps


def min_interior_gap(view: np.ndarray, public_prefix: int = 0) -> float:
    """Smallest unseen gap before any run after the view's first run (inf if the view has one run).

    The first run of a view is reported apart (first-run exposure, architecture.md §4): whoever holds it can
    recover it. Public positions (a BOS or template prefix) count as seen."""
    later = view_runs(view, public_prefix)[2][1:]
    return float(later.min()) if len(later) else float("inf")


DEFAULT_VOCAB = 49152  # SmolLM2's vocabulary; `--model` replaces it with the model's own


INF = float("inf")


# ------------------------------------------------------------------------------------------ compact positions
def blocks_of(positions) -> list[list[int]]:
    """Sorted unique positions as blocks [start, length, period, count]: `count` runs of `length` positions
    starting at start, start + period, … (period 0 when count is 1). A strided view is one or two blocks."""
    starts, lengths = run_bounds(sorted_unique(positions))
    return _merge_runs(np.zeros(len(starts), np.int64), starts, lengths).get(0, [])


def blocks_by_owner(owner, positions) -> dict:
    """{owner: blocks_of(its positions)} for many owners at once (e.g. sequences of a batch): owner and positions
    are (n,) ints; one sort for all of them, and the runs merged into blocks for all owners together."""
    owner, positions = np.asarray(owner, dtype=np.int64), np.asarray(positions, dtype=np.int64)
    if not owner.size:
        return {}
    order = np.lexsort((positions, owner))
    owner, positions = owner[order], positions[order]
    keep = np.concatenate([[True], (owner[1:] != owner[:-1]) | (positions[1:] != positions[:-1])])
    owner, positions = owner[keep], positions[keep]
    new_run = np.concatenate([[True], (owner[1:] != owner[:-1]) | (np.diff(positions) != 1)])
    first = np.flatnonzero(new_run)
    lengths = np.diff(np.append(first, len(positions)))
    return _merge_runs(owner[first], positions[first], lengths)


def _merge_runs(owner: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> dict:
    """{owner: blocks}: each owner's runs (owner ascending, then starts ascending) grouped greedily into blocks: a
    run joins its owner's last block when it has the block's length and, past the block's second run, follows at
    the block's period. The tests between neighbouring runs are array operations; Python steps once a block."""
    n = len(starts)
    if n == 0:
        return {}
    same = np.zeros(n + 1, dtype=bool)  # same[i]: run i may join a block whose last run is i - 1 (index n: never)
    same[1:n] = (owner[1:] == owner[:-1]) & (lengths[1:] == lengths[:-1])
    gap = np.diff(starts, prepend=starts[0])  # gap[i] = starts[i] - starts[i-1]
    steady = np.zeros(n + 1, dtype=bool)  # steady[i]: run i continues a block whose period is gap[i-1]
    steady[2:n] = same[2:n] & same[1:n - 1] & (gap[2:] == gap[1:-1])
    breaks = np.flatnonzero(~steady)  # steady[n] is False: every search ends
    end_after = breaks[np.searchsorted(breaks, np.arange(n + 1))]  # the first i' >= i with steady[i'] False
    starts_l, lengths_l, owner_l, gap_l, same_l, end_l = (a.tolist() for a in (starts, lengths, owner, gap, same,
                                                                               end_after))
    out: dict = {}
    a = 0
    while a < n:
        if same_l[a + 1]:  # a second run: the block's period is its gap; the block runs up to the first unsteady run
            b = end_l[a + 2] - 1  # a + 2 <= n: same[n] is False
            block = [starts_l[a], lengths_l[a], gap_l[a + 1], b - a + 1]
        else:
            b, block = a, [starts_l[a], lengths_l[a], 0, 1]
        out.setdefault(owner_l[a], []).append(block)
        a = b + 1
    return out


def expand_blocks(blocks) -> np.ndarray:
    """The sorted positions of blocks_of's output."""
    parts = [np.arange(s + t * p, s + t * p + n) for s, n, p, count in blocks for t in range(count)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def expand_blocks_many(block_lists) -> tuple[np.ndarray, np.ndarray]:
    """(owner, positions) (n,) int64: the positions of every blocks_of output in block_lists, each in
    expand_blocks's order, owner[t] the index of the list position t came from."""
    rows = [(i, *b) for i, blocks in enumerate(block_lists) for b in blocks]
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    owner, start, length, period, count = np.asarray(rows, dtype=np.int64).T
    run_block = np.repeat(np.arange(len(rows)), count)  # (runs,)
    step = np.arange(len(run_block)) - np.repeat(np.cumsum(count) - count, count)
    run_start, run_length = start[run_block] + step * period[run_block], length[run_block]
    run_of = np.repeat(np.arange(len(run_block)), run_length)  # (n,)
    offset = np.arange(len(run_of)) - np.repeat(np.cumsum(run_length) - run_length, run_length)
    return owner[run_block][run_of], run_start[run_of] + offset


def format_blocks(blocks) -> str:
    """Blocks as text: '0-1, 6-7, …, 234-235 (40 runs, every 6)'."""
    def one(start, length):
        return f"{start}" if length == 1 else f"{start}-{start + length - 1}"

    out = []
    for s, n, p, count in blocks:
        if count == 1:
            out.append(one(s, n))
        elif count == 2:
            out.append(f"{one(s, n)}, {one(s + p, n)}")
        else:
            out.append(f"{one(s, n)}, {one(s + p, n)}, …, {one(s + (count - 1) * p, n)} ({count} runs, every {p})")
    return ", ".join(out) if out else "none"


def rle(values) -> list[list[int]]:
    """Run-length code [[value, repeat], …] of a sequence of ints (rle_by_owner with one owner)."""
    values = np.asarray(values, dtype=np.int64).ravel()
    return rle_by_owner(np.zeros(values.size, np.int64), values).get(0, [])


def rle_by_owner(owner, values) -> dict:
    """{owner: rle(its values)} for a whole array at once; owner (n,) sorted (equal owners together)."""
    owner, values = np.asarray(owner, dtype=np.int64), np.asarray(values, dtype=np.int64)
    if not owner.size:
        return {}
    change = (owner[1:] != owner[:-1]) | (values[1:] != values[:-1])
    first = np.flatnonzero(np.concatenate([[True], change]))
    pairs = np.stack([values[first], np.diff(np.append(first, values.size))], axis=1).tolist()
    run_owner = owner[first]
    cuts = (np.flatnonzero(run_owner[1:] != run_owner[:-1]) + 1).tolist()
    bounds = zip([0] + cuts, cuts + [len(first)])
    return {int(run_owner[a]): pairs[a:b] for a, b in bounds}


def unrle(pairs) -> np.ndarray:
    return np.repeat([v for v, _ in pairs], [n for _, n in pairs]).astype(np.int64) if pairs else np.zeros(0, np.int64)


# ------------------------------------------------------------------------------------------ runs, gaps, views
def _first_unknown(view, n: int, public_prefix: int) -> int:
    """The first position in [0, n) that a node neither sees nor knows (n when it knows them all)."""
    known = np.zeros(n, dtype=bool)
    known[: min(public_prefix, n)] = True
    known[np.asarray(view, dtype=np.int64)] = True
    missing = np.flatnonzero(~known)
    return int(missing[0]) if len(missing) else n


def sees_all(view, n: int, public_prefix: int = 0) -> bool:
    """True when a node knows every position of a sequence that has at least one non-public position."""
    return n > public_prefix and _first_unknown(view, n, public_prefix) == n


def cost_log10(gap, vocab: int):
    """log10 of V^(gap+1): the forward passes a vocab-matching attacker needs to recover a run's first token."""
    return (np.asarray(gap, dtype=np.float64) + 1.0) * math.log10(vocab)


def node_report(view, n: int, public_prefix: int = 0, vocab: int = DEFAULT_VOCAB) -> dict:
    """One node's view of one sequence: fraction seen, positions, runs (gap and cost exponent each),
    first-run exposure, smallest later gap."""
    view = np.asarray(view, dtype=np.int64)
    starts, lengths, gaps = view_runs(view, public_prefix)
    costs = cost_log10(gaps, vocab)
    later = gaps[1:]
    first = None
    if len(starts):
        first = {"start": int(starts[0]), "length": int(lengths[0]), "gap": int(gaps[0]),
                 "cost_log10": round(float(costs[0]), 3)}
    return {
        "seen": int(len(view)),
        "fraction_seen": (len(view) / n) if n else 0.0,
        "positions": format_blocks(blocks_of(view)),
        "n_runs": int(len(starts)),
        "runs": _run_groups(starts, lengths, gaps, costs),
        "first_run": first,
        "min_gap": float(later.min()) if len(later) else INF,
        "min_cost_log10": round(float(cost_log10(later.min(), vocab)), 3) if len(later) else INF,
        "sees_all": sees_all(view, n, public_prefix),
    }


def _run_groups(starts, lengths, gaps, costs) -> list[dict]:
    """Runs with equal length and gap at a constant period, grouped: {start, length, gap, cost_log10, count, period}."""
    groups: list[dict] = []
    for s, n, g, c in zip(starts.tolist(), lengths.tolist(), gaps.tolist(), costs.tolist()):
        if groups:
            last = groups[-1]
            last_start = last["start"] + (last["count"] - 1) * last["period"]
            if last["length"] == n and last["gap"] == g and (last["count"] == 1 or s - last_start == last["period"]):
                if last["count"] == 1:
                    last["period"] = s - last["start"]
                last["count"] += 1
                continue
        groups.append({"start": s, "length": n, "gap": g, "cost_log10": round(c, 3), "count": 1, "period": 0})
    return groups
