"""Without --alpha/--beta `rshard run` takes the most private layout for its world size (a pure function of the
size and the options, so every rank finds the same one), says which, and refuses a size where none reaches
--min-delta, naming the smallest -n that does."""
import json

import h5py
import pytest
from click.testing import CliRunner
from conftest import rshard

from rshard_hpc import cli
from rshard_hpc.dist.topology import node_label
from rshard_hpc.errors import InputError
from rshard_hpc.plan.check import strided_delta
from rshard_hpc.plan.schemes import PlanSpec
from rshard_hpc.run import job as jobs
from rshard_hpc.run.options import RunOptions, default_layout, smallest_world


@pytest.mark.parametrize("world,layout", [
    (13, (3, 3, 1, 2, 2)),  # the smallest layout with delta = 2 (architecture.md §4)
    (14, (4, 3, 1, 2, 2)),
    (19, (9, 3, 1, 2, 2)),
    (20, (3, 4, 1, 2, 2)),  # AttnNodes see 2/4 of the positions, not 2/3
    (29, (3, 5, 1, 2, 2)),
    (12, (2, 3, 1, 2, 1)),  # (alpha - 1) * c = 1: below 2
    (4, (2, 1, 1, 2, 0)),
    (3, (1, 1, 1, 2, 0)),
])
def test_default_layout_for_world_sizes(world, layout):
    found = default_layout(world)
    assert (found["alpha"], found["beta"], found["c"], found["c_a"], found["delta"]) == layout
    assert 1 + found["alpha"] + found["beta"] ** 2 == world


def test_default_layout_keeps_the_chunks_given():
    assert default_layout(13, c_a=1)["delta"] == 1 and default_layout(13, c_a=1)["c_a"] == 1
    assert default_layout(13, 3)["c_a"] == 3 and default_layout(13, 3)["delta"] == 2  # alpha = 3, c = 1: gaps of 2
    assert default_layout(13, c=2, c_a=4)["delta"] == 4
    assert default_layout(2) is None and default_layout(1) is None


def test_default_layout_is_the_largest_delta_of_the_world_size():
    for world in range(3, 60):
        found = default_layout(world)
        best = max(strided_delta(PlanSpec("strided", world - 1 - b * b, b, 1, 2), 400)
                   for b in range(1, 8) if world - 1 - b * b >= 1)
        assert found["delta"] == best, world


@pytest.mark.parametrize("min_delta,c,c_a", [(2, None, None), (3, None, None), (4, 2, None), (2, None, 5),
                                             (1, None, None), (0, None, None), (3, None, 2)])
def test_smallest_world_is_the_first_that_reaches(min_delta, c, c_a):
    first = next((w for w in range(3, 200) if default_layout(w, min_delta, c, c_a)["delta"] >= min_delta), None)
    assert smallest_world(min_delta, c, c_a) == first


def test_options_resolve_the_layout():
    opts, line = RunOptions().with_layout(13)
    assert (opts.alpha, opts.beta, opts.c_a, opts.plan_spec().c) == (3, 3, 2, 1)
    assert line == "layout: alpha=3 beta=3 c_a=2 (the most private for 13 ranks; give --alpha/--beta to choose)"
    given = RunOptions(alpha=2, beta=2).with_layout(13)
    assert (given[0].alpha, given[0].beta, given[0].c_a, given[1]) == (2, 2, None, None)
    assert given[0].plan_spec().c_a == 1  # given layouts keep the old default chunks
    one = RunOptions(alpha=3).with_layout(13)[0]
    assert (one.alpha, one.beta) == (3, 1)
    weak, _ = RunOptions(allow_weak_plan=True).with_layout(4)
    assert (weak.alpha, weak.beta) == (2, 1)
    with pytest.raises(InputError, match="--scheme explicit needs --alpha and --beta"):
        RunOptions(scheme="explicit", plan_file="p.json").with_layout(13)
    with pytest.raises(InputError, match=r"none does with --c-a 1 \(no AttnNode gap exceeds c_a\): give --c-a 2"):
        RunOptions(c_a=1).with_layout(13)


def test_not_given_reaches_the_job_as_none(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(jobs, "run", seen.append)
    runner = CliRunner()
    assert runner.invoke(cli.main, ["run", "--prompts", "p", "--out", "o"], catch_exceptions=False).exit_code == 0
    assert (seen[0].alpha, seen[0].beta, seen[0].c, seen[0].c_a) == (None, None, None, None)
    job = tmp_path / "job.toml"
    job.write_text('prompts = "p"\nout = "o"\nalpha = 3\nbeta = 3\n')
    assert runner.invoke(cli.main, ["run", "--config", job], catch_exceptions=False).exit_code == 0
    assert (seen[1].alpha, seen[1].beta, seen[1].c_a) == (3, 3, None)


def test_thirteen_ranks_without_a_layout(tmp_path, tiny_bert):
    """The default layout on 13 ranks runs, says so, and is what the results file records."""
    prompts, out = tmp_path / "p.txt", tmp_path / "o.h5"
    prompts.write_text("t1 t2 t3 t4 t5 t6 t7 t8 t9\nt3\n")
    result = rshard(13, ["run", "--model", tiny_bert, "--prompts", prompts, "--out", out, "--quiet"])
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == ("[rshard] layout: alpha=3 beta=3 c_a=2 (the most private for 13 ranks; give --alpha/--beta "
                        "to choose)")
    assert lines[1].startswith(f"[rshard] embed with {tiny_bert}: 2 prompts, 10 tokens, alpha=3 beta=3 (13 ranks), "
                               f"plan strided c=1 c_a=2")
    assert not any(line.startswith("[rshard] batch ") for line in lines)  # --quiet: no progress lines
    with h5py.File(out, "r") as f:
        assert (f.attrs["alpha"], f.attrs["beta"], json.loads(f.attrs["plan_params"])["c_a"]) == (3, 3, 2)
        assert f.attrs["model"] == str(tiny_bert) and f.attrs["model_name"]
        exposed = json.loads(f["privacy/json"][()])["exposed_prompts"]
    # the one-token prompt: every node that sees it whole is named (CompNode 0 and five AttnNodes)
    whole = exposed["2"]["seen_whole_by"]
    assert len(whole) == 6
    warning = next(line for line in lines if "too short" in line)
    assert warning == ("[rshard] warning: 1 prompt is too short for this plan to split: the nodes named see it "
                       f"whole: 2 (1 token: {', '.join(node_label(n) for n in whole)})")


def test_no_layout_of_four_ranks_reaches_delta_two(tmp_path, tiny_bert):
    prompts, out = tmp_path / "p.txt", tmp_path / "o.h5"
    prompts.write_text("t1 t2 t3 t4 t5 t6 t7 t8 t9\n")
    result = rshard(4, ["run", "--model", tiny_bert, "--prompts", prompts, "--out", out, "--quiet"])
    assert result.returncode == 2
    assert result.stderr.count("rshard: error:") == 1, result.stderr
    assert ("rshard: error: no layout of 4 ranks reaches --min-delta 2 (the most private, alpha=2 beta=1 c=1 c_a=2, "
            "has delta=0 on long prompts); the smallest world size that does is 13 (mpiexec -n 13: alpha=3 beta=3 "
            "c_a=2)") in result.stderr
    assert not out.exists()
