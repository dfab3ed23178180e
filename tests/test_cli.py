"""The jaxcap command lists its subcommands and each explains itself."""

import subprocess
import sys

import pytest

from jaxcap.cli import build_parser

COMMANDS = ("convert", "extract", "prepare", "train", "caption", "evaluate")


def test_help_lists_the_subcommands():
    result = subprocess.run([sys.executable, "-m", "jaxcap.cli", "--help"],
                            capture_output=True, text=True, check=True)
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: jaxcap {command}" in capsys.readouterr().out
