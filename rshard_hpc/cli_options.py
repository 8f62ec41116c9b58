"""The options several `rshard` commands share, declared once (layout and plan, device and precision); their
defaults are read from the objects that own them (RunOptions, PlanSpec), never written here again."""
from __future__ import annotations

import click

from rshard_hpc.dist.transport import TRANSPORTS
from rshard_hpc.ops.arrays import DEVICES
from rshard_hpc.ops.precision import DTYPES
from rshard_hpc.plan.schemes import SCHEMES
from rshard_hpc.run.options import RunOptions


def plan_options(*names, **defaults):
    """The layout and plan options (architecture.md §2, §3), declared once: `run` and `plan` take them all,
    `bench job`, `audit` and `doctor` a few. Defaults are RunOptions' (their help says what an option not given
    means) unless a command names its own."""
    names = names or tuple(_PLAN_OPTIONS)
    return lambda command: _stack(command, [_PLAN_OPTIONS[n](*_plan_default(n, defaults)) for n in names])


def _plan_default(name, defaults) -> tuple:
    """(default, what the help adds about it) of a plan option."""
    if name in defaults:
        return defaults[name], ""
    return getattr(RunOptions, name), _NOT_GIVEN.get(name, "")


_LAYOUT_NOT_GIVEN = (" Default: with neither --alpha nor --beta, the most private layout for the number of ranks "
                     "(README); with one of them, 1.")
_NOT_GIVEN = {"alpha": _LAYOUT_NOT_GIVEN, "beta": _LAYOUT_NOT_GIVEN, "c": " Default: 1.",
              "c_a": " Default: the layout's (2 for --min-delta 2) when --alpha and --beta are not given, else 1."}


def _choice_option(flag, choices, help_text):
    return lambda default, note="": click.option(flag, type=click.Choice(choices), default=default, show_default=True,
                                                 help=help_text + note)


def _int_option(flag, dest, help_text):
    return lambda default, note="": click.option(flag, dest, type=int, default=default,
                                                 show_default=default is not None, help=help_text + note)


_PLAN_OPTIONS = {
    "alpha": _int_option("--alpha", "alpha", "Number of CompNodes."),
    "beta": _int_option("--beta", "beta", "AttnNode grid side (beta^2 AttnNodes)."),
    "scheme": _choice_option("--scheme", list(SCHEMES),
                             "Plan scheme: strided chunks, seeded random chunks, or an explicit plan file."),
    "c": _int_option("--c", "c", "CompNode chunk length."),
    "c_a": _int_option("--c-a", "c_a", "Index-group chunk length."),
    "seed": _int_option("--seed", "seed", "Seed of the random plan scheme."),
    "plan_file": lambda default, note="": click.option("--plan-file", default=default,
                                                       help="JSON {\"comp\": [...], \"group\": [...]} for --scheme "
                                                            "explicit."),
}


def device_options(dtype_help: str, *names):
    """The device, transport and precision options, declared once (`run`, `bench job`; `bench passes` and
    `doctor` take some)."""
    options = {
        "device": click.option("--device", type=click.Choice(list(DEVICES)), default=RunOptions.device,
                               show_default=True, help="cpu: NumPy on every rank; gpu: CompNodes and AttnNodes on "
                                                       "CuPy and the CUDA kernels, one GPU a rank (several may share)."),
        "transport": click.option("--transport", type=click.Choice(list(TRANSPORTS)), default=RunOptions.transport,
                                  show_default=True,
                                  help="How GPU workers move device buffers: staged (pinned host buffers and MPI), "
                                       "mpi (device buffers to a CUDA-aware MPI), ipc (CUDA IPC, one node), nccl "
                                       "(one rank per GPU). auto: nccl, else ipc, else mpi, each where evidence "
                                       "says it works, else staged."),
        "dtype": click.option("--dtype", type=click.Choice(list(DTYPES)), default=RunOptions.dtype,
                              show_default=True, help=dtype_help),
    }
    names = names or tuple(options)
    return lambda command: _stack(command, [options[n] for n in names])


def _stack(command, options):
    """Apply click options so that they list in the given order."""
    for option in reversed(options):
        command = option(command)
    return command
