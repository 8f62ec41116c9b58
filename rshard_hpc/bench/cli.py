"""`rshard bench …`: the benchmark commands (kernel, job, suite, passes, client, trace), each parsing its options and
calling into rshard_hpc.bench; the group is added to the `rshard` command in rshard_hpc/cli.py."""
from __future__ import annotations

import click

from rshard_hpc.cli_errors import fail
from rshard_hpc.cli_options import device_options, plan_options
from rshard_hpc.dist.launcher import tune_mpi_env
from rshard_hpc.errors import RshardError
from rshard_hpc.models.registry import DEFAULT_DECODER, DEFAULT_MODEL


@click.group()
def bench():
    """Benchmarks that print a table and write it to a file (speed goals live here, not in tests)."""


@bench.command("kernel")
@click.option("--out", default="bench_kernel.md", show_default=True, help="Write the table here.")
@click.option("--lengths", default="1024,2048,4096,8192,16384,32768", show_default=True,
              help="Sequence lengths (comma-separated).")
@click.option("--head-dims", default="64,128", show_default=True, help="Head dimensions D (comma-separated).")
@click.option("--dtypes", default="bf16,fp32", show_default=True, help="Input precisions (comma-separated).")
@click.option("--variants", is_flag=True,
              help="First time the tensor-core kernel's configurations and use the fastest per head dim.")
def bench_kernel_cmd(out, lengths, head_dims, dtypes, variants):
    """The partial-attention kernel against torch SDPA on this GPU (needs CuPy, torch and a GPU)."""
    from rshard_hpc.bench.kernel import bench_kernel, bench_variants

    bench_kernel(out, lengths=[int(x) for x in lengths.split(",")],
                 head_dims=[int(x) for x in head_dims.split(",")], dtypes=dtypes.split(","),
                 mma_configs=bench_variants() if variants else None)


@bench.command("job")
@plan_options("alpha", "beta", "c", "c_a", alpha=2, beta=2, c=1, c_a=1)
@click.option("--shape", type=click.Choice(["smollm2", "llama-1b", "tiny"]), default="smollm2", show_default=True,
              help="Random-weight Llama shape.")
@click.option("--layers", type=int, default=None, help="Override the shape's layer count.")
@click.option("--tokens", default="4096,8192", show_default=True, help="Prompt lengths (comma-separated).")
@click.option("--decode-steps", type=int, default=8, show_default=True, help="Decode steps timed after each prefill.")
@device_options("Engine precision (the plaintext side runs the same precision in torch).")
@click.option("--plaintext/--no-plaintext", default=True, show_default=True,
              help="Also time transformers on one device with the same weights (needs torch + transformers).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights and prompts.")
@click.option("--out", default="bench_job.md", show_default=True, help="Append the table here.")
def bench_job_cmd(alpha, beta, tokens, **opts):
    """The sharded job against plaintext single-device inference; run under mpiexec -n (1 + alpha + beta^2)."""
    tune_mpi_env()
    from mpi4py import MPI

    from rshard_hpc.bench.job import run_bench
    from rshard_hpc.dist.topology import Topology

    try:
        topo = Topology.build(MPI.COMM_WORLD, alpha, beta)
        run_bench(topo, dict(opts, tokens=[int(x) for x in tokens.split(",")]))
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        fail(exc)


@bench.command("suite")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="Where the jobs and the anchors run (the cpu-* rows always run on CPUs).")
@click.option("--rows", default=None, help="Rows to run (comma-separated): embed-file, embed-small, decode, "
                                           "generate-file, prefill-512, prefill-8k, cpu-one, cpu-batch, cpu-lines. "
                                           "Default: the "
                                           "CPU rows and the embedding rows on cpu, all but the CPU rows on gpu.")
@click.option("--layouts", default="3x3c2,2x2", show_default=True,
              help="Layouts ALPHAxBETA[cC_A] (comma-separated); 3x3c2 is the default private layout (13 ranks).")
@click.option("--mps", type=click.Choice(["on", "off", "both"]), default="off", show_default=True,
              help="gpu: run the GPU rows under a private CUDA MPS daemon (nvidia-cuda-mps-control -d), without, "
                   "or both.")
@click.option("--gpus", default="1", show_default=True,
              help="gpu: GPU counts each job sees (comma-separated; 'all': every GPU, one rank per GPU when they "
                   "are as many as the ranks).")
@click.option("--quick", is_flag=True, help="Tiny sizes (a tiny Llama shape, a few short prompts, one repeat): CI.")
@click.option("--embed-prompts", type=int, default=None, help="embed-file: prompts generated (default 4096).")
@click.option("--cpu-batch", type=int, default=None, help="cpu-batch: inputs in the job (default 64).")
@click.option("--line-prompts", type=int, default=None, help="cpu-lines: one-line prompts in the job (default 2000).")
@click.option("--shape", type=click.Choice(["smollm2", "llama-1b", "tiny"]), default=None,
              help="decode, prefill: random-weight Llama shape (default smollm2).")
@click.option("--decode-tokens", type=int, default=None, help="decode: prompt length before the steps (default 8192).")
@click.option("--decode-steps", type=int, default=None, help="decode: steps timed (default 8).")
@click.option("--repeats", type=int, default=None, help="Timed repeats of anchors and CPU-row jobs (default 3).")
@click.option("--batch-tokens", type=int, default=None, help="Embedding jobs' --batch-tokens (default: rshard run's).")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Embedding rows: the model of the sharded jobs (a bundled name or a weight file .h5).")
@click.option("--st-model", default=None, help="Embedding rows: sentence-transformers' folder of the same model "
                                              "(default: the bundled package's).")
@click.option("--launcher", default="", help="MPI launcher command, followed by -n N (default: mpiexec from PATH; "
                                             "Open MPI's with --oversubscribe, and --allow-run-as-root as root).")
@click.option("--timeout-s", type=float, default=600, show_default=True, help="Limit of each job or anchor process.")
@click.option("--time-limit-s", type=float, default=None, help="Rows not started by then are reported as skipped.")
@click.option("--out", default="", help="Append the table here. Default: docs/bench_suite_<device>.md (cpu, h200, …).")
def bench_suite_cmd(device, rows, layouts, gpus, quick, mps, model, st_model, launcher, timeout_s, time_limit_s, out,
                    batch_tokens, **sizes):
    """Every row of the performance table (issue 13) against its plaintext anchor in one run: run it as a plain
    process (not under mpiexec); it launches the sharded jobs itself and writes one markdown table."""
    from rshard_hpc.bench.suite import (DEFAULT_ROWS, FULL, QUICK, ROW_NAMES, Options, parse_layouts, run_suite,
                                        sizes_with)

    chosen = [r.strip() for r in (rows or DEFAULT_ROWS[device]).split(",") if r.strip()]
    unknown = [r for r in chosen if r not in ROW_NAMES]
    if unknown:
        raise click.UsageError(f"unknown rows {', '.join(unknown)} (choose from {', '.join(ROW_NAMES)})")
    try:
        counts = tuple(None if g.strip() == "all" else int(g) for g in gpus.split(","))
        opts = Options(device=device, rows=tuple(chosen), layouts=tuple(parse_layouts(layouts)), mps=mps, gpus=counts,
                       sizes=sizes_with(QUICK if quick else FULL, **sizes), launcher=launcher,
                       model=model, st_model=st_model, batch_tokens=batch_tokens, timeout_s=timeout_s, time_limit_s=time_limit_s, out=out)
    except ValueError as exc:
        raise click.UsageError(str(exc))
    run_suite(opts, echo=lambda line: click.echo(line, err=not line.startswith("rshard bench suite")))


@bench.command("passes")
@device_options("Precision of the pieces (as `rshard run --dtype`).", "device", "dtype")
@click.option("--shape", type=click.Choice(["smollm2", "llama-1b", "tiny"]), default="smollm2", show_default=True,
              help="Random-weight Llama shape.")
@click.option("--tokens", type=int, default=8192, show_default=True, help="Tokens in the layer's input.")
@click.option("--repeat", type=int, default=20, show_default=True, help="Timed calls per piece (median).")
@click.option("--torch/--no-torch", "with_torch", default=True, show_default=True,
              help="Also time transformers' LlamaDecoderLayer at the same shape and precision.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights and input.")
@click.option("--out", default="bench_passes.md", show_default=True, help="Append the table here.")
def bench_passes_cmd(with_torch, **opts):
    """One layer's pieces (norms, GEMMs, RoPE, packing, attention, merge, MLP) timed one by one in one process,
    beside torch's decoder layer: where the per-token time goes (no MPI)."""
    from rshard_hpc.bench.passes import report, run_passes

    if opts["tokens"] < 1 or opts["repeat"] < 1:
        raise click.UsageError("--tokens and --repeat must be >= 1")
    try:
        click.echo(report(run_passes(dict(opts, torch=with_torch)), opts))
    except RshardError as exc:
        raise click.ClickException(str(exc))


@bench.command("client")
@click.option("--model", default=DEFAULT_DECODER, show_default=True, help="A weight file (.h5) or a bundled name.")
@click.option("--k", "ks", default="1,2", show_default=True, help="Client layers K to measure (comma-separated).")
@click.option("--tokens", type=int, default=128, show_default=True, help="Prompt length.")
@click.option("--repeat", type=int, default=3, show_default=True, help="Timed prefills (median).")
@device_options("Precision of the client's layers.", "device", "dtype")
@click.option("--out", default="bench_client.md", show_default=True, help="Append the tables here.")
def bench_client_cmd(ks, **opts):
    """What --client-layers K costs the client: measured on --model (seconds a prompt, a decode step, weights and
    KV cache bytes), and estimated by FLOPs and bytes for the SmolLM2, Llama-1B and Llama-8B shapes (no MPI)."""
    from rshard_hpc.bench.client_cost import run_client_cost

    try:
        click.echo(run_client_cost(dict(opts, ks=[int(x) for x in ks.split(",")])))
    except RshardError as exc:
        raise click.ClickException(str(exc))


@bench.command("trace")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--steps", default="-8:", show_default=True, help="The steps to add up: a Python slice of step numbers.")
@click.option("--layer", type=int, default=10, show_default=True, help="The layer laid out across ranks.")
def bench_trace_cmd(folder, steps, layer):
    """Where a job's time went, from the host timelines a job run with RSHARD_TRACE=FOLDER wrote: start-up marks,
    time between marks per rank, and one layer of the last chosen step across ranks."""
    from rshard_hpc.bench.trace_report import report

    try:
        click.echo(report(folder, steps, layer))
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc))
