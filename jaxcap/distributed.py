"""Several processes, one run: JAX's distributed runtime (TPU pod slices, GPU hosts).

Every process runs the same ``jaxcap train`` on its own local devices; the
pmapped step's collectives span the devices of all processes, so the update is
that of one process holding every device. What else must agree, and how:

* files in the run directory and the dataset/feature caches are written by
  process 0 first (``primary_first``), then the others find them (a shared
  filesystem) or build the same ones deterministically (a host's own disk);
* logs and ``metrics.jsonl`` are written by process 0 only;
* validation captions are gathered from all processes before scoring, so every
  process takes the same decisions (best checkpoint, plateau, early stop);
* Orbax checkpoints are written and restored by all processes together, and
  before each save the processes check that they hold identical parameters
  (``check_agreement``): a run whose processes diverged stops with the step
  instead of saving one process's state as if it were everyone's.

With one process every helper here is a no-op or a plain call.
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """``jax.distributed.initialize``; on CPUs the collectives between processes go
    through gloo (XLA's CPU client has no other). Without arguments the cluster is
    detected (Cloud TPU, SLURM, Open MPI)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)


def is_primary() -> bool:
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Waits until every process reaches the barrier ``name``."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def primary_first(name: str, make):
    """``make()`` on process 0, then (after a barrier) on the others.

    For idempotent preparation (build if absent, else load): on a shared
    filesystem the others load what process 0 built instead of racing it.
    """
    if is_primary():
        result = make()
    sync(name)
    if not is_primary():
        result = make()
    return result


def allgather(array: np.ndarray) -> np.ndarray:
    """``(process_count, *array.shape)``: every process's ``array``, in process order."""
    if jax.process_count() == 1:
        return np.asarray(array)[None]
    return np.asarray(multihost_utils.process_allgather(np.asarray(array)))


def fingerprint(tree) -> str:
    """SHA-256 of every leaf's dtype, shape and bytes, in tree order."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        leaf = np.asarray(leaf)
        digest.update(f"{leaf.dtype}{leaf.shape}".encode())
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


class ProcessesDisagree(Exception):
    """Processes that should hold identical state do not."""


def check_agreement(tree, what: str) -> str:
    """The fingerprint of ``tree``, checked to be the same on every process."""
    mine = fingerprint(tree)
    every = allgather(np.frombuffer(bytes.fromhex(mine), np.uint8))
    differ = [p for p, row in enumerate(every) if bytes(row).hex() != mine]
    if differ:
        raise ProcessesDisagree(
            f"{what}: process {jax.process_index()} holds {mine[:12]}, processes {differ} "
            f"hold something else; the processes diverged (a different config, data or "
            f"jaxcap version on some host?)")
    return mine
