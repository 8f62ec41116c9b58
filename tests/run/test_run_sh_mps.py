"""slurm/run.sh's RSHARD_MPS=1: the CUDA MPS daemon starts before the ranks and stops after them (a stand-in
nvidia-cuda-mps-control, launcher and Python record the order); without the binary the job runs, said so."""
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

FAKE_PYTHON = f"""#!/usr/bin/env bash
if [[ $1 == -m && $2 == rshard_hpc.run.jobfile ]]; then exec {sys.executable} "$@"; fi
echo "job: $* pipe=${{CUDA_MPS_PIPE_DIRECTORY:-none}}" >> "$RSHARD_TEST_LOG"
"""
FAKE_LAUNCHER = """#!/usr/bin/env bash
shift 2  # -n N
exec "$@"
"""
FAKE_MPS = """#!/usr/bin/env bash
if [[ $1 == -d ]]; then echo "mps start pipe=$CUDA_MPS_PIPE_DIRECTORY" >> "$RSHARD_TEST_LOG"
else echo "mps $(cat)" >> "$RSHARD_TEST_LOG"; fi
"""


def _script(folder, name, text):
    path = folder / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def run_sh(tmp_path, with_mps: bool):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir, "fake-launcher", FAKE_LAUNCHER)
    if with_mps:
        _script(bin_dir, "nvidia-cuda-mps-control", FAKE_MPS)
    log = tmp_path / "log"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="77", SLURM_NTASKS="13",
               RSHARD_DEVICE="gpu", RSHARD_LAUNCHER="fake-launcher", RSHARD_PREFLIGHT="0", RSHARD_MPS="1",
               RSHARD_PYTHON=str(_script(tmp_path, "fake-python", FAKE_PYTHON)), RSHARD_TEST_LOG=str(log),
               CUDA_MPS_PIPE_DIRECTORY=str(tmp_path / "pipe"), CUDA_MPS_LOG_DIRECTORY=str(tmp_path / "mpslog"),
               PYTHONPATH=str(REPO))
    done = subprocess.run(["bash", "slurm/run.sh", "slurm/job.toml"], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return log.read_text().splitlines(), done.stderr


def test_mps_daemon_brackets_the_job(tmp_path):
    lines, stderr = run_sh(tmp_path, with_mps=True)
    pipe = tmp_path / "pipe"
    assert lines[0] == f"mps start pipe={pipe}"
    assert lines[1].startswith("job: -m rshard_hpc run --config slurm/job.toml --device gpu")
    assert lines[1].endswith(f"pipe={pipe}")  # the ranks see the daemon's pipes
    assert lines[2] == "mps quit" and len(lines) == 3
    assert pipe.is_dir() and "CUDA MPS daemon stopped" in stderr


def test_without_the_binary_the_job_runs_without_mps(tmp_path):
    if shutil.which("nvidia-cuda-mps-control"):
        pytest.skip("this machine has nvidia-cuda-mps-control")
    lines, stderr = run_sh(tmp_path, with_mps=False)
    assert len(lines) == 1 and lines[0].startswith("job: -m rshard_hpc run")
    assert "nvidia-cuda-mps-control is not on PATH: running without MPS" in stderr
