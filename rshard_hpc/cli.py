"""The `rshard` command. Each command is thin: it parses options and calls into the package."""
from __future__ import annotations

import os
import sys
import traceback

import click

from rshard_hpc import __version__
from rshard_hpc.errors import RshardError
from rshard_hpc.jobfile import config_callback


def _world_rank() -> int:
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _tune_mpi_env() -> None:
    """Before MPI starts: when more ranks than cores share this node, let MPICH yield instead of spinning
    (busy-polling ranks otherwise starve each other). Set MPIR_CVAR_ENABLE_HEAVY_YIELD yourself to override."""
    local = os.environ.get("MPI_LOCALNRANKS") or os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") or ""
    if local.isdigit() and int(local) > (os.cpu_count() or 1):
        os.environ.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")


def _fail(exc: BaseException) -> None:
    """End the job on an error: collective user errors exit cleanly, anything else aborts every rank."""
    rank = _world_rank()
    if isinstance(exc, RshardError):
        if rank == 0:
            click.echo(f"rshard: error: {exc}", err=True)
        _exit_hook(exc.exit_code)
        sys.exit(exc.exit_code)
    role = _describe_rank()
    click.echo(f"rshard: {role} failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}", err=True)
    _exit_hook(1)
    from rshard_hpc import comm

    comm.abort(1)


def _describe_rank() -> str:
    try:
        from rshard_hpc.topology import current

        return current().describe()
    except Exception:
        return f"rank {_world_rank()}"


def _exit_hook(code: int) -> None:
    """Tests set RSHARD_EXIT_DIR to see every rank's exit status."""
    folder = os.environ.get("RSHARD_EXIT_DIR")
    if folder:
        with open(os.path.join(folder, f"rank{_world_rank()}.exit"), "w") as f:
            f.write(str(code))


@click.group()
@click.version_option(__version__, prog_name="rshard")
def main():
    """rshard: token-sharded private LLM inference (see README.md)."""


@main.command()
@click.argument("source", type=click.Path())
@click.argument("out", type=click.Path())
def convert(source, out):
    """Convert a Hugging Face folder (safetensors) or a GGUF file to the HDF5 weight file OUT."""
    from rshard_hpc.convert import convert_any

    try:
        path = convert_any(source, out)
    except RshardError as exc:
        raise click.ClickException(str(exc))
    click.echo(f"wrote {path}")


@main.command()
@click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
              callback=config_callback(strict=True),
              help="Job file (TOML, or JSON if .json) of these options; command-line options override it.")
@click.option("--task", type=click.Choice(["embed", "generate"]), default="embed", show_default=True)
@click.option("--model", default="all-MiniLM-L6-v2", show_default=True,
              help="A weight file (.h5) or a bundled model name (all-MiniLM-L6-v2, SmolLM2-135M-Instruct).")
@click.option("--prompts", required=True, help="JSONL ({\"text\", \"id\"} a line) or plain text (a prompt a line).")
@click.option("--out", required=True, help="Results HDF5 file (appended after every batch).")
@click.option("--alpha", type=int, default=1, show_default=True, help="Number of CompNodes.")
@click.option("--beta", type=int, default=1, show_default=True, help="AttnNode grid side (beta^2 AttnNodes).")
@click.option("--scheme", type=click.Choice(["strided", "random", "explicit"]), default="strided", show_default=True)
@click.option("--c", "c", type=int, default=1, show_default=True, help="CompNode chunk length.")
@click.option("--c-a", "c_a", type=int, default=1, show_default=True, help="Index-group chunk length.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random plan scheme.")
@click.option("--plan-file", default=None, help="JSON {\"comp\": [...], \"group\": [...]} for --scheme explicit.")
@click.option("--batch-tokens", type=int, default=8192, show_default=True, help="Tokens per batch (at least one prompt).")
@click.option("--resume", is_flag=True, help="Skip prompt ids already in --out and append the rest.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--truncate", is_flag=True, help="Cut over-long prompts to the model's limit instead of failing.")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--gpu-aware-mpi", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="generate: tokens to add at most.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="generate: 0 is greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="generate: sample among the k likeliest (0: all).")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="generate: nucleus sampling mass.")
@click.option("--sample-seed", type=int, default=0, show_default=True,
              help="generate: sampling seed (each prompt draws from its own stream: runs are reproducible).")
@click.option("--stop", multiple=True, help="generate: stop string (repeatable); cut from the text.")
@click.option("--chat", is_flag=True, help="generate: wrap each prompt in the model's chat template.")
@click.option("--quiet", is_flag=True, help="No progress lines (the summary is still printed).")
def run(quiet, max_new_tokens, temperature, top_k, top_p, sample_seed, stop, chat, **kwargs):
    """Run a batch job; launch with mpiexec -n (1 + alpha + beta^2)."""
    _tune_mpi_env()
    from rshard_hpc.jobs import RunOptions, run as run_job

    try:
        generate = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=sample_seed, stop=stop, chat=chat)
        run_job(RunOptions(progress=not quiet, generate=generate, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - every failure must end every rank
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        _fail(exc)
    _exit_hook(0)


@main.command()
@click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
              callback=config_callback(strict=False), help="A `rshard run` job file: its alpha, beta and device.")
@click.option("--alpha", type=int, default=None, help="Number of CompNodes (shows each rank's role).")
@click.option("--beta", type=int, default=None, help="AttnNode grid side.")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="gpu: every CompNode and AttnNode must see a GPU.")
def doctor(alpha, beta, device):
    """Check a launch: per rank host, role, GPU, MPI library, CUDA-awareness, versions; then a verdict.

    Launch it like the job (mpiexec -n W rshard doctor --alpha A --beta B, or under srun). Exit status 0 when
    the job can run, 1 on a problem, 3 when the processes are not one MPI job."""
    _tune_mpi_env()
    from rshard_hpc.doctor import run_doctor

    try:
        status = run_doctor(alpha, beta, device, echo=click.echo)
    except BaseException as exc:  # noqa: BLE001 - a failing rank must not leave the others waiting
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        _fail(exc)
    sys.exit(status)


if __name__ == "__main__":
    main()


@main.group()
def bench():
    """Benchmarks that print a table and write it to a file (speed goals live here, not in tests)."""


@bench.command("kernel")
@click.option("--out", default="bench_kernel.md", show_default=True, help="Write the table here.")
@click.option("--lengths", default="1024,2048,4096,8192,16384,32768", show_default=True)
@click.option("--head-dims", default="64,128", show_default=True)
@click.option("--dtypes", default="bf16,fp32", show_default=True)
def bench_kernel_cmd(out, lengths, head_dims, dtypes):
    """The partial-attention kernel against torch SDPA on this GPU (needs CuPy, torch and a GPU)."""
    from rshard_hpc.bench import bench_kernel

    bench_kernel(out, lengths=[int(x) for x in lengths.split(",")],
                 head_dims=[int(x) for x in head_dims.split(",")], dtypes=dtypes.split(","))


@bench.command("job")
@click.option("--alpha", type=int, default=2, show_default=True)
@click.option("--beta", type=int, default=2, show_default=True)
@click.option("--c", "c", type=int, default=1, show_default=True)
@click.option("--c-a", "c_a", type=int, default=1, show_default=True)
@click.option("--shape", type=click.Choice(["smollm2", "llama-1b", "tiny"]), default="smollm2", show_default=True,
              help="Random-weight Llama shape.")
@click.option("--layers", type=int, default=None, help="Override the shape's layer count.")
@click.option("--tokens", default="4096,8192", show_default=True, help="Prompt lengths (comma-separated).")
@click.option("--decode-steps", type=int, default=8, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--gpu-aware-mpi", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--plaintext/--no-plaintext", default=True, show_default=True,
              help="Also time transformers on one device with the same weights (needs torch + transformers).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", default="bench_job.md", show_default=True, help="Append the table here.")
def bench_job_cmd(alpha, beta, tokens, **opts):
    """The sharded job against plaintext single-device inference; run under mpiexec -n (1 + alpha + beta^2)."""
    _tune_mpi_env()
    from mpi4py import MPI

    from rshard_hpc.bench_job import run_bench
    from rshard_hpc.topology import Topology

    try:
        topo = Topology.build(MPI.COMM_WORLD, alpha, beta)
        run_bench(topo, dict(opts, tokens=[int(x) for x in tokens.split(",")]))
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        _fail(exc)
