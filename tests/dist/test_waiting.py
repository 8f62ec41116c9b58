"""Waiting ranks sleep between polls where ranks outnumber cores (issue 13): the choice, and that a job's results
do not depend on it; there ranks also run under the kernel's batch policy (RSHARD_SCHED)."""
import os

import h5py
import pytest
from conftest import rshard

from rshard_hpc.dist.launcher import (LOCAL_SIZE_VARS, NODE_SIZE_VARS, SCHED_ENV, WAIT_ENV,
                                      batch_policy_wanted, oversubscribed, sleep_while_waiting)
from rshard_hpc.errors import InputError


@pytest.mark.parametrize("var,wanted,on,off", [(WAIT_ENV, sleep_while_waiting, "sleep", "spin"),
                                               (SCHED_ENV, batch_policy_wanted, "batch", "normal")])
def test_on_when_oversubscribed_unless_told(monkeypatch, var, wanted, on, off):
    """Sleeping waits and the batch policy: on where ranks outnumber cores, unless the variable says (any case)."""
    for name in NODE_SIZE_VARS + (var,):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert not oversubscribed() and not wanted()
    monkeypatch.setenv(LOCAL_SIZE_VARS[0], "5")
    assert oversubscribed() and wanted()
    monkeypatch.setenv(var, off)
    assert not wanted()
    monkeypatch.setenv(LOCAL_SIZE_VARS[0], "4")
    monkeypatch.setenv(var, on.capitalize())
    assert wanted()
    monkeypatch.setenv(var, "nap")
    with pytest.raises(InputError, match=f"{var} must be {on} or {off}"):
        wanted()


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="no SCHED_BATCH on this system")
def test_every_rank_runs_under_the_policy_asked(tmp_path, tiny_bert):
    """RSHARD_SCHED=batch: every rank of the job under SCHED_BATCH; normal: none; a bad value: a clear error and a
    non-zero exit, no results."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"w{i} " * (3 + 5 * i) + "\n" for i in range(4)))
    args = ["run", "--model", tiny_bert, "--prompts", prompts, "--alpha", 1, "--beta", 1, "--quiet",
            "--allow-weak-plan"]
    for mode in ("batch", "normal"):
        folder = tmp_path / mode
        folder.mkdir()
        result = rshard(3, args + ["--out", folder / "o.h5"], env={"RSHARD_EXIT_DIR": str(folder), SCHED_ENV: mode})
        assert result.returncode == 0, result.stderr
        policies = {(folder / f"rank{r}.sched").read_text() for r in range(3)}
        assert policies == {"batch" if mode == "batch" else "other"}, (mode, policies)
    result = rshard(3, args + ["--out", tmp_path / "bad.h5"], env={SCHED_ENV: "fifo"})
    assert result.returncode != 0 and "RSHARD_SCHED must be batch or normal" in result.stderr
    assert not (tmp_path / "bad.h5").exists()


def test_results_alike_sleeping_or_spinning(tmp_path, tiny_bert):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"w{i} " * (3 + 7 * i) + "\n" for i in range(6)))
    rows = {}
    for mode in ("sleep", "spin"):
        out = tmp_path / f"{mode}.h5"
        result = rshard(7, ["run", "--model", tiny_bert, "--prompts", prompts, "--out", out, "--alpha", 2, "--beta", 2,
                            "--batch-tokens", 40, "--quiet", "--allow-weak-plan"], env={WAIT_ENV: mode})
        assert result.returncode == 0, result.stderr
        with h5py.File(out) as f:
            rows[mode] = (f["embeddings"][()].tobytes(), list(f["privacy/ledger"][()]))
    assert rows["sleep"] == rows["spin"]


def test_blas_threads_share_the_cores_among_a_nodes_ranks(monkeypatch):
    from rshard_hpc.dist import launcher

    env = {}  # a private environment: what the function sets must not reach later tests' jobs
    monkeypatch.setattr(launcher.os, "environ", env)
    monkeypatch.setattr(launcher.os, "cpu_count", lambda: 16)
    launcher.share_cores_among_ranks()  # no launcher: nothing set
    assert env == {}
    env.update({LOCAL_SIZE_VARS[0]: "7", "MKL_NUM_THREADS": "3"})  # the user's own setting stays
    launcher.share_cores_among_ranks()
    assert env["OPENBLAS_NUM_THREADS"] == env["OMP_NUM_THREADS"] == "2" and env["MKL_NUM_THREADS"] == "3"
    env.clear()
    env.update({LOCAL_SIZE_VARS[1]: "13"})  # Open MPI's count too
    launcher.share_cores_among_ranks()
    assert env["OPENBLAS_NUM_THREADS"] == "1"
