"""RSHARD_TRACE: every rank of a real job writes its host timeline, and `rshard bench trace` lays them out."""
import pytest
from conftest import rshard, write_prompts

from rshard_hpc.bench import trace_report


@pytest.fixture(scope="module")
def traced(tmp_path_factory, tiny_llama):
    """A 3-rank generation job (prefill, then decode steps) run with RSHARD_TRACE."""
    tmp = tmp_path_factory.mktemp("trace")
    prompts = write_prompts(tmp, 3, seed=5)
    folder = tmp / "trace"
    result = rshard(3, ["run", "--task", "generate", "--model", tiny_llama, "--prompts", prompts, "--out",
                        tmp / "out.h5", "--alpha", 1, "--beta", 1, "--max-new-tokens", 3, "--allow-weak-plan",
                        "--client-layers", 0], env={"RSHARD_TRACE": str(folder)})
    assert result.returncode == 0, result.stderr
    return folder


def test_every_rank_writes_its_timeline(traced):
    ranks = trace_report.load(traced)
    assert sorted(ranks) == [0, 1, 2]
    assert [r["role"] for _, r in sorted(ranks.items())][1:] == ["rank 1 (CompNode 0)", "rank 2 (AttnNode (0, 0))"]
    for rank, r in ranks.items():
        labels = [label for _, label in r["events"]]
        times = [t for t, _ in r["events"]]
        assert times == sorted(times), f"rank {rank}: marks out of order"
        for mark in ("process", "mpi up", "set up", "exit"):
            assert mark in labels, (rank, mark)
        steps = trace_report.split_steps(r["events"])
        assert len(steps) == 3, (rank, len(steps))  # the prefill and two decode steps (three new tokens)
        if rank:  # a worker: one "layer" mark a layer of each step, each step closed by "step end"
            assert all(sum(label == "layer" for _, label in s) == sum(label == "layer" for _, label in steps[0])
                       for s in steps)
            assert all(s[-1][1] == "step end" for s in steps)


def test_report_lays_out_start_up_steps_and_a_layer(traced):
    text = trace_report.report(traced, steps="1:", layer=0)
    assert "## start-up" in text and "| 2 | rank 2 (AttnNode (0, 0)) |" in text
    assert "x mpi" in text  # the transport's marks reached the per-rank table
    timeline = text.split("```")[1].strip().splitlines()
    ranks = {line.split("rank")[1].split()[0] for line in timeline}
    assert ranks == {"1", "2"}  # the workers' marks of that layer, side by side


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="RSHARD_TRACE"):
        trace_report.load(tmp_path)
