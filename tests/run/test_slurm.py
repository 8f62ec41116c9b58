"""slurm/run.sh against a real one-node Slurm cluster (Debian's slurm-wlm + munge), started for these tests by
tests/slurm/start_cluster.sh and stopped afterwards. Skips when Slurm is not installed or not root."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import REPO, mpi_env

JOB_FILE = "slurm/job.toml"  # the sample job: all-MiniLM-L6-v2, alpha=3, beta=3 -> 13 tasks
JOB_TIMEOUT = 240  # seconds a job may take before it counts as a hang
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL")


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (slurmctld, slurmd), so a second test session does not collide."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if port < 65535:
            with socket.socket() as s:
                try:
                    s.bind(("", port + 1))
                except OSError:
                    continue
            return port
    return 6817


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Environment (SLURM_CONF, ...) of a running one-node cluster."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [exe for exe in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(exe, path=path) is None]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs its daemons as root (SlurmUser=root)")
    folder = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, RSHARD_SLURM_PORT=str(_free_port_pair()))
    start = subprocess.run([str(REPO / "tests/slurm/start_cluster.sh"), str(folder)], env=env, capture_output=True,
                           text=True, timeout=120)
    if start.returncode != 0:
        subprocess.run([str(REPO / "tests/slurm/stop_cluster.sh"), str(folder)], timeout=60)
        pytest.fail(f"could not start the test cluster:\n{start.stdout}\n{start.stderr}")
    job_env = mpi_env({"SLURM_CONF": str(folder / "slurm.conf"), "RSHARD_PYTHON": sys.executable})
    for name in [k for k in job_env if k.startswith(("SLURM_", "PMI_", "MPI_LOCAL")) and k != "SLURM_CONF"]:
        del job_env[name]  # a job of the cluster this session may itself run in must not leak in
    yield job_env
    subprocess.run([str(REPO / "tests/slurm/stop_cluster.sh"), str(folder)], timeout=60)


def _submit(args, env, extra_env=None) -> str:
    run_env = dict(env, **(extra_env or {}))
    result = subprocess.run(args, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = result.stdout.strip().split(";")[0].split()[-1]
    assert job_id.isdigit(), result.stdout
    return job_id


def _wait(job_id: str, env, log) -> dict:
    """Poll the job until it ends (bounded); its `scontrol show job` fields."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while True:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True).stdout
        fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
        if fields.get("JobState") in TERMINAL:
            return fields
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], env=env)
            pytest.fail(f"hang: job {job_id} did not end within {JOB_TIMEOUT} s\n{_read(log)}")
        time.sleep(0.5)


def _read(path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def test_sbatch_run_sh_with_the_job_file(slurm, minilm, tmp_path):
    """sbatch --ntasks=13 slurm/run.sh slurm/job.toml: the launcher check passes and the results are the model's."""
    out, log = tmp_path / "slurm.h5", tmp_path / "job.log"
    job = _submit(["sbatch", "--parsable", "--ntasks=13", f"--output={log}", "slurm/run.sh", JOB_FILE, "--out", out],
                  slurm)
    fields = _wait(job, slurm, log)
    text = _read(log)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", text
    assert "OK: 13 ranks on 1 host, layout alpha=3 beta=3 fits" in text, text
    assert "launching rshard run on 13 ranks with" in text and "done: 12 prompts" in text, text
    assert "MB moved between ranks" in text and "results: " in text, text  # the summary

    with h5py.File(out, "r") as f:
        assert f.attrs["world_size"] == 13 and f.attrs["alpha"] == 3 and f.attrs["beta"] == 3
        ids, embeddings = [x.decode() for x in f["ids"][()]], f["embeddings"][()]
    expected_ids, expected = _reference_embeddings(minilm, REPO / "inputs/sample.jsonl")
    assert ids == expected_ids
    np.testing.assert_allclose(embeddings, expected, rtol=0, atol=2e-6)  # the single-process forward


def _reference_embeddings(model_path, prompt_file):
    """The single-process reference forward, mean pooling and L2 normalization (what the job computes)."""
    from rshard_hpc.models import load_model, weights
    from rshard_hpc.models.reference import reference_forward
    from rshard_hpc.models.tokenizer import TextCodec
    from rshard_hpc.run.prompts import read_prompts

    prompts = read_prompts(prompt_file)
    codec = TextCodec(model_path, weights.read_config(model_path))
    rows = reference_forward(load_model(model_path), [np.array(codec.encode(p.text)) for p in prompts])
    pooled = np.stack([r.astype(np.float64).mean(0) for r in rows])
    return [p.id for p in prompts], pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def test_run_sh_submits_itself_and_falls_back_to_mpiexec(slurm, minilm, tmp_path):
    """Outside an allocation run.sh computes the task count (here from command-line overrides) and submits
    itself; RSHARD_LAUNCHERS=mpiexec takes MPICH's own launcher inside the allocation."""
    out, log = tmp_path / "self.h5", tmp_path / "job.log"
    job = _submit(["slurm/run.sh", JOB_FILE, "--alpha", "2", "--beta", "1", "--allow-weak-plan", "--out", str(out)],
                  slurm,
                  {"RSHARD_SBATCH_ARGS": f"--parsable --output={log}", "RSHARD_LAUNCHERS": "mpiexec"})
    fields = _wait(job, slurm, log)
    text = _read(log)
    assert fields["JobState"] == "COMPLETED" and fields["NumTasks"] == "4", text
    assert "launching rshard run on 4 ranks with mpiexec" in text, text
    with h5py.File(out, "r") as f:
        assert f.attrs["world_size"] == 4 and f["embeddings"].shape == (12, 384)


def test_wrong_task_count_is_refused(slurm, tmp_path):
    log = tmp_path / "job.log"
    job = _submit(["sbatch", "--parsable", "--ntasks=7", f"--output={log}", "slurm/run.sh", JOB_FILE,
                   "--out", str(tmp_path / "o.h5")], slurm)
    fields = _wait(job, slurm, log)
    text = _read(log)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "2:0", text
    assert "SLURM_NTASKS=7" in text and "1 + alpha + beta^2 = 13" in text and "sbatch --ntasks=13" in text, text
    assert not (tmp_path / "o.h5").exists()


def test_failure_on_one_rank_ends_the_srun_step(slurm, tiny_bert, tmp_path):
    """An exception on one rank under srun: MPI_Abort ends every rank and the job fails, in bounded time."""
    log = tmp_path / "job.log"
    prompts = tmp_path / "p.txt"
    prompts.write_text("t1 t2 t3\nt4 t5\n")
    job = _submit(["sbatch", "--parsable", "--ntasks=4", f"--output={log}", "slurm/run.sh", JOB_FILE,
                   "--model", str(tiny_bert), "--prompts", str(prompts), "--alpha", "2", "--beta", "1",
                   "--allow-weak-plan", "--out", str(tmp_path / "o.h5")], slurm,
                  {"RSHARD_TEST_FAIL_RANK": "2", "RSHARD_LAUNCHERS": "srun-pmi2"})
    started = time.monotonic()
    fields = _wait(job, slurm, log)
    text = _read(log)
    assert fields["JobState"] == "FAILED", text
    assert "rank 2 (CompNode 1) failed: RuntimeError" in text, text
    assert time.monotonic() - started < 120


def _start_hooked_job(slurm, tiny_bert, tmp_path, hooks: dict, marker: str):
    """A 4-task job (alpha=2, beta=1, srun --mpi=pmi2) of 8 short prompts in batches of 3 with test hooks, once
    the hook file `marker` appeared; (job id, log, results file, pid folder)."""
    log, out, pids = tmp_path / "job.log", tmp_path / "o.h5", tmp_path / "pids"
    pids.mkdir()
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"t{i} t{i + 1} t{i + 2}\n" for i in range(8)))
    job = _submit(["sbatch", "--parsable", "--ntasks=4", f"--output={log}", "slurm/run.sh", JOB_FILE,
                   "--model", str(tiny_bert), "--prompts", str(prompts), "--alpha", "2", "--beta", "1",
                   "--allow-weak-plan", "--batch-tokens", "10", "--out", str(out)], slurm,
                  dict(hooks, RSHARD_PID_DIR=str(pids), RSHARD_LAUNCHERS="srun-pmi2"))
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (pids / marker).exists():
        assert time.monotonic() < deadline, _read(log)
        time.sleep(0.1)
    return job, log, out, pids


def test_sigkill_of_one_rank_ends_the_srun_step(slurm, tiny_bert, tmp_path):
    """A rank killed by a signal under srun: run.sh's --kill-on-bad-exit=1 ends the step (plain srun waits for
    the other ranks, which wait for the dead one: a hang). The finished batch stays in the results file."""
    job, log, out, pids = _start_hooked_job(slurm, tiny_bert, tmp_path, {"RSHARD_TEST_SLOW_BATCH_S": "5"},
                                            "batch1.done")
    os.kill(int((pids / "rank1.pid").read_text()), 9)
    killed = time.monotonic()
    fields = _wait(job, slurm, log)
    assert fields["JobState"] == "FAILED", _read(log)
    assert time.monotonic() - killed < 60, "the step outlived the killed rank by a minute"
    with h5py.File(out, "r") as f:
        assert len(f["ids"]) >= 1 and f["embeddings"].shape[0] == len(f["ids"])  # batch 1: the file's first, small


def test_scancel_sigterm_keeps_the_batch_being_written(slurm, tiny_bert, tmp_path):
    """What a time limit (or scancel) does first: SIGTERM to every task of the step, here while the client
    writes batch 2 (held open 3 s by a test hook). The write finishes, the client says what the file holds and
    ends the step; batch 2 and its ledger are in the file."""
    job, log, out, _ = _start_hooked_job(slurm, tiny_bert, tmp_path, {"RSHARD_TEST_SLOW_WRITE_S": "3"}, "writing2")
    subprocess.run(["scancel", "--signal=TERM", job], env=slurm, check=True, timeout=30)
    signalled = time.monotonic()
    fields = _wait(job, slurm, log)
    text = _read(log)
    assert fields["JobState"] in ("FAILED", "CANCELLED"), text
    assert "rshard: terminated by SIGTERM: " in text and "--resume to finish" in text, text
    assert time.monotonic() - signalled < 60
    with h5py.File(out, "r") as f:
        assert len(f["ids"]) >= 2 and f["embeddings"].shape[0] == len(f["ids"])
        assert len(f["privacy/ledger"]) == 2


def test_gpu_job_without_gpus_stops_at_the_doctor(slurm, tmp_path):
    """RSHARD_DEVICE=gpu (what a job with GPUs gets): the ranks run with --device gpu, so on a node without
    GPUs `rshard doctor` reports the problem and run.sh stops before the job starts."""
    from rshard_hpc.dist.doctor import gpu_of

    if gpu_of(0)[0]:
        pytest.skip("this machine has a GPU")
    log = tmp_path / "job.log"
    job = _submit(["sbatch", "--parsable", "--ntasks=4", f"--output={log}", "slurm/run.sh", JOB_FILE, "--alpha", "2",
                   "--beta", "1", "--out", str(tmp_path / "o.h5")], slurm,
                  {"RSHARD_DEVICE": "gpu", "RSHARD_LAUNCHERS": "srun-pmi2"})
    fields = _wait(job, slurm, log)
    text = _read(log)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "2:0", text
    assert "--device gpu, but rank(s) 1, 2, 3 have no GPU" in text and "rshard doctor found a problem" in text, text
    assert "launching rshard run" not in text and not (tmp_path / "o.h5").exists()
