"""The `rshard` command. Each command is thin: it parses options and calls into the package."""
from __future__ import annotations

import sys

import click

from rshard_hpc import __version__
from rshard_hpc.bench.cli import bench
from rshard_hpc.cli_errors import fail as _fail
from rshard_hpc.cli_options import device_options, plan_options
from rshard_hpc.dist.launcher import apply_scheduling, resume_collection, tune_mpi_env, world_rank
from rshard_hpc.engine.generate import GenerateSettings
from rshard_hpc.errors import InputError, RshardError
from rshard_hpc.models.registry import BUNDLED, DEFAULT_DECODER
from rshard_hpc.plan.check import SEARCH_MAX
from rshard_hpc.run import profiling, termination, testhooks
from rshard_hpc.run.export import FORMATS as EXPORT_FORMATS
from rshard_hpc.run.jobfile import config_callback
from rshard_hpc.run.options import DEFAULT_BATCH_TOKENS, TASKS, RunOptions


@click.group()
@click.version_option(__version__, prog_name="rshard")
def main():
    """rshard: token-sharded private LLM inference (see README.md)."""
    profiling.start_if_asked()
    if click.get_current_context().invoked_subcommand != run.name:
        resume_collection()  # `run` resumes the collector after its set-up (dist/launcher.lean_rank_process)


main.add_command(bench)


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
@click.option("--batch-tokens", type=click.IntRange(min=1), default=RunOptions.batch_tokens,
              help="Tokens per batch (at least one prompt a batch). Default: "
                   + ", ".join(f"{n} on --device {d}" for d, n in DEFAULT_BATCH_TOKENS.items()) + ".")
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
        apply_scheduling()  # SCHED_BATCH where ranks outnumber cores (RSHARD_SCHED)
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
            from rshard_hpc.audit.sweep import sweep_from_options
            from rshard_hpc.audit.sweep_report import format_sweep

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
