"""`rshard plan --collude N` (rshard_hpc/plan/collude.py): the union view of the worst N colluding nodes."""
from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
from click.testing import CliRunner

from rshard_hpc.cli import main
from rshard_hpc.errors import InputError
from rshard_hpc.plan import collude
from rshard_hpc.plan.collude import union_delta, worst_coalition
from rshard_hpc.plan.estimates import (
    AUDIT_BEST,
    RECOMMENDED_CLIENT_LAYERS,
    audit_estimate,
)
from rshard_hpc.plan.schemes import PlanSpec, make_plan
from rshard_hpc.plan.views import plan_views


def _brute(views, n, count, public_prefix=0):
    """Every subset's union, by sets: the most positions, then the smallest δ (gaps read off the sets)."""
    best = None
    for names in combinations(views, count):
        union = set()
        for x in names:
            union |= {int(p) for p in views[x]}
        known = union | set(range(public_prefix))
        if all(p in known for p in range(n)) and n > public_prefix:
            delta = 0.0
        else:
            gaps, run_gaps, prev, gap = [], [], False, 0
            for p in range(public_prefix, n):
                if p in known and not prev:
                    run_gaps.append(gap)
                gap = 0 if p in known else gap + 1
                prev = p in known
            gaps = run_gaps[1:]
            delta = float(min(gaps)) if gaps else float("inf")
        score = (len(union), -delta)
        if best is None or score > best[0]:
            best = (score, union)
    return best


@pytest.mark.parametrize("alpha,beta,c,c_a,n,pp", [(3, 3, 1, 2, 24, 0), (2, 3, 1, 1, 17, 0), (4, 3, 1, 3, 30, 2),
                                                   (3, 2, 2, 1, 12, 1)])
def test_union_matches_brute_force(alpha, beta, c, c_a, n, pp):
    spec = PlanSpec(alpha=alpha, beta=beta, c=c, c_a=c_a)
    views = plan_views(*make_plan(spec, n), alpha, beta)
    for count in range(1, len(views) + 1):
        got = worst_coalition(views, n, count, pp)
        (seen, neg_delta), _ = _brute(views, n, count, pp)
        assert got["seen"] == seen and got["delta"] == -neg_delta, count
        mine = set()
        for x in got["nodes"]:
            mine |= set(views[x].tolist())
        assert len(mine) == got["seen"] and len(got["nodes"]) == count
        assert got["method"] == "every subset"


def test_default_layout_two_attn_nodes_see_everything():
    """At α = 3, β = 3, c_a = 2 two AttnNodes cover the three groups: together they see every position."""
    spec = PlanSpec(alpha=3, beta=3, c=1, c_a=2)
    views = plan_views(*make_plan(spec, 48), 3, 3)
    one, two = worst_coalition(views, 48, 1), worst_coalition(views, 48, 2)
    assert one["fraction_seen"] == pytest.approx(2 / 3) and one["delta"] == 2
    assert two["sees_all"] and two["delta"] == 0 and two["fraction_seen"] == 1.0


def test_greedy_above_the_limit(monkeypatch):
    spec = PlanSpec(alpha=3, beta=3, c=1, c_a=2)
    views = plan_views(*make_plan(spec, 24), 3, 3)
    monkeypatch.setattr(collude, "EXACT_LIMIT", 1)
    got = worst_coalition(views, 24, 2)
    assert got["method"] == "greedy" and got["seen"] == 24
    assert union_delta(np.arange(24), 24) == 0.0


@pytest.mark.parametrize("count,message", [(0, "--collude must be >= 1"), (13, "more than the 12 nodes")])
def test_bad_counts(count, message):
    views = plan_views(*make_plan(PlanSpec(alpha=3, beta=3, c=1, c_a=2), 12), 3, 3)
    with pytest.raises(InputError, match=message):
        worst_coalition(views, 12, count)


def _plan(*args):
    return CliRunner().invoke(main, ["plan", "--alpha", "3", "--beta", "3", "--c-a", "2", "--length", "24",
                                     "--vocab", "49152", "--public-prefix", "0", "--causal", *args])


def test_cli_collude():
    res = _plan("--collude", "1")
    assert res.exit_code == 0, res.output
    assert "worst 1 colluding node (every subset)" in res.output and "together see 16/24 (66.7%), delta = 2" in res.output
    res = _plan("--collude", "3", "--json")
    assert res.exit_code == 0 and '"collude"' in res.output and '"sees_all": true' in res.output


@pytest.mark.parametrize("value,message", [("0", "--collude must be >= 1"), ("13", "more than the 12 nodes"),
                                           ("x", "is not a valid integer")])
def test_cli_collude_errors(value, message):
    res = _plan("--collude", value)
    assert res.exit_code == 2 and message in res.output, res.output


def test_audit_estimate():
    got = audit_estimate(RECOMMENDED_CLIENT_LAYERS)
    assert got["measured_at"] == RECOMMENDED_CLIENT_LAYERS and set(got["best_attack"]) == set(AUDIT_BEST[0])
    assert audit_estimate(3)["measured_at"] == 2 and audit_estimate(40)["measured_at"] == max(AUDIT_BEST)
    assert got["meets_goal"] == (got["worst_node_fraction"] <= 0.10)
    with pytest.raises(InputError):
        audit_estimate(-1)
