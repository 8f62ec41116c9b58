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
from rshard_hpc.plan.views import DEFAULT_VOCAB, INF, _first_unknown, node_report, plan_views, view_runs

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
    """Every node's view of one sequence of n positions under `spec`, and the plan's δ at that length."""
    comp, group = make_plan(spec, n)
    nodes = {}
    for name, view in plan_views(comp, group, spec.alpha, spec.beta).items():
        nodes[name] = node_report(view, n, public_prefix, vocab)
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
    explicit plans (edit the file)."""
    if spec.scheme == "explicit":
        return None
    layouts = sorted(((a, b) for a in range(1, search_max + 1) for b in range(1, search_max + 1)),
                     key=lambda ab: (world_size_for(*ab), ab[1], ab[0]))

    def first_reaching(c, c_a):
        for a, b in layouts:
            trial = replace(spec, alpha=a, beta=b, c=c, c_a=c_a)
            if job_delta(trial, lengths, public_prefix, stop_below=delta)["delta"] >= delta:
                return {"alpha": a, "beta": b, "c": c, "c_a": c_a, "world_size": world_size_for(a, b)}
        return None

    found = first_reaching(spec.c, spec.c_a)
    if found:
        return dict(found, chunks_changed=False)
    top = max(int(math.ceil(delta)) if delta != INF else 1, 1)
    best = None
    for c in range(spec.c, max(spec.c, top) + 1):
        for c_a in range(spec.c_a, max(spec.c_a, top) + 1):
            if (c, c_a) == (spec.c, spec.c_a):
                continue
            got = first_reaching(c, c_a)
            changed = (c != spec.c) + (c_a != spec.c_a)  # keep the user's chunk lengths where possible
            if got and (best is None or (changed, got["world_size"], c + c_a) < best[0]):
                best = ((changed, got["world_size"], c + c_a), got)
    best = best[1] if best else None
    return dict(best, chunks_changed=True) if best else None


def describe_layout(found: dict | None, spec: PlanSpec, delta: float, search_max: int = SEARCH_MAX) -> str:
    if spec.scheme == "explicit":
        return "an explicit plan keeps its own alpha and beta: change the plan file"
    if found is None:
        return (f"no layout with alpha, beta <= {search_max} and chunk lengths up to {delta:g} reaches delta={delta:g} "
                f"for these lengths")
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
    picks = np.unique(np.linspace(0, len(lengths) - 1, limit).round().astype(int))
    return [lengths[i] for i in picks]
