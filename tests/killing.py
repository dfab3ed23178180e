"""A training run in its own process, SIGKILLed once it has saved a checkpoint."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def kill_after_checkpoint(args: list[str], workdir: Path, step: int) -> None:
    """Runs ``jaxcap ARGS`` and SIGKILLs it as soon as ``workdir/checkpoints`` holds a
    checkpoint of ``step`` or later; fails if the run ended before that."""
    process = subprocess.Popen([sys.executable, "-m", "jaxcap.cli", *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dict(os.environ))
    deadline = time.time() + 300
    checkpoints = workdir / "checkpoints"
    while time.time() < deadline and process.poll() is None:
        if checkpoints.exists() and any(p.name.isdigit() and int(p.name) >= step
                                        for p in checkpoints.iterdir()):
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
