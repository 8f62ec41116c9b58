"""Privacy you can check (DESIGN §4): what every node sees under a plan, the run check of `rshard run`,
the search for the smallest layout reaching a δ, and the visibility ledger. Plain NumPy, no MPI.

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
from dataclasses import replace

import numpy as np

from rshard_hpc.plan import (DEFAULT_DELTA, PlanSpec, attn_name, comp_name, make_plan, plan_views, run_bounds,
                              view_runs)
from rshard_hpc.topology import world_size_for

DEFAULT_VOCAB = 49152  # SmolLM2's vocabulary; `--model` replaces it with the model's own
SEARCH_MAX = 8  # the layout search tries alpha, beta in 1 … SEARCH_MAX
INF = float("inf")


# ------------------------------------------------------------------------------------------ names and layout
def node_label(name: str) -> str:
    """'comp1' -> 'CompNode 1', 'attn0_2' -> 'AttnNode (0, 2)'."""
    if name.startswith("comp"):
        return f"CompNode {name[4:]}"
    if name.startswith("attn"):
        i, j = name[4:].split("_")
        return f"AttnNode ({i}, {j})"
    return name


def node_of(topo) -> str:
    """The plan-view name of a topology's rank ('client' for rank 0)."""
    if topo.role == "comp":
        return comp_name(topo.comp_index)
    if topo.role == "attn":
        return attn_name(*topo.attn_coords)
    return "client"


def rank_layout(alpha: int, beta: int) -> list[dict]:
    """Which world rank is which node (DESIGN §2, as Topology.build splits COMM_WORLD)."""
    rows = [{"rank": 0, "node": "client", "label": "client"}]
    rows += [{"rank": 1 + k, "node": comp_name(k), "label": node_label(comp_name(k))} for k in range(alpha)]
    for i in range(beta):
        for j in range(beta):
            name = attn_name(i, j)
            rows.append({"rank": 1 + alpha + i * beta + j, "node": name, "label": node_label(name)})
    return rows


# ------------------------------------------------------------------------------------------ compact positions
def blocks_of(positions) -> list[list[int]]:
    """Sorted unique positions as blocks [start, length, period, count]: `count` runs of `length` positions
    starting at start, start + period, … (period 0 when count is 1). A strided view is one or two blocks."""
    runs = run_bounds(np.unique(np.asarray(positions, dtype=np.int64)))
    blocks: list[list[int]] = []
    for start, length in zip(*runs):
        start, length = int(start), int(length)
        if blocks:
            b = blocks[-1]
            last = b[0] + (b[3] - 1) * b[2]
            if b[1] == length and (b[3] == 1 or start - last == b[2]):
                if b[3] == 1:
                    b[2] = start - b[0]
                b[3] += 1
                continue
        blocks.append([start, length, 0, 1])
    return blocks


def expand_blocks(blocks) -> np.ndarray:
    """The sorted positions of blocks_of's output."""
    parts = [np.arange(s + t * p, s + t * p + n) for s, n, p, count in blocks for t in range(count)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


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
    """Run-length code [[value, repeat], …] of a sequence of ints."""
    out: list[list[int]] = []
    for v in np.asarray(values, dtype=np.int64).tolist():
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


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


# ------------------------------------------------------------------------------------------ partials
def visible_key_counts(group: np.ndarray, positions, beta: int, causal: bool, upto: int | None = None,
                       keys_mask: np.ndarray | None = None) -> np.ndarray:
    """(beta, len(positions)): for query p and key group j, the keys of group j that p attends to, i.e. the
    keys of AttnNode (group[p], j)'s partial for p. Keys are the positions [0, upto) computed so far (all of
    them for an encoder, pos_k <= p for causal). `keys_mask` (n,) bool restricts the keys counted."""
    upto = len(group) if upto is None else upto
    member = np.asarray(group[:upto])[None, :] == np.arange(beta)[:, None]  # (beta, upto)
    if keys_mask is not None:
        member &= np.asarray(keys_mask[:upto], dtype=bool)[None, :]
    positions = np.asarray(positions, dtype=np.int64)
    if causal:
        return np.cumsum(member, axis=1, dtype=np.int64)[:, positions]
    return np.repeat(member.sum(axis=1, dtype=np.int64)[:, None], len(positions), axis=1)


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


def tokenizer_public_prefix(codec, wrap=None) -> int:
    """Leading positions every prompt shares and anyone can know: the tokens the tokenizer adds in front
    (BERT's [CLS], a BOS) and, with `wrap` (a chat template), the template's text before the user's.

    Read from the token offsets of one wrapped text: a leading token counts when it is an added special
    token or ends before the first character where two different user texts differ."""
    wrap = wrap or (lambda text: text)
    texts = [wrap("x1"), wrap("y2")]
    start = 0
    while start < min(map(len, texts)) and texts[0][start] == texts[1][start]:
        start += 1
    enc = codec.tok.encode(texts[0], add_special_tokens=getattr(codec, "add_special", True))
    if list(enc.ids) != list(codec.encode(texts[0])):  # the codec adds tokens its own way: compare two texts
        a, b = codec.encode(texts[0]), codec.encode(texts[1])
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n] and n < len(a) - 1:
            n += 1
        return n
    n = 0
    for (_, end), special in zip(enc.offsets, enc.special_tokens_mask):
        if not (special or end <= start) or (special and n == len(enc.ids) - 1):
            break
        n += 1
    return n


# ------------------------------------------------------------------------------------------ the ledger
def compact_ledger(records: list[dict]) -> dict:
    """A worker's raw records ({"form", "seq", "pos"[, "key_group", "keys"]}, one per step) merged per
    sequence: {seq: {form: blocks, "partial": [{"key_group", "pos": blocks, "keys": rle}, …]}}."""
    merged: dict = {}
    for r in records:
        key = (r["seq"], r["form"], r.get("key_group"))
        pos, keys = merged.setdefault(key, ([], []))
        pos.extend(r["pos"])
        keys.extend(r.get("keys", ()))
    out: dict = {}
    for (seq, form, key_group), (pos, keys) in sorted(merged.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0)):
        forms = out.setdefault(int(seq), {})
        if form == "partial":
            order = np.argsort(pos, kind="stable")
            forms.setdefault("partial", []).append({
                "key_group": int(key_group), "pos": blocks_of(np.asarray(pos)[order]),
                "keys": rle(np.asarray(keys)[order])})
        else:
            forms[form] = blocks_of(pos)
    return out


def ledger_document(gathered: list, prompt_ids: list, lengths: list, plan_lengths: list) -> dict:
    """One batch's ledger for the results (/privacy/ledger): gathered[rank] = {"node", "records"} (None for
    the client); batch sequence b is prompt prompt_ids[b]."""
    doc = {"prompts": {str(pid): {"length": int(n), "plan_length": int(m)}
                       for pid, n, m in zip(prompt_ids, lengths, plan_lengths)},
           "ranks": {}}
    for rank, payload in enumerate(gathered):
        if not payload:
            continue
        doc["ranks"][str(rank)] = {"node": payload["node"],
                                   "prompts": {str(prompt_ids[s]): forms for s, forms in payload["records"].items()}}
    return doc


def ledger_positions(forms: dict) -> dict:
    """{form: sorted positions} of one rank's entry for one prompt ("partial" merged over key groups)."""
    out = {}
    for form, value in forms.items():
        if form == "partial":
            out[form] = np.unique(np.concatenate([expand_blocks(p["pos"]) for p in value])) if value else np.zeros(0, np.int64)
        else:
            out[form] = expand_blocks(value)
    return out


def check_ledger(docs: list, spec: PlanSpec, public_prefix: int = 0, causal: bool | None = None) -> dict:
    """Every rank's ledger against its plan view, for the ledger documents of a job.

    outside_view: (rank, node, prompt, form, positions) a rank received outside its view — must be empty.
    seen_whole:   (rank, node, prompt) where a rank received (or knows as public) every position of a prompt.
    wrong_node:   ranks whose node differs from rank_layout's. wrong_keys: partial key counts that differ
    from the plan's (checked when `causal` is given).
    consistent:   the ledger agrees with the plan (no outside_view, wrong_node or wrong_keys);
    none_seen_whole: no rank saw a whole prompt."""
    layout = {row["rank"]: row["node"] for row in rank_layout(spec.alpha, spec.beta)}
    outside, whole, wrong_node, wrong_keys = [], [], [], []
    plans: dict = {}  # plan length -> (group, views)

    def plan_of(n):
        if n not in plans:
            comp, group = make_plan(spec, n)
            plans[n] = group, plan_views(comp, group, spec.alpha, spec.beta)
        return plans[n]

    for doc in docs:
        for rank, entry in doc["ranks"].items():
            node = entry["node"]
            if layout.get(int(rank)) != node:
                wrong_node.append({"rank": int(rank), "node": node, "expected": layout.get(int(rank))})
            for pid, forms in entry["prompts"].items():
                info = doc["prompts"][pid]
                group, views = plan_of(info["plan_length"])
                view = views.get(node, np.zeros(0, np.int64))
                seen = ledger_positions(forms)
                for form, pos in seen.items():
                    bad = np.setdiff1d(pos, view)
                    if len(bad):
                        outside.append({"rank": int(rank), "node": node, "prompt": pid, "form": form,
                                        "positions": format_blocks(blocks_of(bad))})
                union = np.unique(np.concatenate(list(seen.values()))) if seen else np.zeros(0, np.int64)
                if sees_all(union[union < info["length"]], info["length"], public_prefix):
                    whole.append({"rank": int(rank), "node": node, "prompt": pid})
                if causal is not None and node.startswith("comp"):
                    for part in forms.get("partial", []):
                        pos = expand_blocks(part["pos"])
                        upto = int(max(pos.max() + 1, info["length"])) if len(pos) else 0
                        want = visible_key_counts(group, pos, spec.beta, causal, upto=upto)[part["key_group"]]
                        if not np.array_equal(unrle(part["keys"]), want):
                            wrong_keys.append({"rank": int(rank), "node": node, "prompt": pid,
                                               "key_group": part["key_group"]})
    return {"consistent": not (outside or wrong_node or wrong_keys), "inside_views": not outside,
            "none_seen_whole": not whole, "outside_view": outside, "seen_whole": whole, "wrong_node": wrong_node,
            "wrong_keys": wrong_keys}


def jsonable(obj):
    """A report with inf as "inf", NumPy scalars as Python numbers and int keys as strings (plain JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and math.isinf(obj):
        return "inf" if obj > 0 else "-inf"
    return obj


def report_lengths(lengths, limit: int = 32) -> list[int]:
    """At most `limit` of the distinct lengths for the per-length report: all when few, else the shortest,
    the longest and evenly spread ones between (the job's δ covers every length regardless)."""
    lengths = sorted({int(x) for x in lengths})
    if len(lengths) <= limit:
        return lengths
    picks = np.unique(np.linspace(0, len(lengths) - 1, limit).round().astype(int))
    return [lengths[i] for i in picks]


# ------------------------------------------------------------------------------------------ `rshard plan`
def plan_document(spec: PlanSpec, n: int, public_prefix: int = 0, vocab: int = DEFAULT_VOCAB, causal: bool = True,
                  delta: float = DEFAULT_DELTA, search_max: int = SEARCH_MAX) -> dict:
    """What `rshard plan` shows (and prints with --json): layout, every node's view, δ, the smallest layout
    reaching `delta` at this length."""
    report = plan_report(spec, n, public_prefix, vocab, causal)
    found = smallest_layout(spec, [n], delta, public_prefix, search_max)
    return {"plan": spec.params(), "length": n, "public_prefix": public_prefix, "vocab": vocab, "causal": causal,
            "world_size": world_size_for(spec.alpha, spec.beta), "layout": rank_layout(spec.alpha, spec.beta),
            "delta": report["delta"], "required_delta": delta, "meets": report["delta"] >= delta,
            "seen_whole_by": report["seen_whole_by"], "suggestion": found,
            "suggestion_text": describe_layout(found, spec, delta, search_max), "nodes": report["nodes"]}


def render_plan(doc: dict) -> str:
    """`rshard plan`'s text output."""
    p = doc["plan"]
    lines = [f"plan {p['scheme']}: alpha={p['alpha']} beta={p['beta']} c={p['c']} c_a={p['c_a']}"
             + (f" seed={p['seed']}" if p["scheme"] == "random" else "")
             + f", length {doc['length']}, public prefix {doc['public_prefix']}, V={doc['vocab']}, "
             + f"{'causal' if doc['causal'] else 'bidirectional'} ({doc['world_size']} ranks)",
             f"delta = {doc['delta']:g} (smallest gap before a later run, over all nodes"
             + (f"; {', '.join(node_label(x) for x in doc['seen_whole_by'])} see every position" if doc["seen_whole_by"] else "")
             + f"): {'meets' if doc['meets'] else 'BELOW'} --delta {doc['required_delta']:g}",
             doc["suggestion_text"][0].upper() + doc["suggestion_text"][1:] + ".",
             "", "rank layout:"]
    lines += [f"  rank {row['rank']:>3}  {row['label']}" for row in doc["layout"]]
    lines += ["", "views (runs: start positions; gap = unseen positions before the run; cost = log10 V^(gap+1)):"]
    n = doc["length"]
    for name, r in doc["nodes"].items():
        lines.append(f"{node_label(name)}: sees {r['seen']}/{n} ({100 * r['fraction_seen']:.1f}%): {r['positions']}"
                     + ("  [SEES EVERY POSITION]" if r["sees_all"] else ""))
        first = r["first_run"]
        if first:
            lines.append(f"  first-run exposure: {first['length']} position{'s' if first['length'] > 1 else ''} "
                         f"from {first['start']} (gap {first['gap']}, cost {first['cost_log10']:.2f})")
        for g in r["runs"]:
            starts = blocks_of([g["start"] + t * g["period"] for t in range(g["count"])])
            lines.append(f"  runs at {format_blocks(starts)}: length {g['length']}, gap {g['gap']}, "
                         f"cost {g['cost_log10']:.2f}")
        later = "none (one run)" if r["min_gap"] == INF else f"{r['min_gap']:g} (cost {r['min_cost_log10']:.2f})"
        lines.append(f"  smallest gap before a later run: {later}")
        if "partials" in r:
            q = r["partials"]
            lines.append(f"  partials received: {q['partials']}; over < 2 keys: {q['under_two_keys']} "
                         f"({q['empty']} empty, {q['single_key']} single-key); with one foreign key: "
                         f"{q['one_foreign_key']}")
    return "\n".join(lines)


def model_facts(model: str) -> dict:
    """Vocabulary size, mask and public prefix of a weight file or bundled model (for `rshard plan`)."""
    from rshard_hpc.defaults import resolve_model
    from rshard_hpc.models import weights
    from rshard_hpc.tokenizer import TextCodec

    path = resolve_model(model)
    cfg = weights.read_config(path)
    return {"vocab": cfg.vocab_size, "causal": cfg.causal, "public_prefix": tokenizer_public_prefix(TextCodec(path, cfg))}
