"""The jaxcap command lists its subcommands and each explains itself."""

import os
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


REUSE = """
import ctypes, resource, sys, threading
from jaxcap import cli
kept = cli.keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = []
def churn():  # 64 MiB buffers, as XLA's per-step ones, allocated, written and freed in a thread
    def use():
        buffer = libc.malloc(2**26)
        ctypes.memset(buffer, 1, 2**26)
        libc.free(buffer)
    use()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        use()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=churn)
thread.start()
thread.join()
print(kept, faults[0])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_compute_commands_keep_freed_memory_for_reuse():
    """By default every 64 MiB buffer comes back as fresh pages (16,384 faults each);
    with the settings the compute commands make, freed memory is used again."""
    def run(mode, **env):
        result = subprocess.run([sys.executable, "-c", REUSE, mode], capture_output=True,
                                text=True, check=True, env={**os.environ, **env})
        kept, faults = result.stdout.split()
        return kept == "True", int(faults)

    assert run("default") == (False, pytest.approx(20 * 2**14, rel=0.1))
    kept, faults = run("keep")
    assert kept and faults < 2**14
    # A user's own malloc settings are left alone.
    assert run("keep", MALLOC_ARENA_MAX="4")[0] is False
