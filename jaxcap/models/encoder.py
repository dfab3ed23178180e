"""Converted encoder weights on disk: an Orbax checkpoint plus metadata.

A weights directory is self-describing::

    WEIGHTS_DIR/
      metadata.json   architecture, depth, variant, preprocessing style, source file and hash,
                      and ``stages`` when it holds only the first residual stages
      variables/      Orbax checkpoint of {'params': ..., 'batch_stats': ...}

so that ``extract`` and training read the preprocessing from the checkpoint and
never from the user's memory. A run's own copy holds only the stages its model
uses (``cut_to_stage``): a captioner cut after stage 2 of a ResNet-18 trains
1.3 million parameters, not the whole network's 11.7.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxcap.errors import UserError
from jaxcap.models import ENCODERS
from jaxcap.models.preprocessing import STYLES

METADATA_FILE = "metadata.json"
VARIABLES_DIR = "variables"
FORMAT_VERSION = 1


class WeightsError(UserError):
    """A weights directory or weights file that cannot be used; the message says why."""


def held_stages(metadata: dict) -> int:
    """How many residual stages the weights hold (all 4 unless cut)."""
    return metadata.get("stages", 4)


def weights_identity(metadata: dict) -> dict:
    """What names the weights, whatever stages a copy holds: a run's cut copy and the
    converted weights it came from compute the same features."""
    return {key: value for key, value in metadata.items() if key != "stages"}


def build_encoder(metadata: dict, stage: int | None = None, grid: int | None = None,
                  dtype: Any = jnp.float32, batchnorm_axis: str | None = None):
    """The Flax module that the metadata describes, cut at ``stage`` (default: the last
    stage the weights hold; ``batchnorm_axis``: see ``ResNet``)."""
    architecture = metadata["architecture"]
    if architecture not in ENCODERS:
        raise WeightsError(f"unknown encoder architecture {architecture!r}; "
                           f"known: {sorted(ENCODERS)}")
    held = held_stages(metadata)
    stage = held if stage is None else stage
    if stage > held:
        raise WeightsError(f"these weights hold stages 1-{held} of the ResNet only (cut for a "
                           f"run's model); stage {stage} needs the converted weights themselves")
    return ENCODERS[architecture](depth=metadata["depth"], variant=metadata["variant"],
                                  stage=stage, grid=grid, dtype=dtype,
                                  batchnorm_axis=batchnorm_axis)


def abstract_variables(metadata: dict) -> dict:
    """Shapes and dtypes of the variables the weights hold, without computing them."""
    module = build_encoder(metadata)
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    return jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x), images)


def cut_to_stage(metadata: dict, variables: dict, stage: int) -> tuple[dict, dict]:
    """``(metadata, variables)`` of the stem and the first ``stage`` stages only: what a
    model cut after ``stage`` reads. The values are the same arrays, not new draws."""
    build_encoder(metadata, stage)  # raises if the weights do not hold ``stage``
    metadata = dict(metadata, stages=stage)
    kept = abstract_variables(metadata)
    return metadata, {collection: {name: variables[collection][name]
                                   for name in kept[collection]} for collection in kept}


def _this_process_checkpointer() -> ocp.StandardCheckpointer:
    """Encoder weights are one process's files: in a multi-process run one process
    writes them (and each reads them) without waiting for the others."""
    me = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}))


def save_encoder(out_dir: str | os.PathLike, variables: dict, metadata: dict) -> Path:
    """Writes ``variables`` and ``metadata`` to ``out_dir`` all at once or not at all."""
    if metadata["preprocessing"] not in STYLES:
        raise ValueError(f"preprocessing must be one of {STYLES}")
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise WeightsError(f"{out_dir} already exists and is not empty; "
                           "choose a new directory (nothing was overwritten)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        checkpointer = _this_process_checkpointer()
        checkpointer.save(staging / VARIABLES_DIR, variables)
        checkpointer.wait_until_finished()
        checkpointer.close()
        record = dict(metadata, format_version=FORMAT_VERSION)
        (staging / METADATA_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def read_metadata(weights_dir: str | os.PathLike) -> dict:
    path = Path(weights_dir) / METADATA_FILE
    try:
        metadata = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path} not found: {weights_dir} is not a directory written by "
                           "'jaxcap convert'") from None
    except json.JSONDecodeError as error:
        raise WeightsError(f"{path} is not valid JSON ({error})") from None
    missing = {"architecture", "depth", "variant", "preprocessing"} - set(metadata)
    if missing:
        raise WeightsError(f"{path} lacks the keys {sorted(missing)}")
    return metadata


def load_encoder(weights_dir: str | os.PathLike) -> tuple[dict, dict]:
    """Returns ``(metadata, variables)`` of a directory written by ``save_encoder``."""
    weights_dir = Path(weights_dir).absolute()
    metadata = read_metadata(weights_dir)
    checkpointer = _this_process_checkpointer()
    variables = checkpointer.restore(weights_dir / VARIABLES_DIR, abstract_variables(metadata))
    checkpointer.close()
    return metadata, variables
