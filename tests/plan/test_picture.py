"""Who sees what, as a picture (plan/picture.py): the cells, δ and fractions agree with the plan report; a ledger
that received exactly the plan's views draws the plan's picture; `rshard plan --picture` writes a real PNG or SVG."""
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from rshard_hpc.cli import main as cli_main
from rshard_hpc.dist.topology import rank_layout
from rshard_hpc.errors import InputError
from rshard_hpc.plan.check import plan_report
from rshard_hpc.plan.picture import (
    DELTA_GAP,
    GAP,
    PUBLIC,
    SEEN_ATTN,
    SEEN_COMP,
    UNSEEN,
    cell_states,
    draw,
    ledger_picture,
    plan_picture,
)
from rshard_hpc.plan.schemes import PlanSpec, make_plan
from rshard_hpc.plan.views import blocks_of, plan_views

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SPECS = [PlanSpec("strided", 3, 3, 1, 2), PlanSpec("strided", 2, 2, 2, 1), PlanSpec("random", 3, 3, 1, 2, seed=4),
         PlanSpec("strided", 1, 1)]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n, public_prefix", [(40, 0), (17, 2), (1, 0)])
def test_delta_and_fractions_are_the_plan_reports(spec, n, public_prefix):
    pic = plan_picture(spec, n, public_prefix)
    report = plan_report(spec, n, public_prefix)
    assert pic.delta == report["delta"]
    assert [row.node for row in pic.rows] == [r["node"] for r in rank_layout(spec.alpha, spec.beta)][1:]
    for row in pic.rows:
        assert row.report["fraction_seen"] == report["nodes"][row.node]["fraction_seen"]


@pytest.mark.parametrize("spec", SPECS)
def test_cells_shade_each_view_and_mark_gaps_and_the_public_prefix(spec):
    n, public_prefix = 30, 1
    pic = plan_picture(spec, n, public_prefix)
    views = plan_views(*make_plan(spec, n), spec.alpha, spec.beta)
    states = cell_states(pic)
    for r, row in enumerate(pic.rows):
        seen = np.zeros(n, bool)
        seen[views[row.node]] = True
        seen[:public_prefix] = False
        assert np.array_equal(np.isin(states[r], [SEEN_COMP, SEEN_ATTN]), seen), row.node
        assert np.all(states[r, :public_prefix] == PUBLIC)
        gaps = np.isin(states[r], [GAP, DELTA_GAP])
        assert not np.any(gaps & seen)
        if row.report["min_gap"] == pic.delta and pic.delta > 0:
            assert np.any(states[r] == DELTA_GAP)
    assert set(np.unique(states)) <= {UNSEEN, PUBLIC, GAP, DELTA_GAP, SEEN_COMP, SEEN_ATTN}


def test_a_ledger_of_the_plans_views_draws_the_plans_picture():
    spec, n = PlanSpec("strided", 3, 3, 1, 2), 23
    views = plan_views(*make_plan(spec, n), spec.alpha, spec.beta)
    ranks = {str(r["rank"]): {"node": r["node"], "prompts": {'"7"': {"q": blocks_of(views[r["node"]])}}}
             for r in rank_layout(3, 3) if r["node"] != "client"}
    docs = [{"prompts": {"other": {"length": 5, "plan_length": 5}}, "ranks": {}},
            {"prompts": {'"7"': {"length": n, "plan_length": n}}, "ranks": ranks}]
    from_ledger, from_plan = ledger_picture(docs, '"7"', spec.params(), 1), plan_picture(spec, n, 1)
    assert from_ledger.delta == from_plan.delta and from_ledger.n == n and from_ledger.prompt_length is None
    assert np.array_equal(cell_states(from_ledger), cell_states(from_plan))
    assert '"7"' in from_ledger.title
    with pytest.raises(InputError, match="no ledger entry for prompt 8"):
        ledger_picture(docs, "8", spec.params())


def test_rshard_plan_draws_a_png_and_an_svg(tmp_path):
    runner = CliRunner()
    png, svg = tmp_path / "plan.png", tmp_path / "plan.svg"
    args = ["plan", "--alpha", 3, "--beta", 3, "--c-a", 2, "--length", 40]
    result = runner.invoke(cli_main, args + ["--picture", str(png)])
    assert result.exit_code == 0, result.output
    assert "delta = 2" in result.stdout and f"picture in {png}" in result.stderr
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 1000
    result = runner.invoke(cli_main, args + ["--json", "--picture", str(svg)])
    assert result.exit_code == 0, result.output
    assert result.stdout.lstrip().startswith("{")  # --json stays plain JSON
    assert "<svg" in svg.read_text()


def test_rshard_plan_refuses_a_picture_it_cannot_write(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli_main, ["plan", "--alpha", 2, "--beta", 2, "--picture", str(tmp_path / "p.pdf")])
    assert result.exit_code == 2 and "rshard: error: --picture" in result.stderr and ".png or .svg" in result.stderr
    result = runner.invoke(cli_main, ["plan", "--alpha", 2, "--beta", 2, "--picture", str(tmp_path / "no" / "p.png")])
    assert result.exit_code == 2 and "cannot write picture" in result.stderr


def test_a_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import fails
    with pytest.raises(InputError, match=r"pip install 'rshard_hpc\[plot\]'"):
        draw(plan_picture(PlanSpec("strided", 2, 2), 8), tmp_path / "p.png")
