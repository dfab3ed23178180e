"""Two processes on loopback through JAX's distributed runtime (CPU collectives by gloo).

The pair (two processes, one device each) trains the tiny run for one epoch; a
single process with two devices trains the same config for two epochs from
scratch, and another resumes the pair's run for the second epoch. With two
devices an all-reduce is one addition, whatever its implementation, so
everything must agree bitwise: the two processes' states, the pair's state and
the single process's, and the resumed run and the uninterrupted one. (With more
devices gloo and XLA's in-process all-reduce add in different orders; the
README gives the measured difference.)
"""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxcap import distributed
from tests.xla_flags import with_devices

TINY = "tiny"  # jaxcap/configs/tiny.py
TIMEOUT_S = 400


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(workdir, data_dir, epochs, devices, *extra) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=with_devices(os.environ["XLA_FLAGS"], devices))
    return subprocess.Popen(
        [sys.executable, "-m", "jaxcap.cli", "train", "--config", TINY, "--workdir", str(workdir),
         f"--config.dataset.data_dir={data_dir}", f"--config.num_epochs={epochs}", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process) -> str:
    try:
        _, err = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
    assert process.returncode == 0, err[-3000:]
    return err


def _losses(workdir):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return ([(r["step"], r["loss"]) for r in records if "loss" in r and "val_loss" not in r],
            [(r["epoch"], r["val_loss"], r["bleu4"]) for r in records if "val_loss" in r])


def _state(workdir, step):
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(workdir / "checkpoints" / str(step) / "state")
    return {key: state[key] for key in ("params", "opt_state", "step")}


def _assert_bitwise_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    port = _free_port()
    pair = [_train(root / "pair", root / "pair_data", 1, 1, "--distributed",
                   f"--coordinator=127.0.0.1:{port}", "--num-processes=2", f"--process-id={p}")
            for p in range(2)]
    single = _train(root / "single", root / "single_data", 2, 2)
    pair_logs = [_finish(p) for p in pair]
    resumed = _train(root / "pair", root / "pair_data", 2, 2)
    _finish(single)
    _finish(resumed)
    return root, pair_logs


def test_two_processes_hold_the_state_of_one_process_with_their_devices(runs):
    root, pair_logs = runs
    held = [re.findall(r"process (\d): the state of step (\d+) is (\w+) on all 2 processes", log)
            for log in pair_logs]
    assert [p for p, _, _ in held[0]] == ["0"] * len(held[0])
    assert [p for p, _, _ in held[1]] == ["1"] * len(held[1])
    assert [s for _, s, _ in held[0]] == [s for _, s, _ in held[1]] and len(held[0]) >= 3
    assert [f for _, _, f in held[0]] == [f for _, _, f in held[1]]
    _assert_bitwise_equal(_state(root / "pair", 6), _state(root / "single", 6))
    # Only process 0 logs: one line per step and per validation, not two.
    losses, evals = _losses(root / "pair")
    assert [s for s, _ in losses] == list(range(1, 13)) and [e for e, _, _ in evals] == [1, 2]


def test_a_checkpoint_of_the_pair_resumes_exactly_in_one_process(runs):
    root, _ = runs
    assert _losses(root / "pair") == _losses(root / "single")
    _assert_bitwise_equal(_state(root / "pair", 12), _state(root / "single", 12))


def test_processes_that_disagree_are_told_apart(monkeypatch):
    """What each process contributes to the check (one process here: the gather is faked)."""
    state = {"w": np.arange(6, dtype=np.float32)}
    mine = distributed.fingerprint(state)
    assert distributed.check_agreement(state, "x") == mine
    other = distributed.fingerprint({"w": np.arange(6, dtype=np.float32) + 1})
    rows = np.stack([np.frombuffer(bytes.fromhex(h), np.uint8) for h in (mine, other)])
    monkeypatch.setattr(distributed, "allgather", lambda _: rows)
    with pytest.raises(distributed.ProcessesDisagree, match=r"processes \[1\] hold something"):
        distributed.check_agreement(state, "the state of step 4")
