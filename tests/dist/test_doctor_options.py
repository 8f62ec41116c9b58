"""`rshard doctor` checks the layout it is given: --alpha and --beta go together (before: either alone was
silently dropped and the verdict said OK)."""
import pytest
from conftest import rshard


@pytest.mark.parametrize("args,message", [
    (["--alpha", 2], "--alpha 2 needs --beta: give both (the layout to check) or neither (to list the layouts that fit)"),
    (["--beta", 2], "--beta 2 needs --alpha: give both"),
])
def test_alpha_and_beta_go_together(tmp_path, args, message):
    exits = tmp_path / "exits"
    exits.mkdir()
    result = rshard(7, ["doctor"] + args, env={"RSHARD_EXIT_DIR": str(exits)})
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("rshard: error:") == 1 and message in result.stderr, result.stderr
    assert "OK:" not in result.stdout
    assert sorted(int(p.read_text()) for p in exits.glob("*.exit")) == [2] * 7


def test_a_job_file_layout_takes_run_defaults(tmp_path):
    """A job file naming alpha alone runs with beta = 1 under `rshard run`: the doctor checks that layout."""
    job = tmp_path / "job.toml"
    job.write_text('prompts = "p.jsonl"\nout = "o.h5"\nalpha = 2\n')
    result = rshard(4, ["doctor", "--config", job])
    assert result.returncode == 0 and "layout alpha=2 beta=1 fits" in result.stdout, result.stdout + result.stderr
