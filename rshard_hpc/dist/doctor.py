"""`rshard doctor`: what every rank of this launch would run with, and whether the job can run.

Run it exactly as the job will run (`mpiexec -n W rshard doctor --alpha A --beta B`, or inside `srun`): each
rank reports its host, its role for the layout, its GPU, the MPI library and whether that library is
CUDA-aware, whether NCCL loads, and the versions of the packages that matter. Rank 0 prints a table, the
transport `--transport` would take for the GPU workers with its evidence, and one verdict line.

Exit status (the same on every rank): 0 the layout fits and nothing is wrong; 2 a problem (wrong world
size, a worker rank without a GPU under --device gpu); 3 the processes are not one MPI job (for example
`srun` without a working `--mpi` plugin starts W separate world-size-1 "singletons").
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import socket
from collections import Counter
from dataclasses import dataclass, field

from rshard_hpc import __version__
from rshard_hpc.dist import collectives, cuda_aware, nccl, transport_choice
from rshard_hpc.dist.launcher import announced_sizes
from rshard_hpc.dist.topology import layouts_for, role_of, world_size_for
from rshard_hpc.errors import InputError

PACKAGES = ("numpy", "h5py", "mpi4py", "cupy", "tokenizers", "torch")


EXIT_OK, EXIT_PROBLEM, EXIT_NOT_ONE_JOB = 0, 2, 3


@dataclass
class RankReport:
    rank: int
    world_size: int
    host: str
    role: str
    local_rank: int  # index among the ranks of its node (a shared-memory split of COMM_WORLD)
    local_env: str  # "VAR=value": the launcher variable the GPU choice reads (backend.LOCAL_RANK_VARS), or ""
    gpu: str  # device name, or "none (why)"
    has_gpu: bool
    mpi_library: str
    cuda_aware: str  # "yes (evidence)" / "no (why)"
    nccl: str  # "2.28.9", or "no (why)"
    launched: dict  # launcher variable -> announced process count
    cpus: int
    packages: dict = field(default_factory=dict)


def package_versions() -> dict:
    """Installed versions (read from package metadata: nothing is imported, torch stays unloaded)."""
    found = {}
    names = {d.metadata["Name"].lower(): d.version for d in importlib.metadata.distributions() if d.metadata["Name"]}
    for package in PACKAGES:
        if package == "cupy":
            cupys = sorted(f"{version} ({name})" for name, version in names.items() if name.startswith("cupy"))
            found[package] = ", ".join(cupys) if cupys else "-"
        else:
            found[package] = names.get(package, "-")
    found["rshard_hpc"] = __version__
    return found


def gpu_of(local_rank: int) -> tuple[bool, str]:
    """(has a GPU, description) for the GPU this rank would use: local rank mod the node's device count."""
    if importlib.util.find_spec("cupy") is None:
        return False, "none (CuPy not installed)"
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
        if count < 1:
            return False, "none (CUDA sees no GPU)"
        device = local_rank % count
        name = cupy.cuda.runtime.getDeviceProperties(device)["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        return True, f"{device}: {name}" + (f" (of {count})" if count > 1 else "") + f", {cuda_versions(cupy)}"
    except Exception as exc:  # noqa: BLE001 - a broken driver is something to report, not to crash on
        return False, f"none ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"


def cuda_versions(cupy) -> str:
    """"CUDA runtime 13.0 (CuPy's), driver 13.0": CuPy's CUDA major must not exceed the driver's (install the
    cupy-cudaNNx wheel of the driver's major or lower)."""
    def dotted(v: int) -> str:
        return f"{v // 1000}.{v % 1000 // 10}"

    runtime, driver = cupy.cuda.runtime.runtimeGetVersion(), cupy.cuda.runtime.driverGetVersion()
    return f"CUDA runtime {dotted(runtime)} (CuPy's), driver {dotted(driver)}"


def short_library(text: str) -> str:
    """"MPICH 5.0.2 (ch4:ucx ofi)" from MPICH's multi-line text; the first line for other libraries."""
    lines = [re.sub(r"\s+", " ", line).strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "unknown"
    first = lines[0]
    match = re.match(r"(\S+) Version: (\S+)", first)
    if match:
        device = next((l.split(":", 1)[1].strip() for l in lines if l.startswith(f"{match.group(1)} Device:")), "")
        return f"{match.group(1)} {match.group(2)}" + (f" ({device})" if device else "")
    return first.split(", repo rev")[0][:100]  # Open MPI: "Open MPI v4.1.6, package: ..., ident: 4.1.6"


def collect(world, alpha, beta) -> RankReport:
    """This rank's report. Collective (a shared-memory split finds the node-local rank)."""
    from rshard_hpc.dist.launcher import local_rank_from_env

    rank, size = world.Get_rank(), world.Get_size()
    split_local = collectives.node_local_rank(world)
    env_local, env_name = local_rank_from_env()
    has_gpu, gpu = gpu_of(split_local if env_local is None else env_local)  # as backend.select_device chooses
    aware, why = cuda_aware.detect_cuda_aware()
    launched = announced_sizes()
    return RankReport(rank, size, socket.gethostname(), role_of(rank, alpha, beta, size), split_local,
                      f"{env_name}={env_local}" if env_name else "", gpu, has_gpu,
                      short_library(cuda_aware.mpi_library_version()), f"{'yes' if aware else 'no'} ({why})",
                      nccl_of() if has_gpu else "no (no GPU)", launched, os.cpu_count() or 1, package_versions())


def nccl_of() -> str:
    """NCCL's version where CuPy loads it, else "no (why)"."""
    module, why = nccl.load_nccl()
    return nccl.nccl_version(module) if module is not None else f"no ({why})"


def transport_line(reports: list[RankReport], mode: str) -> tuple[str, str]:
    """(what --transport `mode` takes for the GPU workers (rank 0, the client, has none), why) from the
    reports: NCCL on every worker, one GPU each or shared, their hosts, CUDA-aware MPI on every worker."""
    workers = [r for r in reports if r.rank != 0] or reports
    no_nccl = next((f"rank {r.rank}: {r.nccl[4:-1]}" for r in workers if r.nccl.startswith("no (")), "")
    users = nccl.ranks_by_gpu([(r.host, r.gpu) for r in workers])
    shared = ", ".join(f"{len(ranks)} ranks on {host} GPU {gpu.split(':')[0]}"
                       for (host, gpu), ranks in sorted(users.items()) if len(ranks) > 1)
    not_aware = next((r for r in workers if not r.cuda_aware.startswith("yes")), None)
    evidence = (not_aware or workers[0]).cuda_aware.split(" (", 1)[-1].rstrip(")")
    return transport_choice.predict(mode, nccl=no_nccl, shared=shared, hosts=len({r.host for r in workers}),
                                    aware=not_aware is None, evidence=evidence)


def check_layout_options(alpha, beta) -> None:
    """--alpha and --beta name the layout to check together: one without the other is an InputError (before MPI)."""
    if (alpha is None) != (beta is None):
        given, value, missing = ("--alpha", alpha, "--beta") if beta is None else ("--beta", beta, "--alpha")
        raise InputError(f"{given} {value} needs {missing}: give both (the layout to check) or neither (to list "
                         f"the layouts that fit)")


def verdict(reports: list[RankReport], alpha, beta, device: str, transport: str = "auto") -> tuple[int, list[str], str]:
    """(exit status, warnings, verdict line) from every rank's report."""
    size = len(reports)
    hosts = Counter(r.host for r in reports)
    where = f"{size} rank{'s' if size != 1 else ''} on {len(hosts)} host{'s' if len(hosts) != 1 else ''}"
    warnings = []
    announced = max((n for r in reports for n in r.launched.values()), default=size)
    if size == 1 and announced > 1:
        return EXIT_NOT_ONE_JOB, warnings, (
            f"PROBLEM: this process is alone in its MPI world, but the launcher started {announced} processes: they "
            f"are separate singletons, not one job. Under Slurm use srun --mpi=pmi2 (MPICH) or --mpi=pmix (a PMIx "
            f"MPI), or mpiexec inside the allocation (see `srun --mpi=list`)")
    problems = []
    if alpha is not None and beta is not None:
        want = world_size_for(alpha, beta)
        if alpha < 1 or beta < 1:
            problems.append(f"alpha and beta must be >= 1 (got alpha={alpha}, beta={beta})")
        elif size != want:
            fits = ", ".join(f"alpha={a} beta={b}" for a, b in layouts_for(size)) or "none"
            problems.append(f"world size is {size}, but alpha={alpha} beta={beta} needs 1 + {alpha} + {beta * beta} = "
                            f"{want} ranks (launch {want} ranks; layouts that fit {size}: {fits})")
    elif not layouts_for(size):
        problems.append("no layout fits: 1 + alpha + beta^2 needs at least 3 ranks")
    if device == "gpu":
        missing = [r.rank for r in reports if not r.has_gpu and r.rank != 0]  # rank 0, the client, needs none
        if missing:
            problems.append(f"--device gpu, but rank(s) {_ranks(missing)} have no GPU")
        elif transport_line(reports, transport)[0] == "refused":
            problems.append(transport_line(reports, transport)[1])
    for package in sorted({p for r in reports for p in r.packages}):
        versions = {r.packages.get(package, "-") for r in reports}
        if len(versions) > 1:
            warnings.append(f"{package} differs between ranks: {', '.join(sorted(versions))}")
    libraries = {r.mpi_library for r in reports}
    if len(libraries) > 1:
        warnings.append(f"ranks load different MPI libraries: {'; '.join(sorted(libraries))}")
    for host, n in sorted(hosts.items()):
        cpus = next(r.cpus for r in reports if r.host == host)
        if n > cpus:
            warnings.append(f"{host}: {n} ranks on {cpus} CPUs (oversubscribed: fine for tests, slow for work)")
    wrong = [r for r in reports if r.local_env and r.local_env.split("=")[1] != str(r.local_rank)]
    if wrong:
        warnings.append(f"rank(s) {_ranks([r.rank for r in wrong])}: the launcher says {wrong[0].local_env} but the rank "
                        f"is number {wrong[0].local_rank} on its node (a launcher started inside another's step, e.g. "
                        f"mpiexec inside srun?): GPUs are chosen from {wrong[0].local_env.split('=')[0]}, so ranks may "
                        f"share one")
    gpu_users = nccl.ranks_by_gpu([(r.host, r.gpu) if r.has_gpu and r.rank != 0 else None for r in reports])
    shared = [f"{host} GPU {gpu.split(':')[0]} ({len(ranks)} ranks)" for (host, gpu), ranks in sorted(gpu_users.items())
              if len(ranks) > 1]
    if device == "gpu" and shared:
        warnings.append(f"ranks share GPUs: {', '.join(shared)}")
    if problems:
        return EXIT_PROBLEM, warnings, f"PROBLEM: {where}: " + "; ".join(problems)
    if alpha is not None and beta is not None:
        layout = f"layout alpha={alpha} beta={beta} fits"
    else:
        layout = "layouts that fit: " + ", ".join(f"alpha={a} beta={b}" for a, b in layouts_for(size))
    note = f" ({len(warnings)} warning{'s' if len(warnings) != 1 else ''} above)" if warnings else ""
    return EXIT_OK, warnings, f"OK: {where}, {layout}{note}"


def _ranks(ranks: list) -> str:
    return ", ".join(str(r) for r in ranks[:16]) + (f" and {len(ranks) - 16} more" if len(ranks) > 16 else "")


def render(reports: list[RankReport], device: str = "cpu", transport: str = "auto") -> list[str]:
    """The table rank 0 prints: one line per rank, then the MPI library, NCCL, the GPU workers' transport
    (under --device gpu) and package versions."""
    head = ("rank", "role", "host", "local", "gpu", "cuda-aware mpi")
    rows = [(str(r.rank), r.role, r.host, str(r.local_rank), r.gpu, r.cuda_aware.split(" (")[0]) for r in reports]
    widths = [max(len(row[i]) for row in rows + [head]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head).rstrip()] + [fmt.format(*row).rstrip() for row in rows]
    for library in sorted({r.mpi_library for r in reports}):
        lines.append(f"MPI library: {library}")
    for why in sorted({r.cuda_aware for r in reports}):
        lines.append(f"CUDA-aware MPI: {why}")
    for found in sorted({r.nccl for r in reports if r.rank != 0 and r.has_gpu}):
        lines.append(f"NCCL: {found}")
    if device == "gpu":
        name, why = transport_line(reports, transport)
        lines.append(f"transport (--transport {transport}): {name}: {why}")
    versions = Counter(tuple(sorted(r.packages.items())) for r in reports)
    for packages, n in versions.most_common():
        who = "all ranks" if n == len(reports) else f"{n} ranks"
        lines.append(f"packages ({who}): " + ", ".join(f"{k} {v}" for k, v in packages))
    return lines


def run_doctor(alpha: int | None, beta: int | None, device: str = "cpu", echo=print, transport: str = "auto") -> int:
    """Every rank calls this; rank 0 prints. Returns the exit status, the same on every rank."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    report = collect(world, alpha, beta)
    reports = collectives.gather_objects(world, report)
    status = None
    if world.Get_rank() == 0:
        status, warnings, line = verdict(reports, alpha, beta, device, transport)
        for text in render(reports, device, transport):
            echo(text)
        for text in warnings:
            echo(f"warning: {text}")
        echo(line)
    return collectives.bcast(world, status)
