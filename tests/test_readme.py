"""The README's main job runs as written (from the repository root) and writes what it says."""
import re
import shlex

import h5py
from conftest import REPO, mpiexec


def readme_main_job() -> list:
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S).group(1)
    command = block.strip().split("&&")[-1].strip()  # after the pip installs
    return shlex.split(command)


def test_readme_main_job(tmp_path, minilm):
    argv = readme_main_job()
    assert argv[:2] == ["mpiexec", "-n"]
    world = int(argv[2])
    args = argv[3:]
    out_index = args.index("--out") + 1
    args[out_index] = str(tmp_path / "sample.h5")
    result = mpiexec(world, args, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert f"results: {tmp_path / 'sample.h5'}" in result.stderr
    with h5py.File(tmp_path / "sample.h5") as f:
        assert f["embeddings"].shape == (12, 384)
        assert f.attrs["world_size"] == world
