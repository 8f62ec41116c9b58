"""SIGTERM (a Slurm time limit, scancel, kill) ends a run promptly on every rank, with a message and status
143, and never cuts a results write: the batch being written when the signal came is in the file, whole,
and --resume completes the job with the results of an uninterrupted run (rshard_hpc/termination.py)."""
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import mpi_env, rshard, wait_for_file, wait_for_ranks_gone, write_prompts

from rshard_hpc.run.termination import EXIT_STATUS, TERM_GRACE_S

END_WITHIN_S = 60
N_PROMPTS = 12
BASE = ["run", "--alpha", 2, "--beta", 2, "--batch-tokens", 40, "--quiet", "--allow-weak-plan"]


def _start(tmp_path, tiny_bert, out, hooks: dict):
    """The job on 7 ranks in the background, with test hooks; (process, pid folder)."""
    pids = tmp_path / "pids"
    pids.mkdir(exist_ok=True)
    launcher = shutil.which("mpiexec") or pytest.skip("mpiexec not found (pip install mpich)")
    args = BASE + ["--model", tiny_bert, "--prompts", write_prompts(tmp_path, N_PROMPTS, seed=5), "--out", out]
    cmd = [launcher, "-n", "7", sys.executable, "-m", "rshard_hpc"] + [str(a) for a in args]
    env = mpi_env(dict(hooks, RSHARD_PID_DIR=str(pids)))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env), pids


def _signal_and_wait(proc, pid_files):
    sent = time.monotonic()
    for pid_file in pid_files:
        try:
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        _, stderr = proc.communicate(timeout=END_WITHIN_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"hang: the job did not end within {END_WITHIN_S} s of SIGTERM")
    return stderr, time.monotonic() - sent


def _finished(out, pids):
    wait_for_ranks_gone(pids)  # the launcher may return while a killed rank is still closing the file
    with h5py.File(out, "r") as f:  # a readable file whose rows and ids agree
        ids = [x.decode() for x in f["ids"][()]]
        assert f["embeddings"].shape[0] == len(ids)
        return ids, f["embeddings"][()], len(f["privacy/ledger"])


def _resume_equals_whole_run(tmp_path, tiny_bert, out):
    prompts = tmp_path / "prompts.jsonl"
    resumed = rshard(7, BASE + ["--model", tiny_bert, "--prompts", prompts, "--out", out, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    whole = rshard(7, BASE + ["--model", tiny_bert, "--prompts", prompts, "--out", tmp_path / "whole.h5"])
    assert whole.returncode == 0, whole.stderr
    with h5py.File(out, "r") as a, h5py.File(tmp_path / "whole.h5", "r") as b:
        assert list(a["ids"][()]) == list(b["ids"][()]) == [f"p{i}".encode() for i in range(N_PROMPTS)]
        np.testing.assert_array_equal(a["embeddings"][()], b["embeddings"][()])


@pytest.mark.parametrize("target", ["ranks", "mpiexec"])
def test_sigterm_during_a_results_write(tmp_path, tiny_bert, target):
    """What a Slurm time limit does: every rank gets SIGTERM (or mpiexec does and forwards it), here while the
    client writes batch 2 (held open 3 s by a test hook). The write finishes, then the job ends; batch 2 is in."""
    out = tmp_path / "term.h5"
    proc, pids = _start(tmp_path, tiny_bert, out, {"RSHARD_TEST_SLOW_WRITE_S": "3"})
    wait_for_file(pids / "writing2", proc)
    if target == "mpiexec":
        (pids / "launcher.pid").write_text(str(proc.pid))
    stderr, took = _signal_and_wait(proc, [pids / "launcher.pid"] if target == "mpiexec" else
                                    sorted(pids.glob("rank*.pid")))
    assert proc.returncode == EXIT_STATUS, stderr
    assert "rshard: terminated by SIGTERM: " in stderr and "--resume to finish" in stderr, stderr
    assert took < TERM_GRACE_S + 10
    ids, _, ledgers = _finished(out, pids)
    assert ledgers == 2, "the batch being written and its ledger are both in"
    assert f"{len(ids)} of {N_PROMPTS} prompts are in" in stderr, stderr
    assert 2 <= len(ids) < N_PROMPTS and ids == [f"p{i}" for i in range(len(ids))]
    _resume_equals_whole_run(tmp_path, tiny_bert, out)


def test_sigterm_to_the_client_between_batches(tmp_path, tiny_bert):
    """`kill` of the client while it computes: the job ends at once (no write to wait for)."""
    out = tmp_path / "term.h5"
    proc, pids = _start(tmp_path, tiny_bert, out, {"RSHARD_TEST_SLOW_BATCH_S": "3"})
    wait_for_file(pids / "batch2.done", proc)
    stderr, took = _signal_and_wait(proc, [pids / "rank0.pid"])
    assert proc.returncode == EXIT_STATUS, stderr
    assert "rshard: terminated by SIGTERM: " in stderr, stderr
    assert took < TERM_GRACE_S, "the client does not wait for a grace period"
    ids, _, ledgers = _finished(out, pids)
    assert ledgers == 2 and len(ids) >= 2


def test_sigterm_to_one_worker_ends_the_job(tmp_path, tiny_bert):
    """`kill` of one AttnNode alone: it takes no further step and waits TERM_GRACE_S for a client that is not
    coming, then ends the job; the client, waiting on it, is not writing then (a worker serving on through its
    grace had the abort land on the client's write of a later batch: rows without their ids)."""
    out = tmp_path / "term.h5"
    proc, pids = _start(tmp_path, tiny_bert, out, {"RSHARD_TEST_SLOW_BATCH_S": "3"})
    wait_for_file(pids / "batch1.done", proc)
    stderr, took = _signal_and_wait(proc, [pids / "rank4.pid"])
    assert proc.returncode == EXIT_STATUS, stderr
    assert "rshard: rank 4 (AttnNode (0, 1)) terminated by SIGTERM" in stderr, stderr
    assert TERM_GRACE_S <= took < TERM_GRACE_S + 10
    ids, _, _ = _finished(out, pids)
    assert len(ids) >= 1
    assert not (pids / "batch2.done").exists()  # the client sleeps 3 s after batch 1: the signal came before batch 2


def test_sigterm_while_the_reports_are_written(tmp_path, tiny_bert):
    """Every rank signalled after the last batch, while the client writes /privacy and /stats: the reports are
    written whole (status 143), covering every prompt; a --resume with nothing left to do keeps them whole."""
    out = tmp_path / "term.h5"
    proc, pids = _start(tmp_path, tiny_bert, out, {"RSHARD_TEST_SLOW_REPORTS_S": "3"})
    wait_for_file(pids / "reports", proc)
    stderr, _ = _signal_and_wait(proc, sorted(pids.glob("rank*.pid")))
    assert proc.returncode == EXIT_STATUS, stderr
    _reports_cover_every_prompt(out)
    prompts = tmp_path / "prompts.jsonl"
    again = rshard(7, BASE + ["--model", tiny_bert, "--prompts", prompts, "--out", out, "--resume"])
    assert again.returncode == 0 and f"{N_PROMPTS} prompts already" in again.stderr, again.stderr
    _reports_cover_every_prompt(out)


def _reports_cover_every_prompt(out):
    import json

    with h5py.File(out, "r") as f:
        report = json.loads(f["privacy/json"][()])
        assert report["prompts"] == N_PROMPTS and report["ledger_check"]["consistent"], report["ledger_check"]
        assert len(f["stats/rank"]) == 7
