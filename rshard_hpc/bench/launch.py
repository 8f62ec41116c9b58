"""How the benchmark suite starts processes: the MPI launcher, subprocesses with a timeout, CUDA MPS.

Everything here runs in the suite's own plain process (not under MPI); the jobs it starts are MPI jobs."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TAIL_LINES = 8  # lines of a failed command's output that its row shows
MPS_CONTROL = "nvidia-cuda-mps-control"


@dataclass
class Finished:
    """A finished subprocess: exit status (None: timed out or not started), wall seconds, its output."""
    cmd: list
    returncode: int | None
    wall_s: float
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def tail(self, lines: int = TAIL_LINES) -> str:
        text = (self.stdout + "\n" + self.stderr).strip().splitlines()
        return "\n".join(text[-lines:])

    def why(self) -> str:
        """One paragraph saying how it failed (status or timeout) and the output's last lines."""
        what = "timed out" if self.returncode is None else f"exit status {self.returncode}"
        return f"{shlex.join(self.cmd[:6])} … {what}: {self.tail()}"


def default_launcher() -> str:
    """mpiexec (or mpirun) from PATH; Open MPI's gets --oversubscribe, and --allow-run-as-root as root."""
    for name in ("mpiexec", "mpirun"):
        path = shutil.which(name)
        if path:
            return " ".join([name] + _open_mpi_flags(path))
    return "mpiexec"  # not found: the rows say so when it fails to start


def _open_mpi_flags(path: str) -> list:
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    if "Open MPI" not in version and "OpenRTE" not in version:
        return []
    return ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])


def run_command(cmd: list, timeout_s: float, env: dict | None = None, cwd=None) -> Finished:
    """Run `cmd` to its end or `timeout_s`; on a timeout its whole process group is ended (never a hang)."""
    cmd = [str(c) for c in cmd]
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                                start_new_session=True)
    except OSError as exc:
        return Finished(cmd, 127, time.perf_counter() - t0, "", f"cannot start {cmd[0]}: {exc}")
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _end_group(proc)
        out, err = proc.communicate()
        return Finished(cmd, None, time.perf_counter() - t0, out, err + f"\n(ended after {timeout_s:.0f} s)")
    return Finished(cmd, proc.returncode, time.perf_counter() - t0, out, err)


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group this suite started, SIGKILL 5 s later if it is still there."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def job_env(extra: dict | None = None) -> dict:
    """The environment of every job and anchor subprocess: offline Hugging Face, unbuffered output."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def rshard_command(launcher: str, ranks: int, args: list) -> list:
    """`LAUNCHER -n RANKS python -m rshard_hpc.cli ARGS` with this Python."""
    return shlex.split(launcher) + ["-n", str(ranks), sys.executable, "-m", "rshard_hpc.cli"] + [str(a) for a in args]


def gpu_env(count: int | None) -> dict:
    """CUDA_VISIBLE_DEVICES naming the first `count` GPUs this process may use (None: all of them)."""
    if count is None:
        return {}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = visible.split(",") if visible else [str(i) for i in range(count)]
    return {"CUDA_VISIBLE_DEVICES": ",".join(names[:count])}


@contextmanager
def mps_daemon(on: bool):
    """Yields (environment for the jobs, a note) with a private CUDA MPS control daemon running when `on` and
    nvidia-cuda-mps-control exists, stopped on the way out; (None, why) when it cannot start."""
    if not on:
        yield {}, ""
        return
    control = shutil.which(MPS_CONTROL)
    if control is None:
        yield None, f"{MPS_CONTROL} not found: MPS rows skipped"
        return
    root = Path(tempfile.mkdtemp(prefix="rshard-mps-"))
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(root / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(root / "log")}
    for folder in env.values():
        Path(folder).mkdir()
    started = run_command([control, "-d"], 30, env=job_env(env))
    if not started.ok:
        yield None, f"{MPS_CONTROL} -d failed: {started.tail(3)}"
        return
    try:
        yield env, f"CUDA MPS daemon (pipes in {env['CUDA_MPS_PIPE_DIRECTORY']})"
    finally:
        subprocess.run([control], input="quit\n", text=True, env=job_env(env), timeout=60, capture_output=True,
                       check=False)
        shutil.rmtree(root, ignore_errors=True)
