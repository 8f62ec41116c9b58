"""The sharded engine on the GPU against the CPU path, under mpirun (tests/mpi/gpu_equivalence.py).

Skipped without CuPy, a GPU or an MPI launcher. The long (16k-token) cases run from tools/gpu_check.sh.
"""
import os
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


@pytest.mark.parametrize("dtype,ipc", [("float32", "auto"), ("bfloat16", "auto"), ("float32", "off")])
@pytest.mark.parametrize("arch,alpha,beta,c,c_a", [("llama", 2, 2, 1, 1), ("bert", 2, 3, 1, 2)])
def test_sharded_gpu_equals_numpy(models, arch, alpha, beta, c, c_a, dtype, ipc):
    """GPU job vs the NumPy float32 forward: <= 1e-4 relative in float32, <= 2e-2 in bfloat16; over CUDA IPC
    where it works (auto) and over MPI with host staging (off)."""
    n = 1 + alpha + beta * beta
    cmd = launcher(n) + [str(ROOT / "tests" / "mpi" / "gpu_equivalence.py"), "--model", str(models / f"{arch}.h5"),
                         "--alpha", str(alpha), "--beta", str(beta), "--c", str(c), "--c-a", str(c_a),
                         "--device", "gpu", "--case", "short", "--dtype", dtype, "--gpu-ipc", ipc]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    print(res.stdout[-4000:], res.stderr[-4000:])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "PASS" in res.stdout


@pytest.mark.parametrize("mpi_mode,ipc_mode", [("auto", "ipc-off"), ("off", "ipc-off"), ("off", "ipc-auto")])
def test_gpu_transport(mpi_mode, ipc_mode):
    """Transport.alltoallv on device buffers (float32 and uint16, growing, shrinking, empty) is exact, staged
    through host memory and over CUDA IPC; every rank agrees."""
    res = subprocess.run(launcher(4) + [str(ROOT / "tests" / "mpi" / "gpu_transport.py"), mpi_mode, ipc_mode],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    print(res.stdout[-2000:], res.stderr[-2000:])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "PASS" in res.stdout
    if ipc_mode == "ipc-off":
        assert "mode staged" in res.stdout or "mode cuda-aware MPI" in res.stdout
