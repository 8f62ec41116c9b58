"""Every option of every `rshard` command says what it does (`rshard <command> --help`)."""
import click
import pytest
from click.testing import CliRunner

from rshard_hpc.cli import main


def _commands(group, path=()):
    """(path, command) of every command under `group`, groups included."""
    for name, command in sorted(group.commands.items()):
        yield path + (name,), command
        if isinstance(command, click.Group):
            yield from _commands(command, path + (name,))


COMMANDS = list(_commands(main))


def test_the_commands_are_all_there():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"run", "plan", "doctor", "convert", "bench", "bench kernel", "bench job", "bench passes", "audit"} <= names


@pytest.mark.parametrize("path,command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_option_has_help(path, command):
    missing = [p.opts[0] for p in command.params if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert not missing, f"rshard {' '.join(path)}: options without help: {', '.join(missing)}"
    assert (command.help or "").strip(), f"rshard {' '.join(path)} has no description"
    result = CliRunner().invoke(main, list(path) + ["--help"])
    assert result.exit_code == 0, result.output
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.opts[0] in result.output, (path, param.opts[0])
