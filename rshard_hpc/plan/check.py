"""The run check of `rshard run` (architecture.md §4): a job's δ over its prompt lengths, the refusal below
--min-delta, and the search for the smallest layout reaching a δ.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from rshard_hpc.dist.topology import node_label, world_size_for
from rshard_hpc.plan.ledger import visible_key_counts
from rshard_hpc.plan.schemes import PlanSpec, make_plan
from rshard_hpc.plan.views import (DEFAULT_VOCAB, INF, _first_unknown, blocks_of, format_blocks, node_report,
                                   plan_views, sorted_unique, view_runs)

SEARCH_MAX = 8  # the layout search tries alpha, beta in 1 … SEARCH_MAX


def partial_summary(comp: np.ndarray, group: np.ndarray, k: int, beta: int, causal: bool) -> dict:
    """Partials CompNode k receives for one sequence, by how many keys they cover.

    under_two_keys (empty + single_key): partials over fewer than two keys (a single-key partial is that
    key's v). one_foreign_key: partials with exactly one key outside k's own positions; since k holds its
    own q, k, v and receives the lse, it can solve such a partial for that foreign key's v."""
    mine = np.flatnonzero(comp == k)
    keys = visible_key_counts(group, mine, beta, causal)
    foreign = visible_key_counts(group, mine, beta, causal, keys_mask=comp != k)
    return {"partials": int(keys.size), "under_two_keys": int((keys < 2).sum()), "empty": int((keys == 0).sum()),
            "single_key": int((keys == 1).sum()), "one_foreign_key": int((foreign == 1).sum())}


# ------------------------------------------------------------------------------------------ plan report
def plan_report(spec: PlanSpec, n: int, public_prefix: int = 0, vocab: int = DEFAULT_VOCAB,
                causal: bool = True) -> dict:
    """Every node's view of one sequence of n positions under `spec`, and the plan's δ at that length.

    A node's "positions" are those of its view past the public prefix: its runs are of its known positions
    (architecture.md §4), so each listed run is one run of the report (the first may reach back into the prefix)
    and a public position alone is none. "seen" and "fraction_seen" count its whole view."""
    comp, group = make_plan(spec, n)
    nodes = {}
    for name, view in plan_views(comp, group, spec.alpha, spec.beta).items():
        nodes[name] = node_report(view, n, public_prefix, vocab)
        nodes[name]["positions"] = format_blocks(blocks_of(view[view >= public_prefix]))
        if name.startswith("comp"):
            nodes[name]["partials"] = partial_summary(comp, group, int(name[4:]), spec.beta, causal)
    whole = [name for name, r in nodes.items() if r["sees_all"]]
    delta = 0.0 if whole else min((r["min_gap"] for r in nodes.values()), default=INF)
    return {"n": n, "public_prefix": public_prefix, "vocab": vocab, "causal": causal, "delta": delta,
            "seen_whole_by": whole, "nodes": nodes}


def _evaluate(spec: PlanSpec, n: int, public_prefix: int) -> tuple[float, tuple, list, dict]:
    """At length n, the fast path of plan_report: (smallest later gap over the nodes not seeing all,
    (node, run start) where it is, nodes seeing all, node -> first unknown position)."""
    comp, group = make_plan(spec, n)
    gap, where, whole, first_unknown = INF, None, [], {}
    for name, view in plan_views(comp, group, spec.alpha, spec.beta).items():
        first_unknown[name] = _first_unknown(view, n, public_prefix)
        if n > public_prefix and first_unknown[name] == n:
            whole.append(name)
            continue
        starts, _, gaps = view_runs(view, public_prefix)
        if len(gaps) > 1 and gaps[1:].min() < gap:
            r = 1 + int(np.argmin(gaps[1:]))
            gap, where = float(gaps[r]), (name, int(starts[r]))
    return gap, where, whole, first_unknown


def job_delta(spec: PlanSpec, lengths, public_prefix: int = 0, stop_below: float | None = None) -> dict:
    """The δ `rshard run` checks for a job whose sequences (plan lengths) are `lengths`.

    δ is the smallest gap before a later run over every node and every length, and 0 when a node sees every
    position of the *longest* sequence (then the plan itself hides nothing, as with beta = 2). Shorter
    sequences that some node sees whole are listed in `exposed` (no plan splits a prompt of a token or two:
    it is first-run exposure in full) and do not lower δ. For strided and explicit plans a shorter sequence's
    plan is a prefix of the longest one's, so its gaps are among the longest one's and one evaluation answers
    for all lengths; random plans are drawn per length and checked at each. With `stop_below`, the
    evaluation stops as soon as δ is known to be below it (`exposed` is then incomplete)."""
    lengths = sorted({int(x) for x in lengths})
    if not lengths:
        return {"delta": INF, "longest": 0, "seen_whole_by": [], "exposed": {}, "smallest_gap_at": None}
    longest = lengths[-1]
    gap, where, whole, first_unknown = _evaluate(spec, longest, public_prefix)
    delta = 0.0 if whole else gap
    exposed = {}
    for n in lengths[:-1]:
        if stop_below is not None and delta < stop_below:
            break
        if n <= public_prefix:
            continue
        if spec.scheme == "random":
            gap_n, where_n, names, _ = _evaluate(spec, n, public_prefix)
            if gap_n < delta:
                delta, where = gap_n, where_n
        else:
            names = [name for name, u in first_unknown.items() if u >= n]
        if names:
            exposed[n] = names
    return {"delta": delta, "longest": longest, "seen_whole_by": whole, "exposed": exposed,
            "smallest_gap_at": None if whole or where is None else {"node": where[0], "start": where[1]}}


def smallest_layout(spec: PlanSpec, lengths, delta: float, public_prefix: int = 0,
                    search_max: int = SEARCH_MAX) -> dict | None:
    """The layout with the fewest ranks (1 + alpha + beta²; then the smaller beta) reaching `delta` on
    `lengths`, keeping the scheme, seed and chunk lengths. When no alpha, beta <= search_max does, chunk lengths
    up to delta are tried too, changing as few of them as possible (reported with "chunks_changed"). None for
    explicit plans (edit the file).

    Strided layouts are found in closed form (strided_delta; the same answer as trying every layout, which
    tests/plan checks), so the search costs O(longest length) whatever delta and search_max are. The random
    scheme guarantees the strided gaps (docs/privacy.md): its answer is the strided one, kept only when this
    seed's draws at every length reach delta (None otherwise)."""
    if spec.scheme == "explicit":
        return None
    lengths = [int(x) for x in lengths]
    found = _strided_search(spec, max(lengths, default=0), delta, public_prefix, search_max)
    if found and spec.scheme == "random":
        trial = replace(spec, alpha=found["alpha"], beta=found["beta"], c=found["c"], c_a=found["c_a"])
        if job_delta(trial, lengths, public_prefix, stop_below=delta)["delta"] < delta:
            return None
    return found


# ------------------------------------------------------------------------------------------ strided closed form
def _chunks_met(n: int, chunk, public_prefix: int):
    """How many chunks of `chunk` positions meet the non-public positions [public_prefix, n) (n > public_prefix);
    `chunk` may be an int array."""
    return (n - 1) // chunk - public_prefix // chunk + 1


def strided_delta(spec: PlanSpec, n: int, public_prefix: int = 0) -> float:
    """δ of a strided plan at length n in closed form, equal to job_delta's enumeration (tests/plan compare them).

    Over the chunks of c positions meeting [public_prefix, n): with one chunk, or alpha = 1, a CompNode sees every
    position (δ = 0); past alpha chunks some CompNode has two, and every gap between them is (alpha−1)·c; with at
    most alpha chunks each CompNode has one run (no gap). Over the chunks of c_a: with beta <= 2, or at most two
    chunks, some AttnNode sees every position (δ = 0); else AttnNode (g, g+2) has the gap c_a of the chunk between,
    and no AttnNode gap is smaller (architecture.md §4)."""
    if n <= public_prefix:
        return INF
    comp_chunks, attn_chunks = _chunks_met(n, spec.c, public_prefix), _chunks_met(n, spec.c_a, public_prefix)
    comp = 0.0 if spec.alpha == 1 or comp_chunks == 1 else (
        float((spec.alpha - 1) * spec.c) if comp_chunks > spec.alpha else INF)
    attn = 0.0 if spec.beta <= 2 or attn_chunks <= 2 else float(spec.c_a)
    return min(comp, attn)


def _fewest_alpha(c, n: int, public_prefix: int, delta: float, search_max: int) -> np.ndarray:
    """Per CompNode chunk length c (int array): the fewest CompNodes (<= search_max) whose gaps all reach delta,
    0 where there is none (strided_delta's CompNode part, solved for alpha)."""
    chunks = _chunks_met(n, c, public_prefix)
    by_gap = 1 + np.ceil(delta / c) if delta != INF else chunks  # (alpha − 1)·c >= delta
    alpha = np.maximum(2, np.minimum(chunks, by_gap)).astype(np.int64)  # or one chunk each: no gap at all
    return np.where((chunks >= 2) & (alpha <= search_max), alpha, 0)


def _fewest_beta(c_a, n: int, public_prefix: int, delta: float, search_max: int) -> np.ndarray:
    """Per index-group chunk length c_a (int array): 3 where beta = 3 reaches delta (then any beta >= 3 does and
    none below), else 0."""
    ok = (_chunks_met(n, c_a, public_prefix) >= 3) & (c_a >= delta) & (search_max >= 3)
    return np.where(ok, 3, 0)


def _strided_search(spec: PlanSpec, n: int, delta: float, public_prefix: int, search_max: int) -> dict | None:
    """smallest_layout for a strided plan whose longest sequence has n positions, from strided_delta: the alpha
    and beta conditions are independent, so the fewest ranks take the fewest of each."""
    if delta <= 0 or n <= public_prefix:  # every layout reaches delta: the first one
        return _layout(1, 1, spec.c, spec.c_a, False)
    args = (n, public_prefix, delta, search_max)
    alpha, beta = int(_fewest_alpha(np.array([spec.c]), *args)[0]), int(_fewest_beta(np.array([spec.c_a]), *args)[0])
    if alpha and beta:
        return _layout(alpha, beta, spec.c, spec.c_a, False)
    top = max(math.ceil(delta) if delta != INF else 1, 1)
    more_c, more_ca = _best_chunk(_fewest_alpha, spec.c, top, args), _best_chunk(_fewest_beta, spec.c_a, top, args)
    options = []  # (chunk lengths changed, alpha, beta, c, c_a), in the order trying every (c, c_a) meets them
    if alpha and more_ca:
        options.append((1, alpha, more_ca[0], spec.c, more_ca[1]))
    if beta and more_c:
        options.append((1, more_c[0], beta, more_c[1], spec.c_a))
    if more_c and more_ca:
        options.append((2, more_c[0], more_ca[0], more_c[1], more_ca[1]))
    if not options:
        return None
    _, a, b, c, c_a = min(options, key=lambda o: (o[0], world_size_for(o[1], o[2]), o[3] + o[4]))  # ties: the first
    return _layout(a, b, c, c_a, True)


def _best_chunk(fewest, chunk: int, top: int, args) -> tuple[int, int] | None:
    """Among the chunk lengths above `chunk` up to `top` (and below n: a chunk of n positions is seen whole),
    the shortest of those needing the fewest nodes: (nodes, chunk length), or None."""
    more = np.arange(chunk + 1, min(max(chunk, top), args[0] - 1) + 1)
    nodes = fewest(more, *args)
    if not nodes.any():
        return None
    i = int(np.argmin(np.where(nodes > 0, nodes, np.iinfo(np.int64).max)))
    return int(nodes[i]), int(more[i])


def _layout(alpha: int, beta: int, c: int, c_a: int, changed: bool) -> dict:
    return {"alpha": alpha, "beta": beta, "c": c, "c_a": c_a, "world_size": world_size_for(alpha, beta),
            "chunks_changed": changed}


def describe_layout(found: dict | None, spec: PlanSpec, delta: float, search_max: int = SEARCH_MAX) -> str:
    if spec.scheme == "explicit":
        return "an explicit plan keeps its own alpha and beta: change the plan file"
    if found is None:
        checked = (" (random plans: the layout the scheme's guarantees give was checked on these draws)"
                   if spec.scheme == "random" else "")
        return (f"no layout with alpha, beta <= {search_max} and chunk lengths up to {delta:g} reaches delta={delta:g} "
                f"for these lengths{checked}")
    chunks = f" --c {found['c']} --c-a {found['c_a']}" if found["chunks_changed"] else ""
    why = (f" (none does with c={spec.c}, c_a={spec.c_a})" if found["chunks_changed"] else "")
    return (f"the smallest layout reaching delta={delta:g} is --alpha {found['alpha']} --beta {found['beta']}{chunks} "
            f"(mpiexec -n {found['world_size']}){why}")


# ------------------------------------------------------------------------------------------ the run check
def check_job(spec: PlanSpec, lengths, min_delta: float, public_prefix: int = 0) -> dict:
    """The check `rshard run` makes before any work: {"ok", "delta", "exposed", "message", …}."""
    got = job_delta(spec, lengths, public_prefix)
    ok = got["delta"] >= min_delta
    out = dict(got, required=min_delta, ok=ok, public_prefix=public_prefix, message="", suggestion=None)
    if not ok:
        found = smallest_layout(spec, lengths, min_delta, public_prefix)
        out["suggestion"] = found
        if got["seen_whole_by"]:
            why = (f"{node_label(got['seen_whole_by'][0])} sees every position of a {got['longest']}-position "
                   f"sequence")
        else:
            at = got["smallest_gap_at"]
            why = (f"{node_label(at['node'])} sees position {at['start']} after {got['delta']:g} unseen "
                   f"position{'s' if got['delta'] != 1 else ''}")
        out["message"] = (
            f"plan {spec.scheme} alpha={spec.alpha} beta={spec.beta} c={spec.c} c_a={spec.c_a} has "
            f"delta={got['delta']:g} on these prompts ({why}; public prefix {public_prefix}), below the required "
            f"--min-delta {min_delta:g}; {describe_layout(found, spec, min_delta)}. "
            f"Pass --allow-weak-plan to run it anyway (docs/privacy.md)")
    return out


def report_lengths(lengths, limit: int = 32) -> list[int]:
    """At most `limit` of the distinct lengths for the per-length report: all when few, else the shortest,
    the longest and evenly spread ones between (the job's δ covers every length regardless)."""
    lengths = sorted({int(x) for x in lengths})
    if len(lengths) <= limit:
        return lengths
    picks = sorted_unique(np.linspace(0, len(lengths) - 1, limit).round().astype(int))
    return [lengths[i] for i in picks]
