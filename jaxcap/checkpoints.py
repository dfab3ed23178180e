"""A run's saved state: Orbax checkpoints of the train state and ``run_info.json``.

``RUN_DIR/checkpoints/STEP`` keeps the last checkpoints and ``RUN_DIR/best/STEP``
the best by the validation score; each holds the train state and the loop's
progress. ``run_info.json`` says which jaxcap versions wrote the run and the
layout of its parameters, which ``jaxcap migrate`` reads to carry old runs over.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxcap import __version__, distributed
from jaxcap.errors import UserError
from jaxcap.files import write_text_atomic


class CheckpointError(UserError):
    """A run's checkpoints cannot be used as they are; the message says why and what to do."""


RUN_INFO = "run_info.json"
# The copies of a step's state that 'jaxcap migrate' makes while it swaps them (migrate.py).
MIGRATION_COPIES = ("state.migrated", "state.before-migration")


def param_layout(tree) -> dict[str, list[int]]:
    """``{"decoder/output/kernel": shape}`` of a parameter tree (arrays or their metadata)."""
    def name(key) -> str:
        return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))

    return {"/".join(name(k) for k in path): list(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def saved_layout(step_dir: Path, collection: str = "params") -> dict[str, list[int]]:
    """The layout of a checkpoint's (``checkpoints/STEP``) ``params`` or ``batch_stats``,
    read from its metadata.

    Read by the item's handler: a checkpointer would also look for checkpoint-level
    metadata inside the item's directory (it lies one level up) and log a warning on
    every load of a run."""
    handler = ocp.StandardCheckpointHandler()
    try:
        tree = handler.metadata(step_dir / "state").tree
    finally:
        handler.close()
    return param_layout(tree.get(collection, {}))


# tensorstore's codes (in the message of the ValueError Orbax raises) for stored bytes that
# are missing or do not decode: a file deleted or cut short, a manifest or a compressed chunk
# overwritten (each seen when a checkpoint's files were damaged so).
_DAMAGE_CODES = re.compile(r"\b(NOT_FOUND|OUT_OF_RANGE|DATA_LOSS|FAILED_PRECONDITION):")
# Codes of a machine or a store that may answer later: never a reason to move a checkpoint.
_PASSING_CODES = re.compile(r"\b(RESOURCE_EXHAUSTED|UNAVAILABLE|DEADLINE_EXCEEDED|ABORTED|"
                            r"CANCELLED|PERMISSION_DENIED|UNAUTHENTICATED):")


def is_damage(error: BaseException) -> bool:
    """Whether a restore failed because the checkpoint's files are shown to be damaged
    (missing, truncated, unparsable). Anything else (out of memory, a store that is busy or
    timed out, a permission or I/O error, an error not known to mean damage) may pass, or
    is not the checkpoint's fault: it is raised as it is and nothing is moved."""
    if isinstance(error, (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError)):
        return True
    if isinstance(error, (OSError, MemoryError)) or _PASSING_CODES.search(str(error)):
        return False
    return isinstance(error, ValueError) and bool(_DAMAGE_CODES.search(str(error)))


def read_run_info(workdir: Path) -> dict:
    try:
        return json.loads((workdir / RUN_INFO).read_text())
    except FileNotFoundError:
        return {}


def write_run_info(workdir: Path, params, **records) -> None:
    """``run_info.json``: the jaxcap version that started the run, the one that last ran
    it, the parameter tree's layout, and ``records`` (e.g. the migrations it went through)."""
    info = read_run_info(workdir)
    info.update(jaxcap_version=info.get("jaxcap_version", __version__),
                last_run_by=__version__, params=param_layout(params), **records)
    write_text_atomic(workdir / RUN_INFO, json.dumps(info, indent=1, sort_keys=True) + "\n")


class Checkpoints:
    """The last ``keep`` checkpoints and the best by a validation score (``metric``: val
    BLEU-4, or CIDEr-D for SCST), with the loop's progress."""

    def __init__(self, workdir: Path, keep: int, metric: str = "bleu4"):
        self.workdir = workdir

        def processes(name):  # the two managers' barriers must not share names
            return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)

        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               multiprocessing_options=processes("latest"))
        self.latest = ocp.CheckpointManager(workdir / "checkpoints", options=options)
        best = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, best_mode="max",
                                            best_fn=lambda metrics: metrics[metric],
                                            multiprocessing_options=processes("best"))
        self.best = ocp.CheckpointManager(workdir / "best", options=best)
        self.metric = metric

    @staticmethod
    def _args(state, progress):
        return ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  progress=ocp.args.JsonSave(progress))

    @staticmethod
    def _replace(manager, step: int) -> None:
        """A resumed run reaches again steps that a stopped one saved: the new one wins."""
        if step in manager.all_steps():
            manager.wait_until_finished()
            manager.delete(step)

    @staticmethod
    def _check_processes(state) -> None:
        """Several processes save one state: first they check that they hold the same."""
        if jax.process_count() == 1:
            return
        step = int(state.step)
        try:
            held = distributed.check_agreement(state, f"the state of step {step}")
        except distributed.ProcessesDisagree as error:
            raise CheckpointError(f"{error}; not saved") from None
        print(f"process {jax.process_index()}: the state of step {step} is {held[:16]} on all "
              f"{jax.process_count()} processes", file=sys.stderr)

    def save(self, state, progress: dict) -> None:
        step = int(state.step)
        self._check_processes(state)
        self._replace(self.latest, step)
        self.latest.save(step, args=self._args(state, progress), force=True)

    def save_best(self, state, progress: dict, score: float) -> None:
        step = int(state.step)
        self._check_processes(state)
        self._replace(self.best, step)
        self.best.save(step, args=self._args(state, progress), force=True,
                       metrics={self.metric: score})

    def restore_latest(self, abstract):
        """The newest readable checkpoint, or None when the run has none yet.

        Failures are told apart, and none loses the run:

        * a damaged checkpoint (``is_damage``: truncated or missing files, bad
          metadata) is moved to ``unreadable_checkpoints/`` (kept for a
          post-mortem, out of the way of the steps the run will save again) and
          the previous one is tried; when none is readable the run stops, it does
          not restart;
        * parameters whose names or shapes differ from the model the config
          builds (a run from another jaxcap version) stop the run with the
          differing paths, touching nothing;
        * anything else (out of memory, a busy or slow store, an I/O or
          permission error) is raised as it is, touching nothing: a rerun tries
          the same checkpoint again.
        """
        steps = sorted(self.latest.all_steps(), reverse=True)
        aside = self.workdir / "unreadable_checkpoints"
        if not steps and aside.is_dir() and any(aside.iterdir()):
            raise self._none_readable(aside)
        for step in steps:
            try:
                self._check_layout(self.latest, step, abstract.params)
                restored = self.latest.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()))
                return restored["state"], restored["progress"]
            except CheckpointError:
                raise
            except Exception as error:  # Orbax raises many kinds for a damaged checkpoint
                if not is_damage(error):
                    raise
                if distributed.is_primary():  # every process failed alike; one moves it
                    target = aside / f"{step}-{int(time.time())}"
                    warnings.warn(f"checkpoint {step} in {self.latest.directory} is unreadable "
                                  f"({type(error).__name__}: {error}); moved to {target}, "
                                  "trying the previous one")
                    aside.mkdir(exist_ok=True)
                    shutil.move(str(Path(self.latest.directory) / str(step)), target)
                distributed.sync(f"checkpoint {step} set aside")
                self.latest.reload()
        if steps:
            raise self._none_readable(aside)
        return None

    def _none_readable(self, aside: Path) -> CheckpointError:
        return CheckpointError(
            f"no checkpoint of {self.workdir} is readable: they were moved to {aside} (the "
            f"warnings above say why). The run is not restarted from step 0 over its history; "
            f"to start afresh on purpose, use a new --workdir.")

    def _check_layout(self, manager, step: int, abstract_params) -> None:
        """Raises a ``CheckpointError`` naming the differing parameters when the checkpoint's
        tree does not fit the model, or when a stopped ``jaxcap migrate`` left it between
        two copies; unreadable metadata raises what reading raised."""
        step_dir = Path(manager.directory) / str(step)
        if any((step_dir / name).exists() for name in MIGRATION_COPIES):
            raise CheckpointError(
                f"checkpoint {step} of {self.workdir} is in the middle of a migration that was "
                f"stopped; nothing was changed. Run 'jaxcap migrate {self.workdir}' to finish it.")
        saved = saved_layout(step_dir)
        expected = param_layout(abstract_params)
        if saved == expected:
            return
        differences = [f"{path}: {saved.get(path, 'absent')} in the checkpoint, "
                       f"{expected.get(path, 'absent')} in the model"
                       for path in sorted(set(saved) | set(expected))
                       if saved.get(path) != expected.get(path)]
        written_by = read_run_info(self.workdir).get("jaxcap_version", "an unknown version")
        raise CheckpointError(
            f"checkpoint {step} of {self.workdir} does not fit the model this config builds "
            f"({len(differences)} parameters differ; first: {'; '.join(differences[:3])}). "
            f"The run was written by jaxcap {written_by}; this is jaxcap {__version__}. "
            f"Nothing was changed. If parameters were only renamed, 'jaxcap migrate "
            f"{self.workdir}' carries the run over; otherwise resume with the jaxcap version "
            f"and config that wrote it, or train into a new --workdir.")

    def restore_best(self, abstract):
        """The best checkpoint's whole train state (``abstract``: its shapes)."""
        self.best.wait_until_finished()
        step = self.best.best_step()
        self._check_layout(self.best, step, abstract.params)
        return self.best.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]

    def restore_best_variables(self, abstract: dict) -> tuple[dict, int]:
        """The best checkpoint's ``params`` and ``batch_stats`` (``abstract``: their shapes)
        and its step: what inference needs, without the optimizer's state (twice the
        parameters again)."""
        self.best.wait_until_finished()
        step = self.best.best_step()
        self._check_layout(self.best, step, abstract["params"])
        item = {**abstract, "step": jax.ShapeDtypeStruct((), jax.numpy.int32)}
        restored = self.best.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=item, partial_restore=True)))["state"]
        return ({"params": restored["params"], "batch_stats": restored["batch_stats"]},
                int(restored["step"]))

    def close(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()
        self.latest.close()
        self.best.close()
