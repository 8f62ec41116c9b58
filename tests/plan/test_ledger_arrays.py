"""The visibility ledger kept and checked with array operations (issue 13) says exactly what the per-sequence
loops it replaced said: the workers' compacted records, the ledger documents and check_ledger's verdict, on
random plans, ragged prompt lengths, encoder and decoder steps, and ledgers with planted faults."""
import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest

from rshard_hpc.dist.topology import rank_layout
from rshard_hpc.engine.routing import Routing, step_tokens
from rshard_hpc.engine.workers import CompWorker, _Worker
from rshard_hpc.plan.ledger import (
    LedgerRecorder,
    _PlanTables,
    _rank_findings_at_once,
    check_ledger,
    ledger_document,
    ledger_positions,
    visible_key_counts,
)
from rshard_hpc.plan.schemes import PlanSpec, batch_plans, make_plan
from rshard_hpc.plan.views import (
    blocks_by_owner,
    blocks_of,
    expand_blocks,
    expand_blocks_many,
    format_blocks,
    plan_views,
    rle,
    rle_by_owner,
    sees_all,
    sorted_unique,
    unrle,
)


# ------------------------------------------------------------------------------------------ the loops replaced
def _old_record(ledger, form, tokens, idx):
    for s in np.unique(tokens.seq[idx]):
        sel = idx[tokens.seq[idx] == s]
        ledger.append({"form": form, "seq": int(s), "pos": tokens.pos[sel].tolist()})


def _old_record_partials(ledger, plans, tokens, mine, beta, causal):
    for s in np.unique(tokens.seq[mine]):
        sel = mine[tokens.seq[mine] == s]
        upto = int(tokens.pos[tokens.seq == s].max()) + 1
        pos = tokens.pos[sel]
        counts = visible_key_counts(plans[s][1], pos, beta, causal, upto=upto)
        for j in range(beta):
            ledger.append({"form": "partial", "seq": int(s), "pos": pos.tolist(), "key_group": j,
                           "keys": counts[j].tolist()})


def _old_rle(values):
    out = []
    for v in np.asarray(values, dtype=np.int64).tolist():
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


def _old_merge_runs(starts, lengths):
    """Runs into blocks one run at a time (the loop views._merge_runs replaced)."""
    blocks = []
    for start, length in zip(starts, lengths):
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


def _old_blocks_of(positions):
    pos = sorted(set(np.asarray(positions, dtype=np.int64).tolist()))
    starts, lengths = [], []
    for p in pos:
        if starts and p == starts[-1] + lengths[-1]:
            lengths[-1] += 1
        else:
            starts.append(p)
            lengths.append(1)
    return _old_merge_runs(starts, lengths)


def _old_compact(records):
    merged = {}
    for r in records:
        pos, keys = merged.setdefault((r["seq"], r["form"], r.get("key_group")), ([], []))
        pos.extend(r["pos"])
        keys.extend(r.get("keys", ()))
    out = {}
    for (seq, form, key_group), (pos, keys) in sorted(merged.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0)):
        forms = out.setdefault(int(seq), {})
        if form == "partial":
            order = np.argsort(pos, kind="stable")
            forms.setdefault("partial", []).append({"key_group": int(key_group), "pos": blocks_of(np.asarray(pos)[order]),
                                                    "keys": _old_rle(np.asarray(keys)[order])})
        else:
            forms[form] = blocks_of(pos)
    return out


def _old_check(docs, spec, public_prefix=0, causal=None):
    layout = {row["rank"]: row["node"] for row in rank_layout(spec.alpha, spec.beta)}
    outside, whole, wrong_node, wrong_keys = [], [], [], []
    for doc in docs:
        for rank, entry in doc["ranks"].items():
            node = entry["node"]
            if layout.get(int(rank)) != node:
                wrong_node.append({"rank": int(rank), "node": node, "expected": layout.get(int(rank))})
            for pid, forms in entry["prompts"].items():
                info = doc["prompts"][pid]
                comp, group = make_plan(spec, info["plan_length"])
                view = plan_views(comp, group, spec.alpha, spec.beta).get(node, np.zeros(0, np.int64))
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


# ------------------------------------------------------------------------------------------ a batch, both ways
def _steps(lens, prompt_lens, generate: bool):
    """The steps of a batch: one encoder step, or a prefill and decode steps in which sequences finish."""
    if not generate:
        return [[(0, n) for n in lens]]
    steps, now = [[(0, n) for n in prompt_lens]], list(prompt_lens)
    while any(a < n for a, n in zip(now, lens)):
        steps.append([(a, a + 1) if a < n else (a, a) for a, n in zip(now, lens)])
        now = [min(a + 1, n) for a, n in zip(now, lens)]
    return steps


def _batch_ledgers(spec, lens, prompt_lens, causal, generate):
    """{node: (old compacted records, new compacted records)} of every worker for one batch."""
    alpha, beta = spec.alpha, spec.beta
    plans = batch_plans(spec, lens)
    assert all(np.array_equal(a[1], make_plan(spec, n)[1]) for a, n in zip(plans, lens))
    old = {row["node"]: [] for row in rank_layout(alpha, beta)[1:]}
    new = {node: SimpleNamespace(ledger=LedgerRecorder(), plans=plans, topo=SimpleNamespace(beta=beta),
                                 cfg=SimpleNamespace(causal=causal)) for node in old}
    for ranges in _steps(lens, prompt_lens, generate):
        tokens = step_tokens(plans, ranges)
        routing = Routing(tokens, alpha, beta)
        for k in range(alpha):
            mine, node = routing.comp_tokens[k], f"comp{k}"
            _old_record(old[node], "token_id", tokens, mine)
            _old_record_partials(old[node], plans, tokens, mine, beta, causal)
            _Worker.record(new[node], "token_id", tokens, mine)
            CompWorker.record_partials(new[node], tokens, mine)
        for i in range(beta):
            for j in range(beta):
                node = f"attn{i}_{j}"
                for form, idx in (("q", routing.attn_q_tokens(i)), ("k", routing.attn_kv_tokens(j)),
                                  ("v", routing.attn_kv_tokens(j))):
                    _old_record(old[node], form, tokens, idx)
                    _Worker.record(new[node], form, tokens, idx)
    return {node: (_old_compact(old[node]), new[node].ledger.compact()) for node in old}


def _document(spec, per_node, ids, lens, prompt_lens):
    gathered = [None] + [{"node": row["node"], "records": per_node[row["node"]]}
                         for row in rank_layout(spec.alpha, spec.beta)[1:]]
    return ledger_document(gathered, ids, prompt_lens, lens)


CASES = [  # spec, causal, generate
    (PlanSpec("strided", 3, 3, 1, 2), False, False),
    (PlanSpec("strided", 2, 2, 2, 1), True, False),
    (PlanSpec("strided", 3, 2, 1, 1), True, True),
    (PlanSpec("random", 3, 3, 1, 2, seed=4), False, False),
    (PlanSpec("random", 4, 3, 2, 2, seed=9), True, True),
]


def _random_batches(spec, causal, generate, seed):
    """Ledger documents (old, new) of a few batches of ragged prompts, some short enough to be seen whole."""
    rng = np.random.default_rng(seed)
    old_docs, new_docs = [], []
    for b in range(3):
        prompt_lens = [int(x) for x in rng.integers(1, 40, rng.integers(1, 9))]
        prompt_lens[0] = int(rng.integers(1, 4))  # a prompt too short to split
        lens = [n + (int(rng.integers(0, 5)) if generate else 0) for n in prompt_lens]
        ids = [f"b{b}p{t}" if t % 2 else b * 100 + t for t in range(len(lens))]
        per_node = _batch_ledgers(spec, lens, prompt_lens, causal, generate)
        for node, (old, new) in per_node.items():
            assert json.dumps(new) == json.dumps(old), node  # same content, same order
        old_docs.append(_document(spec, {n: o for n, (o, _) in per_node.items()}, ids, lens, prompt_lens))
        new_docs.append(_document(spec, {n: w for n, (_, w) in per_node.items()}, ids, lens, prompt_lens))
    return old_docs, new_docs


@pytest.mark.parametrize("spec,causal,generate", CASES)
def test_worker_ledger_and_check_equal_the_loops(spec, causal, generate):
    for seed in range(3):
        old_docs, new_docs = _random_batches(spec, causal, generate, seed)
        assert json.dumps(new_docs) == json.dumps(old_docs)
        for pp in (0, 1, 3):
            for c in (None, causal):
                got, want = check_ledger(new_docs, spec, pp, c), _old_check(old_docs, spec, pp, c)
                assert got == want
        assert check_ledger(new_docs, spec, 1, causal)["consistent"]
        tables = _PlanTables(spec)  # a clean ledger is checked at once, never prompt by prompt
        assert all(_rank_findings_at_once(doc, int(r), e, tables, 1, causal) is not None
                   for doc in new_docs for r, e in doc["ranks"].items())


@pytest.mark.parametrize("spec,causal,generate", CASES)
def test_ranks_without_tokens(spec, causal, generate):
    """A batch of one short prompt leaves some CompNodes and AttnNodes without a token: an empty ledger."""
    per_node = _batch_ledgers(spec, [1 + generate], [1], causal, generate)
    assert any(new == {} for _, new in per_node.values())
    for node, (old, new) in per_node.items():
        assert json.dumps(new) == json.dumps(old), node


def _plant(docs, rng, spec):
    """A copy of docs with one fault: a position outside a view, a wrong key count, a wrong node or key group."""
    docs = copy.deepcopy(docs)
    doc = docs[rng.integers(len(docs))]
    rank = str(rng.integers(1, 1 + spec.alpha + spec.beta ** 2))
    entry = doc["ranks"][rank]
    pid = list(entry["prompts"])[rng.integers(len(entry["prompts"]))]
    forms = entry["prompts"][pid]
    kind = rng.integers(4)
    if kind == 0 or "partial" not in forms:
        form = next(f for f in forms if f != "partial") if kind else list(forms)[rng.integers(len(forms))]
        extra = int(rng.integers(0, doc["prompts"][pid]["plan_length"] + 3))
        if form == "partial":
            part = forms["partial"][0]
            pos = np.append(expand_blocks(part["pos"]), extra)
            part["pos"], part["keys"] = blocks_of(pos), rle(np.append(unrle(part["keys"]), 0)[np.argsort(pos)])
        else:
            forms[form] = blocks_of(np.append(expand_blocks(forms[form]), extra))
    elif kind == 1:
        part = forms["partial"][rng.integers(len(forms["partial"]))]
        keys = unrle(part["keys"])
        keys[rng.integers(len(keys))] += 1
        part["keys"] = rle(keys)
    elif kind == 2:
        entry["node"] = "attn0_0" if entry["node"] != "attn0_0" else "comp0"
    else:
        forms["partial"][0]["keys"] = forms["partial"][0]["keys"][:-1]
    return docs


@pytest.mark.parametrize("spec,causal,generate", CASES)
def test_planted_faults_are_reported_alike(spec, causal, generate):
    rng = np.random.default_rng(7)
    _, docs = _random_batches(spec, causal, generate, 11)
    faults = 0
    for _ in range(12):
        bad = _plant(docs, rng, spec)
        verdict = _outcome(check_ledger, bad, spec, 1, causal)
        faults += not isinstance(verdict, dict) or not verdict["consistent"]
        for c in (None, causal):
            assert _outcome(check_ledger, bad, spec, 1, c) == _outcome(_old_check, bad, spec, 1, c)
    assert faults >= 6  # most planted faults are found


def _outcome(check, *args):
    """check's verdict, or the type of what it raised (a key count past the plan's end is an IndexError)."""
    try:
        return check(*args)
    except Exception as exc:  # noqa: BLE001 - compared, not hidden
        return type(exc)


def test_block_helpers_agree_with_their_one_at_a_time_forms():
    rng = np.random.default_rng(3)
    for t in range(200):
        pos = rng.integers(0, 90, rng.integers(0, 60)) if t % 2 else np.arange(0, rng.integers(1, 90), rng.integers(1, 5))
        owner = rng.integers(0, 4, len(pos))
        assert blocks_by_owner(owner, pos) == {o: blocks_of(pos[owner == o]) for o in sorted(set(owner.tolist()))}
        lists = [blocks_of(pos[owner == o]) for o in range(4)]
        got_owner, got = expand_blocks_many(lists)
        for o in range(4):
            assert np.array_equal(got[got_owner == o], expand_blocks(lists[o]))
        values = rng.integers(0, 3, len(pos))
        assert rle(values) == _old_rle(values)
        by_owner = np.sort(owner)
        assert rle_by_owner(by_owner, values) == {o: _old_rle(values[by_owner == o]) for o in set(by_owner.tolist())}


def _striped(rng, n):
    """Positions a strided plan gives one node: c of every `every` positions (runs of equal length at a fixed
    period), some dropped, with a few stray runs of other lengths and periods."""
    c, every = int(rng.integers(1, 4)), int(rng.integers(4, 9))
    pos = np.flatnonzero(np.arange(n) % every < c)
    if rng.random() < 0.5:
        pos = pos[rng.random(len(pos)) > 0.05]
    stray = rng.integers(0, n + 40, int(rng.integers(0, 6)))
    return np.concatenate([pos, stray, np.arange(n + 50, n + 50 + int(rng.integers(0, 30)), 3)])


def test_runs_merge_into_blocks_as_one_at_a_time():
    """blocks_of and blocks_by_owner (the runs' tests as array operations) against the greedy loop one run at a
    time: strided views, dropped runs, strays, runs that end a block exactly where the next could begin."""
    rng = np.random.default_rng(11)
    for t in range(400):
        pos = _striped(rng, int(rng.integers(1, 300))) if t % 3 else rng.integers(0, 150, rng.integers(0, 90))
        assert blocks_of(pos) == _old_blocks_of(pos), pos
        owner = rng.integers(0, 6, len(pos))
        assert blocks_by_owner(owner, pos) == {o: _old_blocks_of(pos[owner == o]) for o in set(owner.tolist())}
    # equal-length runs whose period changes: a block ends, the next starts at the run that broke it
    pos = np.array([0, 1, 10, 11, 20, 21, 25, 26, 30, 31, 35, 36, 50, 60])
    assert blocks_of(pos) == _old_blocks_of(pos) == [[0, 2, 10, 3], [25, 2, 5, 3], [50, 1, 10, 2]]
