"""The visibility ledger (architecture.md §4): what every rank actually received, compacted per batch, and its
check against the plan's views.
"""
from __future__ import annotations

import numpy as np

from rshard_hpc.dist.topology import rank_layout
from rshard_hpc.plan.schemes import PlanSpec, make_plan
from rshard_hpc.plan.views import (
    blocks_of,
    expand_blocks,
    format_blocks,
    plan_views,
    rle,
    sees_all,
    sorted_unique,
    unrle,
)


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
            out[form] = sorted_unique(np.concatenate([expand_blocks(p["pos"]) for p in value])) if value else np.zeros(0, np.int64)
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
                union = sorted_unique(np.concatenate(list(seen.values()))) if seen else np.zeros(0, np.int64)
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
