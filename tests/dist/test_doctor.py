"""`rshard doctor` under mpiexec: a row per rank, the MPI library, versions, and one verdict line."""
import subprocess
import sys

from conftest import mpi_env, rshard

from rshard_hpc.dist.doctor import short_library
from rshard_hpc.dist.topology import layouts_for, role_of


def test_roles_layouts_and_library_names():
    assert [role_of(r, 2, 2, 7) for r in range(7)] == ["client", "CompNode 0", "CompNode 1", "AttnNode (0, 0)",
                                                       "AttnNode (0, 1)", "AttnNode (1, 0)", "AttnNode (1, 1)"]
    assert role_of(3, 2, 2, 5) == "rank 3" and role_of(3, None, None, 7) == "rank 3"
    assert layouts_for(13) == [(11, 1), (8, 2), (3, 3)] and layouts_for(2) == []
    mpich = "MPICH Version:      5.0.2\nMPICH Release date: Fri\nMPICH Device:       ch4:ofi\n"
    assert short_library(mpich) == "MPICH 5.0.2 (ch4:ofi)"
    assert short_library("Open MPI v4.1.6, package: Debian OpenMPI, ident: 4.1.6").startswith("Open MPI v4.1.6")


def test_doctor_ok(tmp_path):
    result = rshard(7, ["doctor", "--alpha", 2, "--beta", 2])
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("OK: 7 ranks on 1 host, layout alpha=2 beta=2 fits"), result.stdout
    assert lines[0].split() == ["rank", "role", "host", "local", "gpu", "cuda-aware", "mpi"]
    assert lines[1].split()[:2] == ["0", "client"] and "AttnNode (1, 1)" in lines[7]
    assert any(l.startswith(("MPI library: MPICH", "MPI library: Open MPI")) for l in lines), result.stdout  # CI, GPU
    assert any(l.startswith("CUDA-aware MPI: ") for l in lines), result.stdout
    packages = next(l for l in lines if l.startswith("packages (all ranks): "))
    for name in ("numpy", "h5py", "mpi4py", "cupy", "tokenizers", "torch"):
        assert f"{name} " in packages, packages


def test_doctor_reads_the_layout_from_a_job_file(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('prompts = "p.jsonl"\nout = "o.h5"\nalpha = 1\nbeta = 1\n')
    result = rshard(3, ["doctor", "--config", job])
    assert result.returncode == 0 and "layout alpha=1 beta=1 fits" in result.stdout, result.stdout + result.stderr


def test_doctor_wrong_world_size(tmp_path):
    result = rshard(5, ["doctor", "--alpha", 2, "--beta", 2])
    assert result.returncode == 2, result.stdout + result.stderr
    verdict = result.stdout.splitlines()[-1]
    assert verdict.startswith("PROBLEM: 5 ranks on 1 host: world size is 5, but alpha=2 beta=2 needs 1 + 2 + 4 = 7")
    assert "alpha=3 beta=1" in verdict  # the layout that fits 5 ranks


def test_doctor_gpu_required_but_missing():
    from rshard_hpc.dist.doctor import gpu_of

    if gpu_of(0)[0]:
        import pytest

        pytest.skip("this machine has a GPU")
    result = rshard(3, ["doctor", "--alpha", 1, "--beta", 1, "--device", "gpu"])
    assert result.returncode == 2 and "--device gpu, but rank(s) 1, 2 have no GPU" in result.stdout, result.stdout


def test_doctor_detects_singletons():
    """What `srun` without a PMI plugin does: every process is rank 0 of its own world."""
    env = mpi_env({"SLURM_STEP_NUM_TASKS": "7"})
    for name in ("PMI_RANK", "PMI_SIZE", "PMI_FD", "PMI_PORT", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "rshard_hpc", "doctor", "--alpha", "2", "--beta", "2"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "launcher started 7 processes: they are separate singletons" in result.stdout
    assert "--mpi=pmi2" in result.stdout


def test_doctor_names_cupys_cuda_and_the_driver():
    from types import SimpleNamespace

    from rshard_hpc.dist.doctor import cuda_versions

    runtime = SimpleNamespace(runtimeGetVersion=lambda: 12080, driverGetVersion=lambda: 13000)
    assert cuda_versions(SimpleNamespace(cuda=SimpleNamespace(runtime=runtime))) == \
        "CUDA runtime 12.8 (CuPy's), driver 13.0"


def _gpu_reports(gpus, hosts=None, nccl="2.28.9", aware="no (MPIX_Query_cuda_support() = 0 in libmpi.so.40)"):
    """Doctor reports of a client and len(gpus) GPU workers: gpus[i] the device index worker i uses."""
    from rshard_hpc.dist.doctor import RankReport

    hosts = hosts or ["h"] * len(gpus)
    client = RankReport(0, len(gpus) + 1, hosts[0], "client", 0, "", "none (CuPy not installed)", False, "Open MPI",
                        aware, "no (no GPU)", {}, 16)
    return [client] + [RankReport(i + 1, len(gpus) + 1, host, "w", i, "", f"{gpu}: NVIDIA H200, CUDA 13.0", True,
                                  "Open MPI", aware, nccl, {}, 16) for i, (gpu, host) in enumerate(zip(gpus, hosts))]


def test_doctor_names_the_transport_and_refuses_nccl_on_a_shared_gpu():
    """The transport line follows auto's rule from the reports' evidence; --transport nccl where workers share
    a GPU is a PROBLEM naming them; the NCCL and CUDA-aware evidence is printed."""
    from rshard_hpc.dist.doctor import render, transport_line, verdict

    shared = _gpu_reports([0, 0, 0])  # one GPU, three workers
    assert transport_line(shared, "auto")[0] == "ipc"
    assert "not NCCL: workers share a GPU (3 ranks on h GPU 0)" in transport_line(shared, "auto")[1]
    status, _, line = verdict(shared, 2, 1, "gpu", "nccl")
    assert status == 2 and line == ("PROBLEM: 4 ranks on 1 host: --transport nccl cannot be used: workers share "
                                    "a GPU (3 ranks on h GPU 0); NCCL needs one rank per GPU"), line
    assert "ranks share GPUs: h GPU 0 (3 ranks)" in verdict(shared, 2, 1, "gpu", "auto")[1]  # the client's is none
    assert not any("share" in w for w in verdict(_gpu_reports([0, 1, 2]), 2, 1, "gpu", "auto")[1])
    lines = render(shared, "gpu", "auto")
    assert "NCCL: 2.28.9" in lines and any(l.startswith("transport (--transport auto): ipc: ") for l in lines)
    own = _gpu_reports([0, 1, 2])
    assert transport_line(own, "auto")[0] == "nccl"
    assert transport_line(own, "auto")[1].startswith("NCCL on every worker, one GPU each (")
    assert verdict(own, 2, 1, "gpu", "nccl")[0] == 0
    no_nccl = _gpu_reports([0, 1, 2], nccl="no (CuPy was built without NCCL)")
    refused = "--transport nccl cannot be used: rank 1: CuPy was built without NCCL"
    assert transport_line(no_nccl, "nccl") == ("refused", refused)
    apart = _gpu_reports([0, 0, 0], hosts=["a", "b", "b"])
    assert transport_line(apart, "auto")[0] == "staged" and "several nodes" in transport_line(apart, "auto")[1]
    aware = _gpu_reports([0, 0, 0], hosts=["a", "b", "b"], aware="yes (MPIX_Query_cuda_support() = 1 in x)")
    why = ("not NCCL: workers share a GPU (2 ranks on b GPU 0); NCCL needs one rank per GPU; not CUDA IPC: several "
           "nodes; CUDA-aware MPI (MPIX_Query_cuda_support() = 1 in x)")
    assert transport_line(aware, "auto") == ("mpi", why)
    assert transport_line(apart, "ipc")[0] == "refused"
    # an explicit mpi: refused where the library says it is not CUDA-aware, trusted where nothing is known
    assert transport_line(apart, "mpi") == ("refused", "--transport mpi: this MPI library is not CUDA-aware "
                                                       "(MPIX_Query_cuda_support() = 0 in libmpi.so.40)")
    unknown = _gpu_reports([0, 0, 0], hosts=["a", "b", "b"], aware="no (no evidence of CUDA support in MPICH 4.2)")
    assert transport_line(unknown, "mpi")[0] == "mpi"
