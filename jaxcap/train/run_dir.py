"""The run directory as training starts or resumes it.

A new run writes ``config.json`` once it has started; a resumed one must have
the model config it was started with (``check_config``: the settings that
differ are named), and may not move the SCST stage boundary once it has a
checkpoint. An SCST run (``objective=scst``) takes the model settings, the
vocabulary and the encoder of the run it continues (``start_from_run``). The
encoder's weights, converted or drawn at random, are written once
(``prepare_encoder``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ml_collections

from jaxcap import scst
from jaxcap.convert import init_weights
from jaxcap.files import write_text_atomic
from jaxcap.models.encoder import cut_to_stage, load_encoder, save_encoder
from jaxcap.runs import AS_BEFORE, assign, lookup, read_saved_config, settings_as_started
from jaxcap.train.settings import TrainingError

# Config sections that define the model and its data: a resumed run must not change them.
MODEL_KEYS = ("decoder", "encoder.weights", "encoder.init_depth", "encoder.init_variant",
              "encoder.stage", "encoder.grid", "encoder.image_size", "encoder.resize",
              "encoder.mode", "encoder.finetune", "encoder.batchnorm", "text", "glove",
              "dataset.name", "dataset.shapes", "seed")
# What a run continued by SCST (objective=scst) takes from the run it starts from.
INHERITED_KEYS = tuple(key for key in MODEL_KEYS if key != "seed")
# Settings that shaped a run's history: they may change until its first checkpoint, not after.
# The SCST stage boundary decides which validation score picks and compares the best
# checkpoints (BLEU-4 without SCST, CIDEr-D with it) and where the learning rate switches.
HISTORY_KEYS = ("scst.from_epoch",)


def as_started(config: ml_collections.ConfigDict, workdir: Path, log) -> None:
    """The ``AS_BEFORE`` settings a resumed run's config.json predates, set as it trained."""
    path = workdir / "config.json"
    if path.exists():
        for key, value in settings_as_started(json.loads(path.read_text())).items():
            log(f"{key}: {value!r}, as the run was started (its config.json predates the "
                f"setting)")
            assign(config, key, value)


def _leaves(value, key: str):
    """``(dotted key, value)`` of every setting in ``value`` (a section or one setting)."""
    if not isinstance(value, dict):
        yield key, value
        return
    for name, item in value.items():
        yield from _leaves(item, f"{key}.{name}")


def _known_to(saved, current):
    """``current`` cut to the keys ``saved`` has: a setting added to jaxcap after a run
    was started takes its default there, so it does not stop that run from resuming."""
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return current
    return {key: _known_to(saved[key], value) for key, value in current.items() if key in saved}


def _has_checkpoint(workdir: Path) -> bool:
    return any(path.name.isdigit() for folder in ("checkpoints", "best")
               if (workdir / folder).is_dir() for path in (workdir / folder).iterdir())


def check_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """A run resumes only with the model config it was started with."""
    path = workdir / "config.json"
    if not path.exists():
        return
    current = json.loads(config.to_json_best_effort())
    saved = json.loads(path.read_text())
    objective = saved.get("objective", "cross_entropy")
    if objective != config.objective:
        raise TrainingError(f"{workdir} holds a run trained with objective={objective}; "
                            f"objective={config.objective} needs a new --workdir")
    known = _known_to(saved, current)
    changed = []
    for key in MODEL_KEYS:  # setting by setting, so that a section names what changed
        before = dict(_leaves(lookup(saved, key), key))
        now = dict(_leaves(lookup(known, key), key))
        changed += [(k, before.get(k), now.get(k)) for k in sorted(before.keys() | now.keys())
                    if before.get(k) != now.get(k)]
    trained = _has_checkpoint(workdir)
    if changed:
        details = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changed)
        advice = ("Use a new --workdir, or the original values, to resume." if trained else
                  "It has no checkpoint yet: use a new --workdir, or delete this one to "
                  "start it again with this config.")
        raise TrainingError(f"{workdir} holds a run with another model config ({details}). "
                            + advice)
    for key in HISTORY_KEYS if trained else ():
        before = lookup(saved, key)
        before = AS_BEFORE.get(key) if before is None else before
        if before != lookup(current, key):
            raise TrainingError(
                f"{workdir} was trained with {key}={before!r}, not {lookup(current, key)!r}: "
                f"the SCST stage boundary decides which validation score picks its best "
                f"checkpoint and where the learning rate switches, so it cannot change once "
                f"the run has a checkpoint. Resume with --config.{key}={before}, or train "
                f"into a new --workdir.")


def write_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """``config.json``, written once the run has started (or resumed) with ``config``."""
    current = json.loads(config.to_json_best_effort())
    write_text_atomic(workdir / "config.json", json.dumps(current, indent=2, sort_keys=True) + "\n")


def start_from_run(config: ml_collections.ConfigDict, workdir: Path, log) -> Path:
    """SCST: the run in ``init_from`` checked, its model settings taken, its vocabulary and
    encoder copied into ``workdir``; returns its directory."""
    try:
        run = scst.check_init_run(config.init_from, workdir)
    except scst.InitError as error:
        raise TrainingError(str(error)) from None
    saved = read_saved_config(run)
    given = json.loads(config.to_json_best_effort())
    for key in INHERITED_KEYS:
        value = lookup(saved, key)
        if value is None:
            continue
        if lookup(given, key) != value:
            log(f"{key}: as in {run} (the run SCST starts from)")
        value = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
        with config.ignore_type():
            assign(config, key, value)
    scst.copy_run_files(run, workdir)
    return run


def prepare_encoder(config, workdir: Path) -> Path:
    """``workdir/encoder``: the converted weights, or random ones, of the stem and the
    stages the model uses (``encoder.stage``): the stages after it would only be
    carried through every optimizer step and checkpoint. (A run written before keeps
    its whole network.)"""
    target = workdir / "encoder"
    if target.exists():
        return target
    if config.encoder.weights:
        metadata, variables = cut_to_stage(
            *load_encoder(Path(config.encoder.weights).expanduser()), config.encoder.stage)
        save_encoder(target, variables, metadata)
    else:
        init_weights(target, config.encoder.init_depth, config.encoder.init_variant,
                     seed=config.seed, log=lambda m: print(m, file=sys.stderr),
                     stages=config.encoder.stage)
    return target
