"""The sharded engine on the GPU against the CPU path, under mpirun (tests/mpi/gpu_equivalence.py).

Skipped without CuPy, a GPU or an MPI launcher. The long (16k-token) cases run from tools/gpu_check.sh.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, require_gpu

cupy = require_gpu()

ROOT = REPO


def launcher(n: int) -> list:
    exe = shutil.which("mpirun") or shutil.which("mpiexec")
    if exe is None:
        pytest.skip("no mpirun/mpiexec on PATH")
    cmd = [exe]
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        cmd += ["--oversubscribe", "--mca", "btl_vader_single_copy_mechanism", "none"]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
    return cmd + ["-n", str(n), sys.executable]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_test_models.py"), str(out), "2"], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out


@pytest.mark.parametrize("dtype,transport", [("float32", "auto"), ("bfloat16", "auto"), ("float32", "staged"),
                                             ("float32", "mpi"), ("bfloat16", "mpi")])
@pytest.mark.parametrize("arch,alpha,beta,c,c_a", [("llama", 2, 2, 1, 1), ("bert", 2, 3, 1, 2)])
def test_sharded_gpu_equals_numpy(models, arch, alpha, beta, c, c_a, dtype, transport):
    """GPU job vs the NumPy float32 forward: <= 1e-4 relative in float32, <= 2e-2 in bfloat16; over what auto
    picks (NCCL with a GPU a worker, else CUDA IPC where it works), host staging, and device buffers to MPI
    (mpi: only where the library is CUDA-aware by evidence, else skipped)."""
    if transport == "mpi":
        require_cuda_aware_mpi()
    n = 1 + alpha + beta * beta
    cmd = launcher(n) + [str(ROOT / "tests" / "mpi" / "gpu_equivalence.py"), "--model", str(models / f"{arch}.h5"),
                         "--alpha", str(alpha), "--beta", str(beta), "--c", str(c), "--c-a", str(c_a),
                         "--device", "gpu", "--case", "short", "--dtype", dtype, "--transport", transport]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    print(res.stdout[-4000:], res.stderr[-4000:])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "PASS" in res.stdout


@pytest.mark.parametrize("dtype,transport", [("float32", "auto"), ("bfloat16", "auto"), ("float32", "staged")])
@pytest.mark.parametrize("arch,alpha,beta,c,c_a", [("llama", 2, 2, 1, 1), ("bert", 2, 3, 1, 2)])
def test_gpu_steps_in_lanes_equal_numpy(models, arch, alpha, beta, c, c_a, dtype, transport):
    """As test_sharded_gpu_equals_numpy with each step cut into three micro-batches (RSHARD_MICRO_BATCHES=3, lanes
    of a few tokens: engine/micro.py): a causal model's lanes split sequences, a bidirectional one's whole ones."""
    n = 1 + alpha + beta * beta
    cmd = launcher(n) + [str(ROOT / "tests" / "mpi" / "gpu_equivalence.py"), "--model", str(models / f"{arch}.h5"),
                         "--alpha", str(alpha), "--beta", str(beta), "--c", str(c), "--c-a", str(c_a),
                         "--device", "gpu", "--case", "short", "--dtype", dtype, "--transport", transport]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RSHARD_MICRO_BATCHES": "3"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    print(res.stdout[-4000:], res.stderr[-4000:])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "PASS" in res.stdout


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch,alpha,beta,c,c_a", [("llama", 2, 2, 1, 1), ("bert", 2, 3, 1, 2)])
def test_small_steps_gpu_equal_numpy(models, arch, alpha, beta, c, c_a, dtype):
    """Steps of at most 64 tokens (AttnNodes take the fused small-step kernels, ops/decode_cuda.py): a causal
    model's prefix then a token a sequence a step, a bidirectional model's batch in one step, against the
    NumPy forward of the whole sequences."""
    n = 1 + alpha + beta * beta
    cmd = launcher(n) + [str(ROOT / "tests" / "mpi" / "gpu_equivalence.py"), "--model", str(models / f"{arch}.h5"),
                         "--alpha", str(alpha), "--beta", str(beta), "--c", str(c), "--c-a", str(c_a),
                         "--device", "gpu", "--case", "small", "--dtype", dtype, "--transport", "auto"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    print(res.stdout[-4000:], res.stderr[-4000:])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "PASS" in res.stdout


def require_cuda_aware_mpi():
    """Skip unless this process's MPI library is CUDA-aware by evidence (tools/build_cuda_mpi.sh builds one)."""
    from rshard_hpc.dist.cuda_aware import detect_cuda_aware

    aware, why = detect_cuda_aware()
    if not aware:
        pytest.skip(f"MPI is not CUDA-aware ({why})")


MODE_OF = {"staged": "staged", "mpi": "cuda-aware MPI", "ipc": "cuda-ipc", "nccl": "nccl"}


@pytest.mark.parametrize("transport", ["auto", "staged", "mpi", "ipc", "nccl"])
def test_gpu_transport(transport):
    """Transport.alltoallv on device buffers (float32 and uint16, growing, shrinking, empty, one-way) is exact
    over every transport asked for by name; every rank agrees. NCCL on fewer GPUs than ranks is refused with
    the reason, on every rank."""
    if transport == "mpi":
        require_cuda_aware_mpi()
    ranks = 4
    res = subprocess.run(launcher(ranks) + [str(ROOT / "tests" / "mpi" / "gpu_transport.py"), transport],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    print(res.stdout[-2000:], res.stderr[-2000:])
    if transport == "nccl" and cupy.cuda.runtime.getDeviceCount() < ranks:
        assert res.returncode != 0
        assert "--transport nccl cannot be used: workers share a GPU" in res.stdout + res.stderr
        return
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "PASS" in res.stdout
    if transport != "auto":
        assert f": {MODE_OF[transport]} (" in res.stdout


SIGNALLED = "signalled on the device"  # what the transport's reason says when ipc_signal.probe chose it


@pytest.mark.parametrize("ranks", [4, 7])
def test_gpu_transport_signalled_on_the_device(ranks):
    """The device-signalled CUDA IPC exchange (RSHARD_IPC_SIGNAL=device: taken wherever its probe is exact, MPS
    or not) moves the same buffers exactly, after host-signalled calls on the same outboxes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RSHARD_IPC_SIGNAL": "device", "RSHARD_IPC_WAIT_S": "60"}
    res = subprocess.run(launcher(ranks) + [str(ROOT / "tests" / "mpi" / "gpu_transport.py"), "ipc"],
                         capture_output=True, text=True, timeout=300, env=env)
    print(res.stdout[-2000:], res.stderr[-2000:])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "PASS" in res.stdout and SIGNALLED in res.stdout


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch,alpha,beta,c,c_a", [("llama", 2, 2, 1, 1), ("bert", 2, 3, 1, 2)])
def test_sharded_gpu_signalled_equals_numpy(models, arch, alpha, beta, c, c_a, dtype):
    """As test_sharded_gpu_equals_numpy with the IPC exchange signalled on the device (RSHARD_IPC_SIGNAL=device):
    the steps over 64 tokens run it, the short ones stage."""
    n = 1 + alpha + beta * beta
    cmd = launcher(n) + [str(ROOT / "tests" / "mpi" / "gpu_equivalence.py"), "--model", str(models / f"{arch}.h5"),
                         "--alpha", str(alpha), "--beta", str(beta), "--c", str(c), "--c-a", str(c_a),
                         "--device", "gpu", "--case", "short", "--dtype", dtype, "--transport", "ipc"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RSHARD_IPC_SIGNAL": "device", "RSHARD_IPC_WAIT_S": "60"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    print(res.stdout[-4000:], res.stderr[-4000:])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "PASS" in res.stdout and SIGNALLED in res.stdout
    steps = re.search(r"rank 1: (\d+) steps signalled on the device", res.stdout)
    assert steps and int(steps.group(1)) > 0, "forced, yet no step signalled (an encoder's too: every_step)"
