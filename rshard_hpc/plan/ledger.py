"""The visibility ledger (architecture.md §4): what every rank actually received, compacted per batch, and its
check against the plan's views.
"""
from __future__ import annotations

import numpy as np

from rshard_hpc.dist.topology import rank_layout
from rshard_hpc.plan.schemes import PlanSpec, make_plan
from rshard_hpc.plan.views import (
    blocks_by_owner,
    blocks_of,
    expand_blocks,
    expand_blocks_many,
    format_blocks,
    plan_views,
    rle_by_owner,
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


def step_key_counts(groups: dict, plan_len: np.ndarray, seq: np.ndarray, pos: np.ndarray, upto: np.ndarray,
                    beta: int, causal: bool) -> np.ndarray:
    """visible_key_counts for the queries of a whole step at once: (beta, n) for query t at position pos[t] of
    sequence seq[t], whose plan has length plan_len[seq[t]] and index groups groups[that length]; upto[s]: the
    keys of sequence s computed so far."""
    counts = np.zeros((beta, len(seq)), dtype=np.int64)
    lens = plan_len[seq]
    for n in sorted_unique(lens).tolist():
        member = np.asarray(groups[n])[None, :] == np.arange(beta)[:, None]  # (beta, n)
        cum = np.cumsum(member, axis=1, dtype=np.int64)  # keys of group j at positions <= p
        at = np.flatnonzero(lens == n)
        last = pos[at] if causal else np.minimum(upto[seq[at]], n) - 1
        counts[:, at] = cum[:, last]
    return counts


# ------------------------------------------------------------------------------------------ the ledger
class LedgerRecorder:
    """What one worker received in a batch (architecture.md §4), kept as arrays a step: positions by form
    ("token_id", "q", "k", "v") and, for a CompNode's partials, the key count from each key group."""

    def __init__(self):
        self.chunks: dict = {}  # form -> [(seq (n,), pos (n,)[, keys (beta, n)]), …] in arrival order

    def add(self, form: str, seq: np.ndarray, pos: np.ndarray) -> None:
        self.chunks.setdefault(form, []).append((np.asarray(seq, np.int64), np.asarray(pos, np.int64)))

    def add_partials(self, seq: np.ndarray, pos: np.ndarray, keys: np.ndarray) -> None:
        """keys (beta, n): the keys of key group j in the partial for query (seq[t], pos[t])."""
        self.chunks.setdefault("partial", []).append(
            (np.asarray(seq, np.int64), np.asarray(pos, np.int64), np.asarray(keys, np.int64)))

    def compact(self) -> dict:
        """{seq: {form: blocks, "partial": [{"key_group", "pos": blocks, "keys": rle}, …]}}, sequences ascending,
        forms by name, partials by key group; positions of a partial in ascending order, its key counts alike."""
        per_form = {}
        for form, chunks in self.chunks.items():
            seq = np.concatenate([c[0] for c in chunks])
            pos = np.concatenate([c[1] for c in chunks])
            per_form[form] = blocks_by_owner(seq, pos)
            if form == "partial" and len(seq):
                per_form[form] = self._partials(seq, pos, np.concatenate([c[2] for c in chunks], axis=1),
                                                per_form[form])
        out: dict = {}
        for s in sorted({s for blocks in per_form.values() for s in blocks}):
            out[int(s)] = {form: per_form[form][s] for form in sorted(per_form) if s in per_form[form]}
        return out

    @staticmethod
    def _partials(seq, pos, keys, blocks: dict) -> dict:
        """{seq: [{"key_group", "pos", "keys"}, …]}: each sequence's key counts in ascending position order (a
        stable sort: equal positions keep their arrival order)."""
        order = np.argsort(seq * (int(pos.max()) + 1) + pos, kind="stable")
        seq, keys = seq[order], keys[:, order]
        runs = [rle_by_owner(seq, keys[j]) for j in range(len(keys))]  # key group j: {seq: its counts' rle}
        return {s: [{"key_group": j, "pos": [list(x) for x in blocks[s]], "keys": runs[j][s]} for j in range(len(keys))]
                for s in runs[0]}


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
    none_seen_whole: no rank saw a whole prompt.

    A rank's prompts are checked together (_rank_findings_at_once); a rank with anything outside its views or
    a wrong key count is gone over again prompt by prompt (_rank_findings), which names each finding."""
    layout = {row["rank"]: row["node"] for row in rank_layout(spec.alpha, spec.beta)}
    outside, whole, wrong_node, wrong_keys = [], [], [], []
    plans = _PlanTables(spec)
    for doc in docs:
        for rank, entry in doc["ranks"].items():
            node = entry["node"]
            if layout.get(int(rank)) != node:
                wrong_node.append({"rank": int(rank), "node": node, "expected": layout.get(int(rank))})
            args = (doc, int(rank), entry, plans, public_prefix, causal)
            found = _rank_findings_at_once(*args)
            for into, items in zip((outside, whole, wrong_keys), found or _rank_findings(*args)):
                into += items
    return {"consistent": not (outside or wrong_node or wrong_keys), "inside_views": not outside,
            "none_seen_whole": not whole, "outside_view": outside, "seen_whole": whole, "wrong_node": wrong_node,
            "wrong_keys": wrong_keys}


class _PlanTables:
    """Per plan length, made once: the index groups, every node's view (and as a mask), the key counts."""

    def __init__(self, spec: PlanSpec):
        self.spec, self.plans, self.masks, self.keys = spec, {}, {}, {}

    def __call__(self, n: int):
        """(group (n,), {node: view})."""
        if n not in self.plans:
            comp, group = make_plan(self.spec, n)
            self.plans[n] = group, plan_views(comp, group, self.spec.alpha, self.spec.beta)
        return self.plans[n]

    def view_mask(self, n: int, node: str) -> np.ndarray:
        if (n, node) not in self.masks:
            mask = np.zeros(n, dtype=bool)
            mask[self(n)[1].get(node, np.zeros(0, np.int64))] = True
            self.masks[n, node] = mask
        return self.masks[n, node]

    def key_counts(self, n: int) -> np.ndarray:
        """(beta, n): keys of group j at positions <= p."""
        if n not in self.keys:
            member = self(n)[0][None, :] == np.arange(self.spec.beta)[:, None]
            self.keys[n] = np.cumsum(member, axis=1, dtype=np.int64)
        return self.keys[n]


def _rank_findings(doc, rank: int, entry, plans, public_prefix: int, causal) -> tuple[list, list, list]:
    """(outside_view, seen_whole, wrong_keys) of one rank's entry in one document, prompt by prompt."""
    node, spec = entry["node"], plans.spec
    outside, whole, wrong_keys = [], [], []
    for pid, forms in entry["prompts"].items():
        info = doc["prompts"][pid]
        group, views = plans(info["plan_length"])
        view = views.get(node, np.zeros(0, np.int64))
        seen = ledger_positions(forms)
        for form, pos in seen.items():
            bad = np.setdiff1d(pos, view)
            if len(bad):
                outside.append({"rank": rank, "node": node, "prompt": pid, "form": form,
                                "positions": format_blocks(blocks_of(bad))})
        union = sorted_unique(np.concatenate(list(seen.values()))) if seen else np.zeros(0, np.int64)
        if sees_all(union[union < info["length"]], info["length"], public_prefix):
            whole.append({"rank": rank, "node": node, "prompt": pid})
        if causal is not None and node.startswith("comp"):
            for part in forms.get("partial", []):
                pos = expand_blocks(part["pos"])
                upto = int(max(pos.max() + 1, info["length"])) if len(pos) else 0
                want = visible_key_counts(group, pos, spec.beta, causal, upto=upto)[part["key_group"]]
                if not np.array_equal(unrle(part["keys"]), want):
                    wrong_keys.append({"rank": rank, "node": node, "prompt": pid, "key_group": part["key_group"]})
    return outside, whole, wrong_keys


def _rank_findings_at_once(doc, rank: int, entry, plans, public_prefix: int, causal) -> tuple | None:
    """_rank_findings for every prompt of the entry in a few array operations: ([], seen_whole, []), or None
    when a position lies outside the rank's views or a key count is wrong (then _rank_findings names them)."""
    node, pids = entry["node"], list(entry["prompts"])
    if not pids:
        return [], [], []
    length = np.array([doc["prompts"][pid]["length"] for pid in pids], dtype=np.int64)
    plan_len = np.array([doc["prompts"][pid]["plan_length"] for pid in pids], dtype=np.int64)
    lists, prompt_of, parts = [], [], []
    for t, pid in enumerate(pids):
        for form, value in entry["prompts"][pid].items():
            chunks = [p["pos"] for p in value] if form == "partial" else [value]
            lists += chunks
            prompt_of += [t] * len(chunks)
            parts += [(t, p) for p in value] if form == "partial" else []
    owner, pos = expand_blocks_many(lists)
    prompt = np.asarray(prompt_of, dtype=np.int64)[owner]
    # inside the views: the plan's view of this node as a mask, one row per plan length
    widths = sorted(set(plan_len.tolist()))
    table = np.zeros((len(widths), max(widths) + 1), dtype=bool)
    for r, n in enumerate(widths):
        table[r, :n] = plans.view_mask(n, node)
    row = np.searchsorted(widths, plan_len)
    if len(pos) and not ((pos >= 0) & table[row[prompt], np.clip(pos, 0, table.shape[1] - 1)]).all():
        return None
    if causal is not None and node.startswith("comp") and not _keys_agree(parts, length, plan_len, plans, causal):
        return None
    # seen whole: every position in [public_prefix, length) received
    stride = table.shape[1]
    mine = (pos >= public_prefix) & (pos < length[prompt])
    distinct = sorted_unique(prompt[mine] * stride + pos[mine]) // stride
    count = np.bincount(distinct, minlength=len(pids))
    sees = (length > public_prefix) & (count == length - public_prefix)
    return [], [{"rank": rank, "node": node, "prompt": pids[t]} for t in np.flatnonzero(sees).tolist()], []


def _keys_agree(parts, length, plan_len, plans, causal: bool) -> bool:
    """Every partial's key counts (parts: (prompt index, {"key_group", "pos", "keys"})) equal the plan's."""
    if not parts:
        return True
    owner, pos = expand_blocks_many([p["pos"] for _, p in parts])
    pairs = [(e, v, n) for e, (_, p) in enumerate(parts) for v, n in p["keys"]]
    got_owner = np.repeat([e for e, _, _ in pairs], [n for _, _, n in pairs]) if pairs else np.zeros(0, np.int64)
    got = np.repeat([v for _, v, _ in pairs], [n for _, _, n in pairs]) if pairs else np.zeros(0, np.int64)
    if len(got) != len(pos) or not np.array_equal(got_owner, owner):
        return False
    prompt = np.array([t for t, _ in parts], dtype=np.int64)
    key_group = np.array([p["key_group"] for _, p in parts], dtype=np.int64)
    last = np.full(len(parts), -1, dtype=np.int64)
    np.maximum.at(last, owner, pos)
    upto = np.maximum(last + 1, length[prompt])  # the keys computed: as far as the prompt and the partials go
    want = np.zeros(len(pos), dtype=np.int64)
    for n in sorted_unique(plan_len[prompt]).tolist():
        at = np.flatnonzero(plan_len[prompt[owner]] == n)
        if key_group[owner[at]].min(initial=0) < 0 or key_group[owner[at]].max(initial=0) >= plans.spec.beta:
            return False
        at_key = pos[at] if causal else np.minimum(upto[owner[at]], n) - 1
        want[at] = plans.key_counts(n)[key_group[owner[at]], at_key]
    return np.array_equal(got, want)
