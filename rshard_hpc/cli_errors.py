"""How an `rshard` command ends on an error, on every rank: collective user errors exit cleanly with their status,
a user-facing error met mid-run (JobAborted) or anything unexpected aborts the whole job after saying so."""
from __future__ import annotations

import sys
import traceback

import click

from rshard_hpc.dist.launcher import world_rank
from rshard_hpc.errors import JobAborted, RshardError
from rshard_hpc.run import testhooks


def fail(exc: BaseException) -> None:
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
