"""`rshard plan --collude N`: what the worst N colluding nodes see together (docs/privacy.md, "Colluding nodes").

Nodes run by one operator may pool what they received: their union view is the union of their views. The worst N
nodes are those whose union view holds the most positions, then the smallest δ (the smallest gap before a later
run of the union; 0 when it holds every position). Every N-subset is tried while there are at most EXACT_LIMIT of
them; above that the coalition is grown greedily (each step adds the node that makes the union worst), which the
report says.
"""
from __future__ import annotations

import math
from itertools import combinations

import numpy as np

from rshard_hpc.errors import InputError
from rshard_hpc.plan.views import (
    INF,
    blocks_of,
    format_blocks,
    min_interior_gap,
    sees_all,
    sorted_unique,
)

EXACT_LIMIT = 5000  # N-subsets tried one by one


def union_view(views: dict, names) -> np.ndarray:
    """The sorted positions any of `names` sees."""
    parts = [np.asarray(views[x], dtype=np.int64) for x in names]
    return sorted_unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def union_delta(union: np.ndarray, n: int, public_prefix: int = 0) -> float:
    """δ of a union view: 0 when it knows every position, else its smallest gap before a later run (inf: one run)."""
    return 0.0 if sees_all(union, n, public_prefix) else min_interior_gap(union, public_prefix)


def _worse(a: tuple, b: tuple | None) -> bool:
    """Is coalition score a = (seen, δ) worse for privacy than b (more seen, then smaller δ)?"""
    return b is None or a[0] > b[0] or (a[0] == b[0] and a[1] < b[1])


def check_collude(count: int, nodes: int) -> None:
    if count < 1:
        raise InputError(f"--collude must be >= 1, the number of colluding nodes (got {count})")
    if count > nodes:
        raise InputError(f"--collude {count} is more than the {nodes} nodes of this plan (CompNodes and AttnNodes)")


def worst_coalition(views: dict, n: int, count: int, public_prefix: int = 0) -> dict:
    """The `count` nodes whose union view is the worst (see the module): {"nodes", "seen", "fraction_seen",
    "delta", "sees_all", "positions", "method"}."""
    names = list(views)
    check_collude(count, len(names))
    seen_mask = np.zeros((len(names), n), dtype=bool)  # (nodes, n)
    for r, x in enumerate(names):
        seen_mask[r, np.asarray(views[x], dtype=np.int64)] = True

    def score(idx) -> tuple:
        union = np.flatnonzero(seen_mask[list(idx)].any(axis=0))
        return len(union), union_delta(union, n, public_prefix)

    best, chosen = None, ()
    if math.comb(len(names), count) <= EXACT_LIMIT:
        method = "every subset"
        for idx in combinations(range(len(names)), count):
            s = score(idx)
            if _worse(s, best):
                best, chosen = s, idx
    else:
        method = "greedy"
        for _ in range(count):
            step = None
            for r in range(len(names)):
                if r not in chosen:
                    s = score(chosen + (r,))
                    if _worse(s, step):
                        step, pick = s, r
            best, chosen = step, chosen + (pick,)
    union = union_view(views, [names[r] for r in chosen])
    return {"count": count, "nodes": [names[r] for r in chosen], "seen": len(union),
            "fraction_seen": len(union) / n if n else 0.0, "delta": best[1], "sees_all": sees_all(union, n, public_prefix),
            "positions": format_blocks(blocks_of(union[union >= public_prefix])), "method": method}


def render_collude(c: dict, n: int) -> list:
    """Text lines for `rshard plan`."""
    from rshard_hpc.dist.topology import node_label

    delta = "inf (one run)" if c["delta"] == INF else f"{c['delta']:g}"
    return [(f"worst {c['count']} colluding node{'s' if c['count'] > 1 else ''} ({c['method']}): "
             f"{', '.join(node_label(x) for x in c['nodes'])}"),
            f"  together see {c['seen']}/{n} ({100 * c['fraction_seen']:.1f}%), delta = {delta}: {c['positions']}"
            + ("  [SEE EVERY POSITION]" if c["sees_all"] else "")]
