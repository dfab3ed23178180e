"""``jaxcap migrate RUN``: carry a run over a rename of parameters.

A jaxcap version that renames parameters (a module moved or got a better name,
the shapes unchanged) leaves the runs of older versions unable to resume or
load: their checkpoints no longer fit the model their config builds, and
``jaxcap train``/``caption``/``evaluate`` stop with the differing paths. Where
the change is only a rename, this command rewrites every checkpoint of the run
(``checkpoints/`` and ``best/``) under the new names: the parameters, Adam's
moments, which mirror them, and a variant's statistics. Values are copied bit
for bit, so the run then resumes exactly where it stopped.

The renames are regular expressions over ``/``-joined parameter paths
(``decoder/h_projection/kernel``), applied in order: those of ``RENAMES``,
the table in which a jaxcap release that renames parameters records its
renames, and ``--rename OLD=NEW`` for a user's own (a fork, a variant renamed in
a research branch). Nothing is written unless, renamed, every checkpoint fits the
model exactly; the originals are kept in ``RUN/before-migration-TIME/`` and the
migration is recorded in ``run_info.json``. Each checkpoint's state is swapped
for its renamed copy by renaming the original aside, then the copy into place: a
migration killed at any moment leaves every step's state whole under one of the
two names, and ``jaxcap migrate RUN`` finishes the swap (training and captioning
refuse such a run until then).
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from jaxcap import __version__
from jaxcap.errors import UserError
from jaxcap.models.encoder import load_encoder
from jaxcap.runs import abstract_variables, build_model, read_run
from jaxcap.checkpoints import (MIGRATION_COPIES, param_layout, read_run_info, saved_layout,
                                write_run_info)

# version that renamed -> [(old path pattern, new path)]. A release that renames a parameter
# adds its renames here, so that 'jaxcap migrate RUN' carries older runs over unasked.
# No release has renamed a parameter so far: runs of every version load as they are.
RENAMES: dict[str, list[tuple[str, str]]] = {}


class MigrationError(UserError):
    """The run cannot be carried over by renames; the message says what differs."""


def parse_rename(text: str) -> tuple[str, str]:
    old, sep, new = text.partition("=")
    if not sep or not old:
        raise MigrationError(f"--rename {text!r}: expected OLD=NEW (a regular expression over "
                             "paths like decoder/h_projection/kernel, and its replacement)")
    try:
        re.compile(old)
    except re.error as error:
        raise MigrationError(f"--rename {text!r}: {error}") from None
    return old, new


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def rename_path(path: str, renames) -> str:
    for old, new in renames:
        path = re.sub(old, new, path)
    return path


def renamed_tree(tree, mapping: dict[str, str], paths: set[str]):
    """``tree`` with every nested dict whose ``/``-joined leaf paths are among ``paths``
    (the parameters, and Adam's moments that mirror them, where a frozen part may be left
    out) re-keyed by ``mapping``; lists and leaves keep their kind."""
    if isinstance(tree, dict):
        flat = traverse_util.flatten_dict(tree, sep="/")
        if flat and set(flat) <= paths:
            return traverse_util.unflatten_dict({mapping.get(k, k): v for k, v in flat.items()},
                                                sep="/")
        return {key: renamed_tree(value, mapping, paths) for key, value in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(renamed_tree(item, mapping, paths) for item in tree)
    return tree


def rename_saved(state: dict, mapping: dict[str, str]) -> dict:
    """A checkpoint's state as saved (nested dicts and lists: the train state's fields, the
    optimizer's states) with paths renamed by ``mapping`` (old -> new) in the parameters,
    the optimizer's moments and ``batch_stats``."""
    params = set(traverse_util.flatten_dict(state["params"], sep="/"))
    stats = set(traverse_util.flatten_dict(state["batch_stats"], sep="/"))
    renamed = renamed_tree({k: v for k, v in state.items() if k != "batch_stats"}, mapping,
                           params)
    return {**renamed, "batch_stats": renamed_tree(state["batch_stats"], mapping, stats)}


def saved_state_shapes(step_dir: Path) -> dict:
    """A checkpoint's state as saved, as shapes: what restores it without the train state
    (and so without the trainer and its optimizer)."""
    handler = ocp.StandardCheckpointHandler()
    try:
        tree = handler.metadata(step_dir / "state").tree
    finally:
        handler.close()
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), tree)


def _plan(saved: dict, expected: dict, renames, where: str) -> dict[str, str]:
    """old path -> new path for the checkpoint's ``saved`` layout, or a MigrationError."""
    mapping = {path: rename_path(path, renames) for path in saved}
    renamed = {mapping[path]: shape for path, shape in saved.items()}
    if len(renamed) != len(saved):
        raise MigrationError(f"{where}: the renames map two parameters to one name")
    if renamed != expected:
        differences = [f"{path}: {renamed.get(path, 'absent')} after renaming, "
                       f"{expected.get(path, 'absent')} in the model"
                       for path in sorted(set(renamed) | set(expected))
                       if renamed.get(path) != expected.get(path)]
        raise MigrationError(
            f"{where}: renaming does not make the checkpoint fit the model its config builds "
            f"({len(differences)} differ; first: {'; '.join(differences[:3])}). Nothing was "
            f"changed. Add --rename OLD=NEW for the names that moved; a change of shapes "
            f"cannot be migrated.")
    return {old: new for old, new in mapping.items() if old != new}


# A step's state item is swapped for its renamed copy (STAGED) in two renames: the original
# aside (ASIDE), then the copy into place. A process killed between them leaves the step
# with no state item but both copies whole; ``finish_swaps`` completes the swap.
STAGED, ASIDE = MIGRATION_COPIES


def finish_swaps(workdir: Path, log=print) -> None:
    """Completes (or undoes, when it had not begun) every swap a killed migration left."""
    for step_dir in _step_dirs(workdir):
        state, staged, aside = step_dir / "state", step_dir / STAGED, step_dir / ASIDE
        if not state.exists() and staged.exists():  # killed between the two renames
            staged.rename(state)
            log(f"{step_dir.parent.name}/{step_dir.name}: finished the swap a stopped "
                "migration left")
        if state.exists() and aside.exists():  # killed before the original was deleted
            shutil.rmtree(aside)
        if state.exists() and staged.exists():  # killed before the swap: redone below
            shutil.rmtree(staged)


def swap_in(step_dir: Path) -> None:
    (step_dir / "state").rename(step_dir / ASIDE)
    (step_dir / STAGED).rename(step_dir / "state")
    shutil.rmtree(step_dir / ASIDE)


def _step_dirs(workdir: Path) -> list[Path]:
    return sorted((step for folder in ("checkpoints", "best") if (workdir / folder).is_dir()
                   for step in (workdir / folder).iterdir() if step.name.isdigit()),
                  key=lambda step: (step.parent.name, int(step.name)))


def migrate(workdir, renames=(), dry_run: bool = False, log=print) -> int:
    """Renames the parameters of every checkpoint of ``workdir`` that needs it; returns
    how many checkpoints were rewritten (or would be, with ``dry_run``)."""
    workdir, config, vocabulary = read_run(workdir)
    finish_swaps(workdir, log)
    metadata, encoder_variables = load_encoder(workdir / "encoder")
    abstract = abstract_variables(build_model(config, vocabulary, metadata), config,
                                  encoder_variables)
    written_by = _version(read_run_info(workdir).get("jaxcap_version", "0.1.0"))
    renames = [rename for version, table in sorted(RENAMES.items(), key=lambda v: _version(v[0]))
               if _version(version) > written_by for rename in table] + list(renames)

    plans = {}
    for step_dir in _step_dirs(workdir):
        where = f"{step_dir.parent.name}/{step_dir.name}"
        mapping = {}
        for collection, tree in abstract.items():
            saved = saved_layout(step_dir, collection)
            mapping.update(_plan(saved, param_layout(tree), renames, f"{where} {collection}"))
        if mapping:
            plans[step_dir] = mapping
    if not plans:
        log(f"{workdir}: every checkpoint fits the model its config builds; nothing to do")
        return 0
    for step_dir, mapping in plans.items():
        log(f"{step_dir.parent.name}/{step_dir.name}: " +
            ", ".join(f"{old} -> {new}" for old, new in sorted(mapping.items())))
    if dry_run:
        return len(plans)

    backup = workdir / f"before-migration-{int(time.time())}"
    for step_dir, mapping in plans.items():
        shutil.copytree(step_dir, backup / step_dir.parent.name / step_dir.name)
        with ocp.StandardCheckpointer() as checkpointer:
            saved = checkpointer.restore(step_dir / "state", saved_state_shapes(step_dir))
            checkpointer.save(step_dir / STAGED, rename_saved(saved, mapping), force=True)
        # The step's other items (the loop's progress, the best checkpoint's metrics) are
        # untouched; the state item is swapped for its renamed copy, never deleted first.
        swap_in(step_dir)

    migrations = read_run_info(workdir).get("migrations", []) + [
        {"by": __version__, "at": time.strftime("%Y-%m-%dT%H:%M:%S"), "renames": renames,
         "originals": backup.name}]
    write_run_info(workdir, abstract["params"], migrations=migrations)
    log(f"migrated {len(plans)} checkpoints of {workdir}; the originals are in {backup}")
    return len(plans)


def main(args) -> int:
    """``jaxcap migrate``: see ``jaxcap.cli``."""
    migrate(args.run, [parse_rename(text) for text in args.rename], dry_run=args.dry_run,
            log=lambda message: print(message, file=sys.stderr))
    return 0
