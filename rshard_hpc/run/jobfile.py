"""Job description files: one TOML (or JSON) file of `rshard run` options, shared by every launch of a job.

A key is an option name with dashes or underscores (`c-a` or `c_a`); values become click's defaults, so an
option on the command line overrides the file. Relative paths stay relative to the working directory of the
launch (for `sbatch`, the submit directory), exactly as on the command line. TOML needs Python 3.11+
(`tomllib`) or the `tomli` package; JSON (`.json`) always works.

    # slurm/job.toml
    task = "embed"
    prompts = "inputs/sample.jsonl"
    alpha = 3
    beta = 3
    c_a = 2

`python -m rshard_hpc.run.jobfile FILE [rshard run options]` prints "W ALPHA BETA", the job's world size
W = 1 + alpha + beta^2 and its layout (an --alpha/--beta among the options wins, as in `rshard run`);
`slurm/run.sh` uses it to ask Slurm for the right number of tasks.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from rshard_hpc.dist.launcher import world_rank
from rshard_hpc.dist.topology import world_size_for
from rshard_hpc.plan.schemes import DEFAULT_DELTA
from rshard_hpc.errors import InputError
from rshard_hpc.run import testhooks


def _toml_loads(text: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError as exc:
            raise InputError("TOML job files need Python 3.11+ or `pip install tomli`; "
                             "or write the job file as JSON (.json)") from exc
    return tomllib.loads(text)


def load(path) -> dict:
    """The job file as {option name with underscores: value}; an InputError names the file on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read job file {path}: {exc}") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else _toml_loads(text)
    except ValueError as exc:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        raise InputError(f"job file {path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"job file {path} must hold a table of options")
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            raise InputError(f"job file {path}: [{key}] tables are not options; write `key = value` lines only")
        out[str(key).replace("-", "_")] = value
    return out


def config_callback(strict: bool = True):
    """A click callback for an eager `--config FILE` option: the file's values become the command's defaults.

    strict: a key that is no option of the command is an error (naming the valid keys); otherwise such keys
    are ignored (`rshard doctor` reads only the layout from a `rshard run` job file). A value the option's type
    refuses is an error naming the file and the key. Errors come before MPI starts: rank 0 says
    `rshard: error: …` once, and every rank exits with status 2."""

    def callback(ctx, param, value):
        if not value:
            return value
        try:
            ctx.default_map = dict(ctx.default_map or {}, **_options(ctx, param, value, strict))
        except InputError as exc:
            _refuse(ctx, exc)
        return value

    return callback


def _options(ctx, param, path, strict: bool) -> dict:
    """The job file's values for the command's options, each checked with the option's own type."""
    import click

    data = load(path)
    options = {p.name: p for p in ctx.command.params if p.name != param.name}
    unknown = sorted(set(data) - set(options))
    if unknown and strict:
        raise InputError(f"job file {path}: unknown option(s) {', '.join(unknown)} "
                         f"(valid: {', '.join(sorted(options))})")
    out = {}
    for key, value in data.items():
        if key in options:
            if getattr(options[key], "multiple", False) and isinstance(value, str):
                value = [value]  # stop = "x" as well as stop = ["x", "y"]
            try:
                options[key].type_cast_value(ctx, value)
            except click.BadParameter as exc:
                raise InputError(f"job file {path}: {key}: {exc.message}") from exc
            out[key] = value
    return out


def _refuse(ctx, exc: InputError) -> None:
    """Say a job-file error once (rank 0, from the launcher's variables: MPI is not up) and end every rank."""
    import click

    if world_rank() == 0:
        click.echo(f"rshard: error: {exc}", err=True)
    testhooks.at("rank_exiting", rank=world_rank(), code=exc.exit_code)
    ctx.exit(exc.exit_code)


def layout(path, argv=()) -> tuple[int, int]:
    """(alpha, beta) of the job file at `path`, with --alpha/--beta in argv taking precedence. Neither given:
    the layout `rshard run` takes on the fewest ranks reaching the job's --min-delta (run/options.py)."""
    data = load(path)
    values = {key: data.get(key) for key in ("alpha", "beta", "min_delta")}
    args = list(argv)
    for n, arg in enumerate(args):
        for key in values:
            flag = f"--{key.replace('_', '-')}"
            if arg == flag and n + 1 < len(args):
                values[key] = args[n + 1]
            elif arg.startswith(f"{flag}="):
                values[key] = arg.split("=", 1)[1]
    if values["alpha"] is None and values["beta"] is None:
        return _default_layout(path, values["min_delta"])
    try:
        alpha, beta = int(values["alpha"] or 1), int(values["beta"] or 1)
    except (TypeError, ValueError) as exc:
        raise InputError(f"job file {path}: alpha and beta must be integers ({exc})") from exc
    if alpha < 1 or beta < 1:
        raise InputError(f"job file {path}: alpha and beta must be >= 1 (got alpha={alpha}, beta={beta})")
    return alpha, beta


def _default_layout(path, min_delta) -> tuple[int, int]:
    """The layout `rshard run` takes (RunOptions.with_layout) on the fewest ranks reaching min_delta."""
    from rshard_hpc.run.options import RunOptions

    try:
        opts = RunOptions(min_delta=DEFAULT_DELTA if min_delta is None else float(min_delta))
    except (TypeError, ValueError) as exc:
        raise InputError(f"job file {path}: min_delta must be a number ({exc})") from exc
    chosen, _ = opts.with_layout(None)
    return chosen.alpha, chosen.beta


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m rshard_hpc.run.jobfile JOB_FILE [rshard run options]  (prints: 1+alpha+beta^2 alpha beta)")
        return 0 if argv else 2
    try:
        alpha, beta = layout(argv[0], argv[1:])
        print(world_size_for(alpha, beta), alpha, beta)
    except InputError as exc:
        print(f"rshard: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
