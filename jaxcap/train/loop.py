"""The training loop: ``train_and_evaluate(config, workdir)`` and the ``jaxcap train`` command.

1. The settings are checked (``settings``); the run directory gets everything
   needed to caption with it later (``run_dir``: ``config.json``, the encoder;
   the vocabulary is built from the training captions), the dataset is built
   (TFDS) and, in ``features`` mode, its images go through ``jaxcap extract`` once.
2. ``jax.pmap`` runs the train step on every local device (``steps``); SCST's
   objective replaces the cross-entropy from ``scst.from_epoch`` on.
3. Orbax checkpoints every ``checkpoint_every_steps`` and at each epoch end, and
   the best by the validation score in ``best/`` (``jaxcap.checkpoints``). A
   restarted run restores the latest readable checkpoint and continues with the
   same data order and RNG, so its losses equal those of a run that never stopped.
4. Each epoch ends with validation, the plateau cut and early stopping
   (``validation``); the run ends with the test split on its best checkpoint.
5. A NaN or Inf loss stops the run with a message; the bad update is never
   applied, so no checkpoint of a bad state can be written.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from tqdm import tqdm

from jaxcap import configs, distributed, scst
from jaxcap.checkpoints import Checkpoints, write_run_info
from jaxcap.data import glove
from jaxcap.data.pipeline import Batcher, SplitIndex
from jaxcap.data.prepare import pipeline_options, prepare_dataset, prepare_features
from jaxcap.data.text import Vocabulary
from jaxcap.models.captioner import build_captioner
from jaxcap.models.encoder import load_encoder
from jaxcap.runs import first_scst_epoch, selection_metric
from jaxcap.train import run_dir
from jaxcap.train.metrics_log import MetricsLog
from jaxcap.train.settings import TrainingError, check_batch_sizes, check_settings
from jaxcap.train.state import (init_state, initial_scst_state, learning_rate_schedule,
                                make_optimizer)
from jaxcap.train.steps import eval_step, replicate, shard, train_step, unreplicate
from jaxcap.train.validation import Progress, end_of_epoch, evaluate_split


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Trains (or resumes) the run in ``workdir``; returns the last validation metrics (or
    the test split's, once the run has ended)."""
    workdir = Path(workdir).expanduser().absolute()
    log = functools.partial(print, file=sys.stderr) if distributed.is_primary() else \
        lambda *_: None
    check_settings(config)
    check_batch_sizes(config)
    run_dir.as_started(config, workdir, log)  # before anything reads the settings it restores
    objective = scst_objective(config)
    prepared = distributed.primary_first("prepared", functools.partial(
        prepare_run, config, workdir, log))
    trainer = Trainer(config, workdir, prepared, objective, log)
    try:
        trainer.restore()
        last = trainer.train()
        return trainer.test() or last
    finally:
        trainer.close()


def scst_objective(config) -> scst.Objective | None:
    """SCST's objective where the run trains by it at all."""
    if first_scst_epoch(config) is None:
        return None
    try:
        return scst.Objective.from_config(config)
    except ValueError as error:
        raise TrainingError(f"{error} (in the config's scst section)") from None


@dataclasses.dataclass
class PreparedRun:
    """What a run reads, built where absent (idempotent and deterministic)."""

    built: object  # the TFDS builder
    train_index: SplitIndex
    vocabulary: Vocabulary
    encoder_dir: Path
    train_features: object | None  # FeatureStore in features mode
    val_features: object | None


def prepare_run(config, workdir: Path, log) -> PreparedRun:
    workdir.mkdir(parents=True, exist_ok=True)
    if config.objective == "scst":
        run_dir.start_from_run(config, workdir, log)
    run_dir.check_config(config, workdir)
    if not (workdir / "config.json").exists():  # a new run: what it builds is known now
        run_dir.write_config(config, workdir)
    built = prepare_dataset(config)
    train_index = SplitIndex(built.as_data_source("train"))
    vocabulary_path = workdir / "vocabulary.json"
    if vocabulary_path.exists():
        vocabulary = Vocabulary.load(vocabulary_path)
    else:
        vocabulary = Vocabulary.build((c for caps in train_index.captions for c in caps),
                                      config.text.min_count)
        vocabulary.save(vocabulary_path)
    encoder_dir = run_dir.prepare_encoder(config, workdir)
    features = ((prepare_features(config, built, encoder_dir, "train"),
                 prepare_features(config, built, encoder_dir, "val"))
                if config.encoder.mode == "features" else (None, None))
    return PreparedRun(built, train_index, vocabulary, encoder_dir, *features)


class Trainer:
    """One run's training: its model and batches, the steps, the state on the devices, the
    checkpoints and the log."""

    def __init__(self, config, workdir: Path, prepared: PreparedRun, objective, log):
        self.config, self.workdir, self.prepared, self.log = config, workdir, prepared, log
        vocabulary = prepared.vocabulary
        self.sources = prepared.built.as_data_source()
        embedding, coverage = glove.embedding_matrix(vocabulary, glove.load(config.glove.source),
                                                     seed=config.seed)
        log(f"vocabulary: {len(vocabulary)} tokens; {coverage.report()}")
        metadata, encoder_variables = load_encoder(prepared.encoder_dir)
        try:
            self.model = build_captioner(config, len(vocabulary), metadata)
        except ValueError as error:
            raise TrainingError(str(error)) from None
        options, self.eval_options = pipeline_options(config)
        self.train_batches = Batcher(self.sources["train"], vocabulary, options,
                                     prepared.train_features, prepared.train_index)
        self.val_batches = Batcher(self.sources["val"], vocabulary, self.eval_options,
                                   prepared.val_features)
        self.steps_per_epoch = self.train_batches.num_batches()
        if self.steps_per_epoch == 0:
            raise TrainingError(f"the training split has fewer examples than one batch "
                                f"({config.batch_size})")
        self.total_steps = (config.num_train_steps if config.num_train_steps > 0
                            else config.num_epochs * self.steps_per_epoch)
        self.schedule = learning_rate_schedule(config, self.total_steps, self.steps_per_epoch)
        self.tx = make_optimizer(config, self.schedule)
        inputs_shape = (prepared.train_features.shape if prepared.train_features is not None
                        else (config.encoder.image_size, config.encoder.image_size, 3))
        self.state = init_state(self.model, config, inputs_shape, embedding,
                                encoder_variables if self.model.encoder is not None else None,
                                self.tx)
        self.scst_from, self.objective = first_scst_epoch(config), objective
        self.references = None if objective is None else replicate(
            scst.training_references(prepared.train_index.captions, vocabulary))
        self.checkpoints = Checkpoints(workdir, config.keep_checkpoints,
                                       selection_metric(config)[0])
        self.progress, self.metrics_log, self.bar = Progress(), None, None
        self.last_val: dict = {}

    # ------------------------------------------------------------------ start

    def restore(self) -> None:
        """The latest checkpoint (or, for a new SCST run, its init run's best), the config
        and run_info written, the log opened, the steps compiled and the state replicated."""
        config, state = self.config, self.state
        restored = self.checkpoints.restore_latest(
            jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
        if restored is not None:
            state, saved_progress = restored
            self.progress = Progress.from_saved(saved_progress)
            self.log(f"resumed from step {int(state.step)} in {self.workdir}")
        elif config.objective == "scst":
            state = initial_scst_state(state, Path(config.init_from).expanduser().absolute(),
                                       self.tx, config.keep_checkpoints, self.log)
        self.step = int(state.step)
        if distributed.is_primary():
            run_dir.write_config(config, self.workdir)
            write_run_info(self.workdir, state.params)
        self.metrics_log = MetricsLog(self.workdir, self.step, self.progress.evaluated_epochs)
        self.p_cross_entropy = self._pmapped(None) if self.scst_from != 0 else None
        self.p_scst = self._pmapped(self.objective) if self.objective is not None else None
        self.p_eval = jax.pmap(functools.partial(eval_step, model=self.model),
                               axis_name="batch")
        self.base_rng = replicate(jax.random.PRNGKey(config.seed + 1))
        self.replicated = replicate(state)
        self.state = None

    def _pmapped(self, objective):
        return jax.pmap(functools.partial(train_step, model=self.model, tx=self.tx,
                                          label_smoothing=self.config.decoder.label_smoothing,
                                          objective=objective),
                        axis_name="batch", donate_argnums=(0,))

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        """Epochs until the last step or an early stop; the last validation record."""
        self.bar = tqdm(total=self.total_steps, initial=self.step, unit="step", file=sys.stderr,
                        desc="train", disable=not distributed.is_primary())
        self._new_interval()
        while self.step < self.total_steps and not self.progress.stopped_early:
            epoch, first = divmod(self.step, self.steps_per_epoch)
            self._epoch(epoch, first)
            if self.step % self.steps_per_epoch == 0 or self.step == self.total_steps:
                self._check_finite()
                self.last_val, lr_scale = end_of_epoch(
                    self.step, epoch, self.model, self.val_batches, self.val_batches.index,
                    self.prepared.vocabulary, self.config, self.p_eval, self.progress,
                    self.checkpoints, self.metrics_log, self.replicated, self._host_state(),
                    self.log)
                self.replicated = self.replicated.replace(
                    lr_scale=jnp.full_like(self.replicated.lr_scale, lr_scale))
        return self.last_val

    def _epoch(self, epoch: int, first: int) -> None:
        """The steps of ``epoch`` from its batch ``first`` on: logged every
        ``log_every_steps``, a checkpoint every ``checkpoint_every_steps``."""
        config, devices = self.config, jax.local_device_count()
        by_scst = self.scst_from is not None and epoch >= self.scst_from
        p_train = self.p_scst if by_scst else self.p_cross_entropy
        switches_next = self.scst_from is not None and epoch + 1 == self.scst_from
        for batch in self.train_batches.epoch(epoch, first):
            self.replicated, metrics = p_train(self.replicated, shard(batch, devices),
                                               self.base_rng, self.references)
            self.step += 1
            # Summed on the devices (every one holds the same values): no wait here.
            sums = self.interval["sums"]
            self.interval["sums"] = metrics if sums is None else jax.tree.map(jnp.add, sums,
                                                                              metrics)
            self.interval["count"] += 1
            self.bar.update(1)
            at_epoch_end = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
            # The objective's metrics differ: an interval ends where it changes.
            if self.step % config.log_every_steps == 0 or self.step == self.total_steps or (
                    at_epoch_end and switches_next):
                self._log_interval(epoch, "reward" if by_scst else "loss")
            if self.step % config.checkpoint_every_steps == 0 and not at_epoch_end:
                self._check_finite()
                self.checkpoints.save(self._host_state(), dataclasses.asdict(self.progress))
            if at_epoch_end:
                break

    def _new_interval(self) -> None:
        self.interval = {"sums": None, "count": 0, "start": time.perf_counter()}

    def _log_interval(self, epoch: int, shown: str) -> None:
        self._check_finite()
        step, interval = self.step, self.interval
        elapsed = time.perf_counter() - interval["start"]
        record = {"step": step, "epoch": epoch,
                  **{k: float(v) / interval["count"]
                     for k, v in unreplicate(interval["sums"]).items()},
                  "learning_rate": float(self.schedule(step - 1)) *
                  float(unreplicate(self.replicated.lr_scale)),
                  "captions_per_s": interval["count"] * self.config.batch_size / elapsed}
        self.metrics_log.write(record)
        self.bar.set_postfix({shown: f"{record[shown]:.3f}",
                              "captions_per_s": f"{record['captions_per_s']:.0f}"})
        self._new_interval()

    def _host_state(self):
        return unreplicate(self.replicated)

    def _check_finite(self) -> None:
        if bool(unreplicate(self.replicated.nonfinite)):
            raise TrainingError(
                f"the loss became NaN or Inf before step {self.step}; that update was not "
                f"applied and no checkpoint of it was written. Lower learning_rate or check the "
                f"data; rerunning resumes from the last checkpoint in "
                f"{self.workdir}/checkpoints.")

    # ------------------------------------------------------------------ the end

    def test(self) -> dict:
        """The test split scored on the best checkpoint, logged; {} without a test split."""
        if "test" not in self.sources or not len(self.sources["test"]):
            return {}
        config, prepared = self.config, self.prepared
        best = self.checkpoints.restore_best(jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                          self._host_state()))
        test_features = (distributed.primary_first("test features", functools.partial(
            prepare_features, config, prepared.built, prepared.encoder_dir, "test"))
            if config.encoder.mode == "features" else None)
        batches = Batcher(self.sources["test"], prepared.vocabulary, self.eval_options,
                          test_features)
        metrics = evaluate_split(replicate(best), best, self.model, batches, batches.index,
                                 prepared.vocabulary, config, self.p_eval)
        metrics.pop("examples")
        record = {"step": int(best.step), "split": "test",
                  **{f"test_{k}": v for k, v in metrics.items()}}
        self.metrics_log.write(record)
        self.log(f"test split, best checkpoint (step {int(best.step)}): "
                 f"BLEU-4 {metrics['bleu4']:.4f}")
        return record

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.checkpoints.close()
        if self.metrics_log is not None:
            self.metrics_log.close()


def main(args) -> int:
    """``jaxcap train``: see ``jaxcap.cli``."""
    if args.distributed:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.coordinator or args.num_processes or args.process_id is not None:
        raise TrainingError("--coordinator, --num-processes and --process-id need --distributed")
    config = configs.override(configs.load(args.config), args.overrides)
    metrics = train_and_evaluate(config, args.workdir)
    if metrics:
        print(json.dumps({k: v for k, v in metrics.items() if k != "examples"}))
    return 0
