"""A small embedding job under --device gpu computes on the CPUs (RunOptions.device_for): no rank touches CuPy, the
results file says so, and the embeddings are the --device cpu job's, bit for bit. Runs without a GPU (CI)."""
import importlib.util

import h5py
import pytest
from conftest import rshard

from rshard_hpc.run.options import SMALL_JOB_ON_CPU_ENV


def _job(tmp_path, model, device, env=None):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"w{i} " * (3 + 5 * i) + "\n" for i in range(5)))
    out = tmp_path / f"{device}{'-env' if env else ''}.h5"
    result = rshard(7, ["run", "--model", model, "--prompts", prompts, "--out", out, "--alpha", 2, "--beta", 2,
                        "--device", device, "--allow-weak-plan"], env=env)
    return result, out


def test_small_job_under_device_gpu_runs_on_the_cpus(tmp_path, tiny_bert):
    cpu, cpu_out = _job(tmp_path, tiny_bert, "cpu")
    gpu, gpu_out = _job(tmp_path, tiny_bert, "gpu")
    assert cpu.returncode == 0 and gpu.returncode == 0, cpu.stderr + gpu.stderr
    assert "device cpu (a small job under --device gpu" in gpu.stderr and SMALL_JOB_ON_CPU_ENV in gpu.stderr
    assert "small job" not in cpu.stderr
    with h5py.File(cpu_out) as c, h5py.File(gpu_out) as g:
        assert g.attrs["backend"] == "cpu" == c.attrs["backend"]
        assert g["embeddings"][()].tobytes() == c["embeddings"][()].tobytes()


def test_the_variable_keeps_a_small_job_on_the_gpus(tmp_path, tiny_bert):
    """RSHARD_SMALL_JOB_ON_CPU=0: --device gpu as asked; without CuPy that is a clear error on every rank."""
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is here: tests/run/test_gpu_jobs.py runs --device gpu jobs with the variable set")
    result, out = _job(tmp_path, tiny_bert, "gpu", env={SMALL_JOB_ON_CPU_ENV: "0"})
    assert result.returncode != 0 and "small job" not in result.stderr
    assert "cupy" in (result.stdout + result.stderr).lower(), result.stderr[-2000:]
