"""A rank killed with SIGKILL in the middle of a run: the job ends (bounded time), the results file opens and
holds every batch that finished, and --resume completes it with the results of an uninterrupted run.

"The middle of a run" is made deterministic with the test hooks of rshard_hpc/testhooks.py (under run/): the client writes
`batchN.done` after appending batch N and then sleeps (RSHARD_TEST_SLOW_BATCH_S), and every rank writes its pid.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import mpi_env, process_gone, rshard, wait_for_file, write_prompts

END_WITHIN_S = 60  # the whole job must be gone this long after the kill
N_PROMPTS = 12


@pytest.mark.parametrize("victim", [1, 4], ids=["CompNode", "AttnNode"])
def test_sigkill_one_rank_then_resume(tmp_path, tiny_bert, victim):
    prompts = write_prompts(tmp_path, N_PROMPTS, seed=3)
    base = ["run", "--model", tiny_bert, "--prompts", prompts, "--alpha", 2, "--beta", 2, "--batch-tokens", 40,
            "--quiet", "--allow-weak-plan"]  # alpha=2, beta=2: not private
    pids = tmp_path / "pids"
    pids.mkdir()
    out = tmp_path / "killed.h5"
    launcher = shutil.which("mpiexec") or pytest.skip("mpiexec not found (pip install mpich)")
    cmd = [launcher, "-n", "7", sys.executable, "-m", "rshard_hpc"] + [str(a) for a in base + ["--out", out]]
    env = mpi_env({"RSHARD_PID_DIR": str(pids), "RSHARD_TEST_SLOW_BATCH_S": "3"})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for_file(pids / "batch2.done", proc)  # two batches are in the file; the client now sleeps
        os.kill(int((pids / f"rank{victim}.pid").read_text()), signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = proc.communicate(timeout=END_WITHIN_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"hang: the job did not end within {END_WITHIN_S} s of killing rank {victim}")
    assert proc.returncode != 0, stderr
    assert time.monotonic() - killed_at < END_WITHIN_S
    for pid_file in pids.glob("rank*.pid"):  # every rank is gone, not only the launcher
        pid = int(pid_file.read_text())
        assert process_gone(pid), f"{pid_file.stem} still runs"

    with h5py.File(out, "r") as f:  # still a valid file, holding the finished batches (at least two)
        done = [x.decode() for x in f["ids"][()]]
        assert len(done) == f["embeddings"].shape[0]
    finished = len(list(pids.glob("batch*.done")))
    assert 2 <= finished and len(done) >= 2 and done == [f"p{i}" for i in range(len(done))]
    assert len(done) < N_PROMPTS, "the kill came before the end"

    resumed = rshard(7, base + ["--out", out, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(done)} prompts already" in resumed.stderr
    whole = rshard(7, base + ["--out", tmp_path / "whole.h5"])
    assert whole.returncode == 0, whole.stderr
    with h5py.File(out, "r") as a, h5py.File(tmp_path / "whole.h5", "r") as b:
        assert list(a["ids"][()]) == list(b["ids"][()]) == [f"p{i}".encode() for i in range(N_PROMPTS)]
        # bit for bit: resuming starts at a batch boundary, so the remaining batches are those of the whole run
        np.testing.assert_array_equal(a["embeddings"][()], b["embeddings"][()])


def test_exception_on_one_rank_aborts_the_job(tmp_path, tiny_bert):
    """An unexpected exception on one rank (RSHARD_TEST_FAIL_RANK): one message naming the rank and its role,
    MPI_Abort ends every rank, a non-zero status, no hang (conftest fails a launch that outlives its timeout)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("t1 t2 t3\nt4 t5\n")
    exits = tmp_path / "exits"
    exits.mkdir()
    started = time.monotonic()
    result = rshard(7, ["run", "--model", tiny_bert, "--prompts", prompts, "--alpha", 2, "--beta", 2, "--quiet",
                        "--allow-weak-plan", "--out", tmp_path / "o.h5"],
                    env={"RSHARD_TEST_FAIL_RANK": "5", "RSHARD_EXIT_DIR": str(exits)}, timeout=END_WITHIN_S)
    assert result.returncode != 0
    assert (exits / "rank5.exit").read_text() == "1", "rank 5 did not reach the abort path"
    # the launcher must have forwarded the message before tearing the job down (comm.ABORT_GRACE_S)
    assert result.stderr.count("failed: RuntimeError") == 1, f"stderr: {result.stderr!r} stdout: {result.stdout!r}"
    assert "rshard: rank 5 (AttnNode (1, 0)) failed: RuntimeError: RSHARD_TEST_FAIL_RANK=5" in result.stderr
    # MPICH usually adds its own "application called MPI_Abort" line, but the launcher may tear the job down
    # before that line is flushed: the single message above, the status and the time are what is promised
    assert time.monotonic() - started < END_WITHIN_S
