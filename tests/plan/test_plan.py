"""Plan and routing invariants for many (N, alpha, beta, c, c_a), including N smaller than alpha or beta."""
import itertools

import numpy as np
import pytest

from rshard_hpc.engine.routing import Routing, StepTokens
from rshard_hpc.errors import InputError
from rshard_hpc.plan.check import plan_report
from rshard_hpc.plan.schemes import PlanSpec, make_plan
from rshard_hpc.plan.views import min_interior_gap, runs_of

LAYOUTS = [(1, 1), (2, 2), (3, 2), (2, 3), (4, 3), (5, 1), (1, 4)]
SIZES = [0, 1, 2, 3, 7, 16, 61]
CHUNKS = [(1, 1), (2, 1), (3, 2), (1, 5)]


def check_routing(plans, ranges, alpha, beta):
    tokens = StepTokens.from_plans(plans, [np.arange(a, b) for a, b in ranges])
    routing = Routing(tokens, alpha, beta)
    n = len(tokens)
    # CompNode shards partition the step's tokens, each in global order
    owned = np.concatenate(routing.comp_tokens) if alpha else np.zeros(0)
    assert sorted(owned.tolist()) == list(range(n))
    for k in range(alpha):
        mine = routing.comp_tokens[k]
        assert np.all(np.diff(mine) > 0) and np.all(tokens.comp[mine] == k)
        local = np.concatenate(routing.by_group[k])
        assert sorted(local.tolist()) == list(range(len(mine)))
        for g in range(beta):
            assert np.all(tokens.group[mine[routing.by_group[k][g]]] == g)
            assert routing.counts[k, g] == len(routing.by_group[k][g])
    assert routing.counts.sum() == n
    # q of each token reaches the beta AttnNodes of its row; k/v those of its column
    q_hits = np.zeros(n, int)
    kv_hits = np.zeros(n, int)
    for i, j in itertools.product(range(beta), repeat=2):
        q_tok, kv_tok = routing.attn_q_tokens(i), routing.attn_kv_tokens(j)
        assert np.all(tokens.group[q_tok] == i) and np.all(tokens.group[kv_tok] == j)
        q_hits[q_tok] += 1
        kv_hits[kv_tok] += 1
    assert np.all(q_hits == beta) and np.all(kv_hits == beta)


@pytest.mark.parametrize("alpha,beta", LAYOUTS)
@pytest.mark.parametrize("c,c_a", CHUNKS)
def test_strided_plan_and_routing(alpha, beta, c, c_a):
    spec = PlanSpec("strided", alpha, beta, c, c_a)
    plans = []
    for n in SIZES:
        comp, group = make_plan(spec, n)
        p = np.arange(n)
        assert comp.shape == group.shape == (n,)
        assert np.array_equal(comp, (p // c) % alpha) and np.array_equal(group, (p // c_a) % beta)
        plans.append((comp, group))
    check_routing(plans, [(0, n) for n in SIZES], alpha, beta)  # a ragged prefill step
    check_routing(plans, [(n - 1, n) if n else (0, 0) for n in SIZES], alpha, beta)  # a decode step


@pytest.mark.parametrize("alpha,beta", LAYOUTS)
def test_random_plan_is_seeded_and_valid(alpha, beta):
    spec = PlanSpec("random", alpha, beta, 2, 3, seed=5)
    for n in SIZES:
        comp, group = make_plan(spec, n)
        comp2, group2 = make_plan(spec, n)
        assert np.array_equal(comp, comp2) and np.array_equal(group, group2)
        assert comp.min(initial=0) >= 0 and comp.max(initial=0) < alpha
        assert group.min(initial=0) >= 0 and group.max(initial=0) < beta
        if alpha > 1 and n > 2:  # neighbouring chunks go to different CompNodes
            chunks = comp[::2]
            assert np.all(chunks[1:] != chunks[:-1])
    plans = [make_plan(spec, n) for n in SIZES]
    check_routing(plans, [(0, n) for n in SIZES], alpha, beta)


def test_explicit_plan_and_its_errors():
    # the design's figure (architecture.md §3)'s two CompNode shards and index groups (1-based positions there)
    comp = [0, 0, 1, 1, 0, 0, 1, 1]  # positions 1,2,8,9 | 3,4,10,11 -> renumbered 0..7
    group = [0, 1, 0, 1, 0, 1, 0, 1]
    spec = PlanSpec("explicit", 2, 2, explicit={"comp": comp, "group": group})
    c, g = make_plan(spec, 6)
    assert c.tolist() == comp[:6] and g.tolist() == group[:6]
    with pytest.raises(InputError, match="covers 8 positions"):
        make_plan(spec, 9)
    with pytest.raises(InputError, match=r"\[0, 2\)"):
        make_plan(PlanSpec("explicit", 2, 2, explicit={"comp": [0, 2], "group": [0, 0]}), 2)
    with pytest.raises(InputError, match="plan file"):
        PlanSpec("explicit", 2, 2).check()
    with pytest.raises(InputError, match="chunk"):
        PlanSpec("strided", 2, 2, 0, 1).check()


def test_runs_and_gaps():
    assert runs_of(np.array([0, 1, 4, 5, 6, 9])) == [(0, 2), (4, 3), (9, 1)]
    assert min_interior_gap(np.array([0, 1, 4, 5, 6, 9])) == 2
    assert min_interior_gap(np.array([1, 4]), public_prefix=1) == 2
    assert min_interior_gap(np.array([3, 4])) == float("inf")  # one run: the first-run exposure


def test_privacy_of_strided_layouts():
    n = 240
    # beta = 2: the off-diagonal AttnNodes see every position, so no privacy at all
    report = plan_report(PlanSpec("strided", 2, 2, 1, 1), n)
    assert report["delta"] == 0 and report["nodes"]["attn0_1"]["sees_all"]
    # architecture.md §4: alpha = 3, c = 1, beta = 3, c_a = 2 gives delta = 2 (interior gaps (alpha-1)c and c_a)
    spec = PlanSpec("strided", 3, 3, 1, 2)
    report = plan_report(spec, n)
    assert report["delta"] == 2
    assert plan_report(spec, n, public_prefix=1)["delta"] == 2
    assert all(not v["sees_all"] for v in report["nodes"].values())
    assert report["nodes"]["comp0"]["fraction_seen"] == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------------ plan inputs
@pytest.mark.parametrize("text,message", [
    ('[[0, 1], [0, 1]]', 'must be an object {"comp": [...], "group": [...]}, not a list'),
    ('{"comp": [0, 1, 2]}', 'lacks "group" (a list of integers in [0, 3))'),
    ('{"group": [0, 1, 2]}', 'lacks "comp"'),
    ('{"comp": "012", "group": [0, 1, 2]}', '"comp" must be a list of integers, not a str'),
    ('{"comp": ["0", 1, 2], "group": [0, 1, 2]}', '"comp"[0] is "0"; values must be integers in [0, 3) (--alpha 3)'),
    ('{"comp": [0, 1.7, 2], "group": [0, 1, 2]}', '"comp"[1] is 1.7; values must be integers'),
    ('{"comp": [0, 1, 2.0], "group": [0, 1, 2]}', '"comp"[2] is 2.0; values must be integers'),  # not truncated
    ('{"comp": [0, 1, true], "group": [0, 1, 2]}', '"comp"[2] is true'),
    ('{"comp": [0, -1, 2], "group": [0, 1, 2]}', '"comp"[1] is -1'),
    ('{"comp": [0, 1, 2], "group": [0, 3, 2]}', '"group"[1] is 3; values must be integers in [0, 3) (--beta 3)'),
    ('{"comp": [0, 1, 2, 0], "group": [0, 1, 2]}', '"comp" has 4 positions, "group" 3; they must be equally long'),
])
def test_bad_plan_files_are_refused(tmp_path, text, message):
    from rshard_hpc.run.options import RunOptions

    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        RunOptions(alpha=3, beta=3, scheme="explicit", plan_file=str(path)).plan_spec()
    assert str(info.value).startswith(f"plan file {path}") and message in str(info.value)


def test_plan_options_that_would_be_ignored_or_meaningless_are_refused(tmp_path):
    from rshard_hpc.run.options import RunOptions

    path = tmp_path / "plan.json"
    path.write_text('{"comp": [0, 1, 2], "group": [0, 1, 2]}')
    assert RunOptions(alpha=3, beta=3, scheme="explicit", plan_file=str(path)).plan_spec().explicit["comp"] == [0, 1, 2]
    with pytest.raises(InputError, match=f"--plan-file {path} needs --scheme explicit"):
        RunOptions(alpha=3, beta=3, plan_file=str(path)).plan_spec()  # strided: the file was silently ignored
    with pytest.raises(InputError, match=r"--min-delta must be >= 0 \(0: no privacy check\), got -1"):
        RunOptions(alpha=3, beta=3, min_delta=-1).plan_spec()
    with pytest.raises(InputError, match="--alpha and --beta must be >= 1"):
        PlanSpec("strided", 0, 3).check()


@pytest.mark.parametrize("args,message", [
    (["--vocab", 0], "--vocab must be >= 2, a vocabulary to guess from (got 0)"),
    (["--vocab", -1], "--vocab must be >= 2"),
    (["--vocab", 1], "--vocab must be >= 2"),
    (["--length", 0], "--length must be >= 1 (got 0)"),
    (["--public-prefix", -1], "--public-prefix must be >= 0 (got -1)"),
    (["--delta", -1], "--delta must be >= 0 (got -1)"),
    (["--search-max", 0], "--search-max must lie in [1, 32] (got 0)"),
    (["--alpha", 0], "--alpha and --beta must be >= 1 (got alpha=0, beta=3)"),
    (["--c", 0], "chunk lengths must be >= 1"),
    (["--plan-file", "plan.json"], "--plan-file plan.json needs --scheme explicit"),
    (["--scheme", "explicit", "--plan-file", "plan.json"], 'plan file plan.json: "comp"[1] is 1.5'),
])
def test_rshard_plan_refuses_bad_values(tmp_path, monkeypatch, args, message):
    from click.testing import CliRunner

    from rshard_hpc.cli import main as cli_main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "plan.json").write_text('{"comp": [0, 1.5], "group": [0, 1]}')
    result = CliRunner().invoke(cli_main, ["plan", "--alpha", 3, "--beta", 3, "--c-a", 2] + args)
    assert result.exit_code == 2, result.output
    assert result.output.count("rshard: error:") == 1 and message in result.output, result.output
