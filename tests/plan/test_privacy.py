"""Privacy you can check (architecture.md §4): plan reports, the layout search, the random scheme's guarantees,
`rshard plan`, and the visibility ledger of real mpiexec jobs against the plan views."""
import itertools
import json
import math

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import rshard

from rshard_hpc.cli import main as cli_main
from rshard_hpc.dist.topology import rank_layout
from rshard_hpc.plan.check import check_job, job_delta, partial_summary, plan_report, smallest_layout
from rshard_hpc.plan.ledger import check_ledger, ledger_positions
from rshard_hpc.plan.report import tokenizer_public_prefix
from rshard_hpc.plan.schemes import PlanSpec, make_plan
from rshard_hpc.plan.views import (
    blocks_of,
    expand_blocks,
    format_blocks,
    min_interior_gap,
    node_report,
    plan_views,
    view_runs,
)


# ------------------------------------------------------------------------------------------ pure functions
def test_blocks_round_trip_and_text():
    rng = np.random.default_rng(0)
    for _ in range(200):
        pos = np.flatnonzero(rng.random(rng.integers(0, 80)) < rng.random())
        assert np.array_equal(expand_blocks(blocks_of(pos)), pos)
    comp, group = make_plan(PlanSpec("strided", 3, 3, 1, 2), 240)
    views = plan_views(comp, group, 3, 3)
    assert blocks_of(views["comp1"]) == [[1, 1, 3, 80]]  # a strided view is one block
    assert blocks_of(views["attn0_1"]) == [[0, 4, 6, 40]]
    assert format_blocks(blocks_of(views["attn0_1"])) == "0-3, 6-9, …, 234-237 (40 runs, every 6)"
    assert format_blocks([]) == "none"


@pytest.mark.parametrize("scheme", ["strided", "random"])
def test_node_report_agrees_with_min_interior_gap(scheme):
    """Runs, gaps and costs of every node, against plan.min_interior_gap and a direct walk over positions."""
    vocab = 1000
    for alpha, beta, c, c_a, n, pp in itertools.product([2, 3], [2, 3], [1, 2], [1, 3], [1, 7, 40], [0, 1, 3]):
        spec = PlanSpec(scheme, alpha, beta, c, c_a, seed=n)
        comp, group = make_plan(spec, n)
        for name, view in plan_views(comp, group, alpha, beta).items():
            r = node_report(view, n, pp, vocab)
            assert r["min_gap"] == min_interior_gap(view, pp), (spec, n, pp, name)
            known = set(view.tolist()) | set(range(min(pp, n)))
            assert r["sees_all"] == (n > pp and known == set(range(n)))
            starts, lengths, gaps = view_runs(view, pp)
            for s, length, g in zip(starts, lengths, gaps):
                assert all(p in known for p in range(s, s + length)) and (s + length) not in known
                assert all(p not in known for p in range(s - g, s)) and (s - g - 1 < 0 or s - g - 1 in known
                                                                           or s - g == pp)
            for grp in r["runs"]:
                assert grp["cost_log10"] == pytest.approx((grp["gap"] + 1) * math.log10(vocab), abs=1e-3)
            if r["first_run"]:
                assert r["first_run"]["start"] == starts[0] and r["first_run"]["gap"] == gaps[0]


def test_design_claims_for_strided_plans():
    """architecture.md §4 by enumeration at N = 240: CompNode gaps (α−1)·c, AttnNode gaps exactly c_a for β ≥ 3,
    β = 2 shows every position to the off-diagonal AttnNodes."""
    n = 240
    for alpha, c, beta, c_a in itertools.product([2, 3, 4], [1, 2], [2, 3, 4, 5], [1, 2, 3]):
        report = plan_report(PlanSpec("strided", alpha, beta, c, c_a), n)
        nodes = report["nodes"]
        assert all(nodes[f"comp{k}"]["min_gap"] == (alpha - 1) * c for k in range(alpha))
        attn_gap = min(v["min_gap"] for name, v in nodes.items() if name.startswith("attn"))
        if beta == 2:
            assert report["delta"] == 0 and nodes["attn0_1"]["sees_all"] and nodes["attn1_0"]["sees_all"]
        else:
            assert attn_gap == c_a and report["delta"] == min((alpha - 1) * c, c_a)


def test_partial_counts_by_hand():
    # N = 6, alpha = 2 (c = 1), beta = 3 (c_a = 1): comp = 0 1 0 1 0 1, group = 0 1 2 0 1 2
    comp, group = make_plan(PlanSpec("strided", 2, 3, 1, 1), 6)
    causal = partial_summary(comp, group, 0, 3, causal=True)
    # CompNode 0 owns 0, 2, 4. Keys <= p per group: p=0: 1 0 0; p=2: 1 1 1; p=4: 2 2 1
    # one foreign key (keys not owned by CompNode 0): p=2 group 1 {1}; p=4 group 0 {0,3}, group 1 {1,4}
    assert causal == {"partials": 9, "under_two_keys": 7, "empty": 2, "single_key": 5, "one_foreign_key": 3}
    encoder = partial_summary(comp, group, 0, 3, causal=False)
    # every group has two keys, one of them foreign to CompNode 0
    assert encoder == {"partials": 9, "under_two_keys": 0, "empty": 0, "single_key": 0, "one_foreign_key": 9}


@pytest.mark.parametrize("alpha,beta,c,c_a,target", [(3, 3, 1, 2, 2), (4, 3, 1, 3, 3), (3, 4, 2, 2, 2),
                                                      (5, 5, 1, 2, 4), (3, 3, 2, 3, 2), (2, 3, 1, 1, 3)])
def test_random_scheme_keeps_its_guarantees(alpha, beta, c, c_a, target):
    """Random plans: CompNode gaps >= c * min(alpha-1, ceil(target/c)), AttnNode gaps >= c_a (beta >= 3),
    and no node sees a whole sequence longer than 2 * c_a and c — over many seeds and lengths."""
    want = min(c * min(alpha - 1, -(-target // c)), c_a)
    for seed, n in itertools.product(range(20), [5, 9, 31, 100]):
        spec = PlanSpec("random", alpha, beta, c, c_a, seed, target_delta=target)
        got = job_delta(spec, [n])
        assert got["delta"] >= want or (got["seen_whole_by"] and n <= max(2 * c_a, c)), (seed, n, got)
        comp, group = make_plan(spec, n)
        assert np.array_equal(comp, make_plan(spec, n)[0]) and np.array_equal(group, make_plan(spec, n)[1])


def test_smallest_layout_search():
    assert smallest_layout(PlanSpec("strided", 2, 2, 1, 2), [240], 2) == {
        "alpha": 3, "beta": 3, "c": 1, "c_a": 2, "world_size": 13, "chunks_changed": False}
    found = smallest_layout(PlanSpec("strided", 2, 2, 1, 3), [240], 3)
    assert (found["alpha"], found["beta"]) == (4, 3) and not found["chunks_changed"]
    # c_a = 1 caps every AttnNode gap at 1 (beta >= 3): the search raises c_a, keeping c
    found = smallest_layout(PlanSpec("strided", 2, 2, 1, 1), [240], 2)
    assert found == {"alpha": 3, "beta": 3, "c": 1, "c_a": 2, "world_size": 13, "chunks_changed": True}
    assert smallest_layout(PlanSpec("explicit", 2, 2, explicit={"comp": [0], "group": [0]}), [1], 2) is None
    assert smallest_layout(PlanSpec("strided", 3, 3, 1, 2), [3], 2, public_prefix=1) is None  # too short for any


def test_job_check_and_short_prompts():
    spec = PlanSpec("strided", 3, 3, 1, 2)
    got = check_job(spec, [3, 17, 240], 2, public_prefix=1)
    assert got["ok"] and got["delta"] == 2
    assert got["exposed"] == {3: ["attn0_1", "attn1_0"]}  # a [CLS] x [SEP] prompt: any plan shows it whole
    weak = check_job(PlanSpec("strided", 2, 2, 1, 1), [12, 40], 2, public_prefix=1)
    assert not weak["ok"] and weak["delta"] == 0
    assert "AttnNode (0, 1) sees every position" in weak["message"] and "--alpha 3 --beta 3" in weak["message"]
    assert "--allow-weak-plan" in weak["message"]
    gap1 = check_job(PlanSpec("strided", 3, 3, 1, 1), [40], 2)
    assert gap1["delta"] == 1 and "after 1 unseen position" in gap1["message"]
    assert check_job(PlanSpec("strided", 2, 2, 1, 1), [40], 0)["ok"]  # --min-delta 0: no check


def test_rank_layout_and_public_prefix(tiny_bert, minilm):
    assert [row["node"] for row in rank_layout(2, 2)] == ["client", "comp0", "comp1", "attn0_0", "attn0_1",
                                                          "attn1_0", "attn1_1"]
    from rshard_hpc.models import weights
    from rshard_hpc.models.tokenizer import TextCodec

    assert tokenizer_public_prefix(TextCodec(minilm, weights.read_config(minilm))) == 1  # [CLS]
    assert tokenizer_public_prefix(TextCodec(tiny_bert, weights.read_config(tiny_bert))) == 0  # adds nothing

    class Wrapped:  # a template prefix is public too
        add_special = False
        tok = TextCodec(minilm, weights.read_config(minilm)).tok

        def encode(self, text):
            return self.tok.encode(text, add_special_tokens=False).ids

    assert tokenizer_public_prefix(Wrapped(), lambda t: f"system says hello . user : {t} end") == 6


def test_rshard_plan_command():
    runner = CliRunner()
    result = runner.invoke(cli_main, ["plan", "--alpha", 3, "--beta", 3, "--c-a", 2, "--length", 48,
                                      "--public-prefix", 1, "--vocab", 30522, "--bidirectional", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["delta"] == 2 and doc["meets"] and doc["world_size"] == 13 and not doc["causal"]
    assert [row["rank"] for row in doc["layout"]] == list(range(13))
    assert doc["layout"][12]["label"] == "AttnNode (2, 2)"
    assert doc["suggestion"]["alpha"] == 3 and doc["suggestion"]["beta"] == 3
    node = doc["nodes"]["comp1"]
    assert node["fraction_seen"] == pytest.approx(1 / 3) and node["min_gap"] == 2
    assert node["first_run"] == {"start": 0, "length": 2, "gap": 0, "cost_log10": round(math.log10(30522), 3)}
    assert node["partials"]["under_two_keys"] == 0  # bidirectional: every partial covers a whole group
    assert doc["nodes"]["attn0_0"]["runs"][-1]["gap"] == 4
    text = runner.invoke(cli_main, ["plan", "--alpha", 2, "--beta", 2, "--length", 12, "--vocab", 49152, "--causal",
                                    "--public-prefix", 0])  # not the default model's (tests/plan/test_report_counts)
    assert text.exit_code == 0
    assert "SEES EVERY POSITION" in text.output and "BELOW --delta 2" in text.output
    assert "--alpha 3 --beta 3 --c 1 --c-a 2 (mpiexec -n 13)" in text.output
    assert "rank   6  AttnNode (1, 1)" in text.output and "first-run exposure" in text.output
    assert "partials received: 12; over < 2 keys: 3" in text.output


def test_check_ledger_detects_positions_outside_a_view():
    spec = PlanSpec("strided", 3, 3, 1, 2)
    comp, group = make_plan(spec, 20)
    views = plan_views(comp, group, 3, 3)
    doc = {"prompts": {"a": {"length": 20, "plan_length": 20}}, "ranks": {}}
    for row in rank_layout(3, 3)[1:]:
        form = "token_id" if row["node"].startswith("comp") else "q"
        doc["ranks"][str(row["rank"])] = {"node": row["node"], "prompts": {"a": {form: blocks_of(views[row["node"]])}}}
    good = check_ledger([doc], spec)
    assert good["consistent"] and good["none_seen_whole"]
    doc["ranks"]["1"]["prompts"]["a"]["token_id"] = blocks_of(np.arange(20))  # CompNode 0 got everything
    bad = check_ledger([doc], spec)
    assert not bad["inside_views"] and bad["outside_view"][0]["node"] == "comp0"
    assert bad["seen_whole"] == [{"rank": 1, "node": "comp0", "prompt": "a"}]


# ------------------------------------------------------------------------------------------ real jobs
def _prompts(tmp_path, lengths, seed=0):
    rng = np.random.default_rng(seed)
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "text": " ".join(f"t{x}" for x in rng.integers(0, 90, n))})
                            + "\n" for i, n in enumerate(lengths)))
    return path


def _ledger(out):
    with h5py.File(out) as f:
        docs = [json.loads(x) for x in f["privacy/ledger"][()]]
        report = json.loads(f["privacy/json"][()])
    return docs, report


def test_private_job_ledger_lies_inside_the_views(tmp_path, tiny_bert):
    """alpha=3, beta=3, c_a=2 (13 ranks): every rank received exactly its view, no rank a whole prompt."""
    prompts = _prompts(tmp_path, [9, 23, 40, 31, 6])
    out = tmp_path / "o.h5"
    result = rshard(13, ["run", "--model", tiny_bert, "--prompts", prompts, "--out", out, "--alpha", 3, "--beta", 3,
                         "--c-a", 2, "--batch-tokens", 50, "--quiet"])
    assert result.returncode == 0, result.stderr
    assert "privacy: plan delta=2 (required --min-delta 2, public prefix 0)" in result.stderr
    docs, report = _ledger(out)
    assert len(docs) >= 3  # one per batch
    spec = PlanSpec("strided", 3, 3, 1, 2)
    verdict = check_ledger(docs, spec, causal=False)
    assert verdict["consistent"] and verdict["none_seen_whole"], verdict
    assert report["ledger_check"]["consistent"] and report["ledger_check"]["none_seen_whole"]
    assert report["delta"] == 2 and report["meets_min_delta"]
    seen_ranks = set()
    for doc in docs:
        for rank, entry in doc["ranks"].items():
            seen_ranks.add(int(rank))
            for pid, forms in entry["prompts"].items():
                n = doc["prompts"][pid]["length"]
                view = plan_views(*make_plan(spec, n), 3, 3)[entry["node"]]
                got = ledger_positions(forms)
                want_forms = {"token_id", "partial"} if entry["node"].startswith("comp") else {"q", "k", "v"}
                assert set(got) == want_forms, (rank, pid, set(got))
                assert np.array_equal(np.unique(np.concatenate(list(got.values()))), view)
    assert seen_ranks == set(range(1, 13))
    assert {str(p) for doc in docs for p in doc["prompts"]} == {f"q{i}" for i in range(5)}


def test_weak_plan_is_refused_on_every_rank(tmp_path, tiny_bert):
    prompts = _prompts(tmp_path, [12, 30])
    exits = tmp_path / "exits"
    exits.mkdir()
    out = tmp_path / "o.h5"
    result = rshard(7, ["run", "--model", tiny_bert, "--prompts", prompts, "--out", out, "--alpha", 2, "--beta", 2,
                        "--quiet"], env={"RSHARD_EXIT_DIR": str(exits)})
    codes = {p.stem: int(p.read_text()) for p in exits.glob("*.exit")}
    assert result.returncode != 0 and result.stderr.count("rshard: error:") == 1, result.stderr
    assert "below the required --min-delta 2" in result.stderr
    assert "--alpha 3 --beta 3 --c 1 --c-a 2 (mpiexec -n 13)" in result.stderr
    assert sorted(codes) == [f"rank{r}" for r in range(7)] and all(c != 0 for c in codes.values()), codes
    assert not out.exists(), "a refused plan writes nothing"


def test_weak_plan_allowed_and_the_ledger_shows_it(tmp_path, tiny_bert):
    """alpha=2, beta=2 with --allow-weak-plan: the ledger check detects the AttnNodes that saw whole prompts."""
    prompts = _prompts(tmp_path, [12, 30])
    out = tmp_path / "o.h5"
    result = rshard(7, ["run", "--model", tiny_bert, "--prompts", prompts, "--out", out, "--alpha", 2, "--beta", 2,
                        "--quiet", "--allow-weak-plan"])
    assert result.returncode == 0, result.stderr
    assert "warning: running a plan below the required delta" in result.stderr
    docs, report = _ledger(out)
    verdict = check_ledger(docs, PlanSpec("strided", 2, 2, 1, 1), causal=False)
    assert verdict["consistent"] and not verdict["none_seen_whole"]
    assert {(w["node"], w["prompt"]) for w in verdict["seen_whole"]} == {
        (node, p) for node in ("attn0_1", "attn1_0") for p in ("q0", "q1")}
    assert report["delta"] == 0 and not report["meets_min_delta"] and report["allow_weak_plan"]
    assert report["suggestion"]["alpha"] == 3 and not report["ledger_check"]["none_seen_whole"]


def test_generation_ledger_key_counts(tmp_path, tiny_llama):
    """A causal job: decode steps add one position at a time; partial key counts match the plan."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("t5 t6 t7 t8 t9 t10 t11\nt3 t4 t12 t13 t14 t15 t16 t17 t18 t19 t20\n")
    out = tmp_path / "g.h5"
    result = rshard(13, ["run", "--task", "generate", "--model", tiny_llama, "--prompts", prompts, "--out", out,
                         "--alpha", 3, "--beta", 3, "--c-a", 2, "--max-new-tokens", 4, "--quiet"])
    assert result.returncode == 0, result.stderr
    docs, report = _ledger(out)
    spec = PlanSpec("strided", 3, 3, 1, 2)
    verdict = check_ledger(docs, spec, causal=True)
    assert verdict["consistent"] and verdict["none_seen_whole"], verdict
    assert docs[0]["prompts"]["1"]["plan_length"] == docs[0]["prompts"]["1"]["length"] + 4
    with h5py.File(out) as f:
        n_new = len(f["generated/token_ids"][0])
    received = set()
    for entry in docs[0]["ranks"].values():
        received |= set(ledger_positions(entry["prompts"]["1"]).get("token_id", np.zeros(0)).tolist())
    assert received == set(range(7 + n_new - 1))  # the prompt, then each new token but the last, to its CompNode
