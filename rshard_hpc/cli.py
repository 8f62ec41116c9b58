"""The `rshard` command. Each command is thin: it parses options and calls into the package."""
from __future__ import annotations

import sys
import traceback

import click

from rshard_hpc import __version__
from rshard_hpc.cli_options import device_options, plan_options
from rshard_hpc.dist.launcher import tune_mpi_env, world_rank
from rshard_hpc.engine.generate import GenerateSettings
from rshard_hpc.errors import InputError, JobAborted, RshardError
from rshard_hpc.models.registry import BUNDLED, DEFAULT_DECODER, DEFAULT_MODEL
from rshard_hpc.plan.check import SEARCH_MAX
from rshard_hpc.run import profiling, termination, testhooks
from rshard_hpc.run.export import FORMATS as EXPORT_FORMATS
from rshard_hpc.run.jobfile import config_callback
from rshard_hpc.run.options import TASKS, RunOptions


def _fail(exc: BaseException) -> None:
    """End the job on an error: collective user errors exit cleanly, anything else aborts every rank."""
    if isinstance(exc, JobAborted):  # a user-facing error mid-run: said plainly by the rank that met it
        click.echo(f"rshard: error: {exc}", err=True)
        _exit(exc.exit_code, abort=True)
    if isinstance(exc, RshardError):
        if world_rank() == 0:
            click.echo(f"rshard: error: {exc}", err=True)
        _exit(exc.exit_code, abort=False)
    role = _describe_rank()
    click.echo(f"rshard: {role} failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}", err=True)
    _exit(1, abort=True)


def _exit(code: int, abort: bool) -> None:
    """Exit this rank with `code` (every rank does, after a collective error), or end the whole job by abort."""
    testhooks.at("rank_exiting", rank=world_rank(), code=code)
    if not abort:
        sys.exit(code)
    from rshard_hpc.dist import collectives

    collectives.abort(code)


def _describe_rank() -> str:
    try:
        from rshard_hpc.dist.topology import current

        return current().describe()
    except Exception:
        return f"rank {world_rank()}"


@click.group()
@click.version_option(__version__, prog_name="rshard")
def main():
    """rshard: token-sharded private LLM inference (see README.md)."""
    profiling.start_if_asked()


@main.command()
@click.argument("source", type=click.Path())
@click.argument("out", type=click.Path())
def convert(source, out):
    """Convert a Hugging Face folder (safetensors) or a GGUF file to the HDF5 weight file OUT."""
    from rshard_hpc.convert import convert_any

    try:
        path = convert_any(source, out)
    except RshardError as exc:
        _fail(exc)
    click.echo(f"wrote {path}")


@main.command()
@click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
              callback=config_callback(strict=True),
              help="Job file (TOML, or JSON if .json) of these options; command-line options override it.")
@click.option("--task", type=click.Choice(list(TASKS)), default=RunOptions.task, show_default=True,
              help="embed: one sentence embedding a prompt (encoders); generate: new tokens (decoders).")
@click.option("--model", default=RunOptions.model, show_default=True,
              help=f"A weight file (.h5) or a bundled model name ({', '.join(BUNDLED)}).")
@click.option("--prompts", required=True, help="JSONL ({\"text\", \"id\"} a line) or plain text (a prompt a line).")
@click.option("--out", required=True, help="Results HDF5 file (appended after every batch).")
@plan_options()
@click.option("--min-delta", type=int, default=RunOptions.min_delta, show_default=True,
              help="Refuse a plan whose delta (smallest unseen gap before a node's later run) is below this; "
                   "see docs/privacy.md. 0: no check.")
@click.option("--allow-weak-plan", is_flag=True, help="Run a plan below --min-delta anyway (with a warning).")
@click.option("--public-prefix", type=int, default=RunOptions.public_prefix,
              help="Leading positions known to everyone (BOS, [CLS], a template). Default: what the tokenizer adds.")
@click.option("--client-layers", type=int, default=RunOptions.client_layers,
              help="K: the client runs the first K layers on each whole prompt and sends CompNodes the layer-K "
                   "hidden rows of their positions instead of token ids; the servers start at layer K. Default: "
                   "min(4, the model's layers // 4), the audit's recommendation (docs/privacy.md); 0: token ids.")
@click.option("--batch-tokens", type=int, default=RunOptions.batch_tokens, show_default=True, help="Tokens per batch (at least one prompt).")
@click.option("--resume", is_flag=True, help="Skip prompt ids already in --out and append the rest.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--truncate", is_flag=True, help="Cut over-long prompts to the model's limit instead of failing.")
@device_options("Engine precision. bfloat16: bf16 GEMM inputs and q/k/v (fp32 accumulation, norms, residuals "
                "and merge); on GPUs the tensor-core attention kernel. See README.")
@click.option("--max-new-tokens", type=int, default=GenerateSettings.max_new_tokens, show_default=True,
              help="generate: tokens to add at most.")
@click.option("--temperature", type=float, default=GenerateSettings.temperature, show_default=True,
              help="generate: 0 is greedy.")
@click.option("--top-k", type=int, default=GenerateSettings.top_k, show_default=True,
              help="generate: sample among the k likeliest (0: all).")
@click.option("--top-p", type=float, default=GenerateSettings.top_p, show_default=True,
              help="generate: nucleus sampling mass.")
@click.option("--sample-seed", type=int, default=GenerateSettings.seed, show_default=True,
              help="generate: sampling seed (each prompt draws from its own stream: runs are reproducible).")
@click.option("--stop", multiple=True, help="generate: stop string (repeatable); cut from the text.")
@click.option("--chat", is_flag=True, help="generate: wrap each prompt in the model's chat template.")
@click.option("--quiet", is_flag=True, help="No progress lines (the summary is still printed).")
def run(quiet, max_new_tokens, temperature, top_k, top_p, sample_seed, stop, chat, **kwargs):
    """Run a batch job; launch with mpiexec -n (1 + alpha + beta^2), or on any -n without --alpha/--beta (the
    most private layout for that many ranks)."""
    tune_mpi_env()
    from rshard_hpc.run.job import run as run_job
    from rshard_hpc.run.options import RunOptions

    try:
        generate = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=sample_seed, stop=stop, chat=chat)
        with termination.guard():  # SIGTERM ends the job, never inside a results write
            run_job(RunOptions(progress=not quiet, generate=generate, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - every failure must end every rank
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        _fail(exc)
    testhooks.at("rank_exiting", rank=world_rank(), code=0)


@main.command()
@click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
              callback=config_callback(strict=False), help="A `rshard run` job file: its alpha, beta and device.")
@plan_options("alpha", "beta", alpha=None, beta=None)
@device_options("", "device", "transport")
def doctor(alpha, beta, device, transport):
    """Check a launch: per rank host, role, GPU, MPI library, CUDA-awareness, versions; then a verdict.

    Launch it like the job (mpiexec -n W rshard doctor --alpha A --beta B, or under srun). Exit status 0 when
    the job can run, 2 on a problem, 3 when the processes are not one MPI job."""
    tune_mpi_env()
    from rshard_hpc.dist.doctor import check_layout_options, run_doctor

    try:
        if click.get_current_context().default_map is not None and (alpha, beta) != (None, None):
            given = RunOptions(alpha=alpha, beta=beta).with_layout(0)[0]  # --config: one given, the other as in `run`
            alpha, beta = given.alpha, given.beta
        check_layout_options(alpha, beta)
        status = run_doctor(alpha, beta, device, echo=click.echo, transport=transport)
    except BaseException as exc:  # noqa: BLE001 - a failing rank must not leave the others waiting
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        _fail(exc)
    sys.exit(status)


@main.command("plan")
@plan_options()
@click.option("--length", "n", type=int, default=64, show_default=True,
              help="Sequence length (a prompt, plus the new tokens when generating).")
@click.option("--ranks", type=int, default=None,
              help="With neither --alpha nor --beta: the layout `rshard run` takes on this many ranks. Default: the "
                   "fewest ranks reaching --delta (13 for 2).")
@click.option("--public-prefix", type=int, default=None,
              help="Leading positions known to everyone. Default: what the model's tokenizer adds.")
@click.option("--model", default=None, help="A weight file (.h5) or bundled name: vocabulary size, mask and public "
                                            "prefix from it. Default: rshard run's (all-MiniLM-L6-v2) where "
                                            "installed, else V=49152, causal, no public prefix.")
@click.option("--vocab", type=int, default=None, help="Vocabulary size V for the cost exponents. Default: the "
                                                      "model's.")
@click.option("--causal/--bidirectional", default=None,
              help="Attention mask for the partial counts. Default: the model's.")
@click.option("--delta", type=int, default=RunOptions.min_delta, show_default=True,
              help="Report the smallest alpha, beta reaching this delta at this length.")
@click.option("--search-max", type=int, default=SEARCH_MAX, show_default=True, help="Largest alpha and beta searched.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--picture", default=None, help="Also draw who sees what to this .png or .svg file (needs matplotlib).")
@click.option("--collude", type=int, default=None,
              help="Also show the union view of the worst N colluding nodes (positions seen together, delta).")
def plan_cmd(alpha, beta, scheme, c, c_a, seed, plan_file, n, ranks, public_prefix, model, vocab, causal, delta,
             search_max, as_json, picture, collude):
    """Show a plan's privacy without MPI: rank layout, every node's view, runs, gaps, cost exponents,
    first-run exposure, partials over few keys, and the smallest layout reaching --delta (docs/privacy.md)."""
    import json

    from rshard_hpc.plan.report import check_request, jsonable, plan_defaults, plan_document, render_plan
    from rshard_hpc.run.options import RunOptions

    try:
        check_request(n, public_prefix, vocab, delta, search_max)
        opts, chosen = RunOptions(alpha=alpha, beta=beta, scheme=scheme, c=c, c_a=c_a, seed=seed, plan_file=plan_file,
                                  min_delta=delta, allow_weak_plan=True).with_layout(ranks)
        spec = opts.plan_spec()
        facts = plan_defaults(model, public_prefix, vocab, causal)  # as `rshard run` takes them
        doc = plan_document(spec, n, facts["public_prefix"], facts["vocab"], facts["causal"], delta, search_max,
                            collude)
        doc.update(layout_chosen=chosen, defaults_from=facts["from"])
        if picture:
            from rshard_hpc.plan.picture import draw, plan_picture

            draw(plan_picture(spec, n, doc["public_prefix"]), picture)
    except RshardError as exc:
        _fail(exc)
    click.echo(json.dumps(jsonable(doc), indent=1) if as_json else render_plan(doc))
    if picture:
        click.echo(f"picture in {picture}", err=True)


@main.command()
@click.argument("results")
@click.option("--picture", default=None,
              help="Also draw what each rank received for one prompt to this .png or .svg file (needs matplotlib).")
@click.option("--prompt", default=None, help="The prompt --picture draws, its id as reports spell it (default: the "
                                             "first).")
def show(results, picture, prompt):
    """Sum up a results file: model, task, prompts, precision, plan, privacy verdict, time and bytes, version."""
    from rshard_hpc.run.show import draw_prompt, render_summary, summarize

    try:
        if prompt is not None and not picture:
            raise InputError("--prompt chooses the prompt --picture draws: pass --picture FILE too")
        text = render_summary(summarize(results))
        drawn = draw_prompt(results, picture, prompt) if picture else None
    except RshardError as exc:
        _fail(exc)
    click.echo(text)
    if drawn:
        click.echo(drawn)


@main.command()
@click.argument("results")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default=None,
              help="jsonl: {\"id\", \"embedding\" | \"text\"} a line; csv: a header, then a row a prompt; npy: the "
                   "embeddings, ids in NAME.ids.json. Default: from --out's suffix.")
@click.option("--out", required=True, help="The file to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def export(results, fmt, out, overwrite):
    """Write a results file's ids with their embeddings or generated text for the next tool."""
    from rshard_hpc.run.export import export_results

    try:
        written = export_results(results, out, fmt, overwrite)
    except RshardError as exc:
        _fail(exc)
    click.echo(f"wrote {', '.join(map(str, written))}")


@main.group()
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
        _fail(exc)


@bench.command("suite")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="Where the jobs and the anchors run (the cpu-* rows always run on CPUs).")
@click.option("--rows", default=None, help="Rows to run (comma-separated): embed-file, embed-small, decode, "
                                           "prefill-512, prefill-8k, cpu-one, cpu-batch. Default: the CPU rows and the "
                                           "embedding rows on cpu, the embedding, decode and prefill rows on gpu.")
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


@main.command()
@click.option("--model", default=DEFAULT_DECODER, show_default=True,
              help="A Llama weight file (.h5) or a bundled decoder name.")
@click.option("--prompts", default=None, help="Plain text (a prompt a line) or JSONL ({\"text\"} a line). With "
                                              "--client-layers: default the audit's held-apart prompts.")
@plan_options("alpha", "beta", "scheme", "c", "c_a", "seed", alpha=3, beta=3, c=1, c_a=2)
@click.option("--layer", type=int, default=1, show_default=True, help="Attack the rows of this layer (0 = context-free).")
@click.option("--top-k", type=int, default=8, show_default=True, help="Candidates per position from the model's ranking.")
@click.option("--budget", type=int, default=None,
              help="Forward passes (candidate rows) per unknown group; >= vocab size makes the last position "
                   "exhaustive. Default 4096 (512 with --client-layers).")
@click.option("--beam", type=int, default=None, help="Gap fillings kept at most. Default 8 (4 with --client-layers).")
@click.option("--tol", type=float, default=1e-3, show_default=True, help="Relative row distance accepted as a match.")
@click.option("--max-tokens", type=int, default=None,
              help="Audit the first N tokens of each prompt. Default 32 (48 with --client-layers).")
@click.option("--node", "nodes", multiple=True, help="Node to audit (attnI_J or compK; repeatable).")
@click.option("--all-nodes", is_flag=True, help="Every AttnNode and CompNode (default: every AttnNode).")
@click.option("--assist-layer0", is_flag=True,
              help="Recover the view's tokens from layer-0 rows first, then attack the gaps at --layer.")
@click.option("--no-control", is_flag=True, help="Skip the control (the attack on every position).")
@click.option("--client-layers", default=None,
              help="The extended audit (docs/privacy.md): every attack (match, nearest neighbour, learned inverters, "
                   "q·k scores) on every node, for each K in this list (layers run on the client), e.g. 0,1,2,4.")
@click.option("--seeds", default=None, help="With --client-layers: seed prompts of the inverters' training text "
                                            "(default: the audit's own).")
@click.option("--new-tokens", type=int, default=40, show_default=True,
              help="With --client-layers: tokens the model adds greedily to every seed (its training text).")
@click.option("--match-nodes", default="comp0,attn0_0,attn0_1,control", show_default=True,
              help="With --client-layers: the nodes the (slow) match attack runs on.")
@click.option("--match-prompts", type=int, default=2, show_default=True,
              help="With --client-layers: the prompts the match attack runs on.")
@click.option("--fill/--no-fill", default=True, show_default=True,
              help="With --client-layers: guess unseen positions with the model (worst node of each kind).")
@click.option("--threads", type=int, default=1, show_default=True,
              help="Torch threads (on a small shared machine one is fastest).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--out", default=None, help="Also append the table (or JSON with --json) to this file.")
def audit(model, prompts, alpha, beta, scheme, c, c_a, seed, nodes, all_nodes, no_control, as_json, out, client_layers,
          threads, **opts):
    """Attacks with the real model on what each node sees (no MPI; docs/audit.md, docs/privacy.md)."""
    import json

    from rshard_hpc.plan.schemes import PlanSpec

    try:
        import torch

        torch.set_num_threads(max(1, threads))
    except ImportError:
        pass
    def echo(line):
        click.echo(line, err=True)

    try:
        spec = PlanSpec(scheme=scheme, alpha=alpha, beta=beta, c=c, c_a=c_a, seed=seed)
        if client_layers is not None:
            from rshard_hpc.audit.sweep import format_sweep, sweep_from_options

            rep = sweep_from_options(model, prompts, spec, client_layers, echo=echo, **opts)
            text = json.dumps(rep, indent=1) if as_json else format_sweep(rep)
        else:
            from rshard_hpc.audit.report import format_report
            from rshard_hpc.audit.run import load_prompts, run_audit

            if prompts is None:
                raise InputError("--prompts is required (or --client-layers for the extended audit)")
            for key, default in (("budget", 4096), ("beam", 8), ("max_tokens", 32)):
                opts[key] = default if opts[key] is None else opts[key]
            for key in ("seeds", "new_tokens", "match_nodes", "match_prompts", "fill"):
                opts.pop(key)
            rep = run_audit(model, load_prompts(prompts), spec, nodes=list(nodes) or None, all_nodes=all_nodes,
                            control=not no_control, echo=echo, **opts)
            text = json.dumps(rep, indent=1) if as_json else format_report(rep)
    except RshardError as exc:
        raise click.ClickException(str(exc))
    click.echo(text if as_json else "\n" + text)
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
