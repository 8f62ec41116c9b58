"""A normal (non-editable) install ships the CUDA sources: build the wheel, install it into a fresh virtual
environment outside the source tree, and find every kernel source there through the package."""
import ast
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow
KERNEL_FILES = {"partial_attention.cu", "merge.cu", "attention_order.cu", "passes.cu", "common.cuh"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools")
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=300, cwd=out)
    assert built.returncode == 0, built.stderr
    (path,) = out.glob("rshard_hpc-*.whl")
    return path


def test_the_wheel_holds_the_kernel_sources(wheel):
    names = {n.rsplit("/", 1)[-1] for n in zipfile.ZipFile(wheel).namelist() if n.startswith("rshard_hpc/kernels/")}
    assert KERNEL_FILES <= names


def test_an_installed_wheel_finds_its_kernels_outside_the_source_tree(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    probe = ("import rshard_hpc, importlib.resources as r\n"
             "from rshard_hpc.ops import cuda_build as a\n"
             "print(rshard_hpc.__file__)\n"
             "print(a.kernel_dir())\n"
             "print(sorted(p.name for p in r.files('rshard_hpc.kernels').iterdir()))\n"
             "print(len(a.kernel_source('partial_attention.cu')))\n")
    found = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    package, folder, files, length = found.stdout.splitlines()
    assert package.startswith(str(venv)) and folder.startswith(str(venv)), found.stdout
    assert KERNEL_FILES <= set(ast.literal_eval(files)) and int(length) > 10000
