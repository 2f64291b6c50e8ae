"""Every command of the app: `-h` works as `--help` does, and the help shows an `Example:` line; --version."""
from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

import selfspeech
from selfspeech.cli import app


def _commands(group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The argv path of every leaf command below ``group`` (typer's click group: a group has ``commands``)."""
    out = []
    for name, cmd in sorted(group.commands.items()):
        if hasattr(cmd, "commands"):
            out += _commands(cmd, (*path, name))
        else:
            out.append((*path, name))
    return out


COMMANDS = _commands(typer.main.get_command(app))


def test_the_walk_finds_the_commands():
    assert {("label",), ("eval",), ("data", "validate"), ("sv", "embed"), ("models", "list")} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_command_has_short_help_and_an_example(path):
    short = CliRunner().invoke(app, [*path, "-h"], terminal_width=200)
    assert short.exit_code == 0, short.output
    assert "Example:" in short.output, f"`selfspeech {' '.join(path)} --help` has no Example: line"
    assert short.output == CliRunner().invoke(app, [*path, "--help"], terminal_width=200).output


@pytest.mark.parametrize("group", [(), ("data",), ("sv",), ("models",), ("arith",)], ids=lambda g: " ".join(g) or "app")
def test_groups_take_h_too(group):
    r = CliRunner().invoke(app, [*group, "-h"])
    assert r.exit_code == 0 and "Usage:" in r.output and "Commands" in r.output


def test_version():
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"selfspeech {selfspeech.__version__}"
