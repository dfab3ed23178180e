"""What happens at the end of an epoch: validation (the loss on all devices, greedy captions
scored by BLEU and CIDEr-D, and the objects they name on grounded data), the best checkpoint,
the learning-rate cut on a plateau, early stopping, and the epoch's checkpoint."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxcap import distributed
from jaxcap.checkpoints import Checkpoints
from jaxcap.data.pipeline import Batcher, SplitIndex, model_inputs
from jaxcap.decode import CaptionSearch, SearchOptions
from jaxcap.metrics import caption_metrics, object_metrics
from jaxcap.runs import selection_metric
from jaxcap.train.state import TrainState
from jaxcap.train.steps import shard, unreplicate


@dataclasses.dataclass
class Progress:
    """Host-side loop state saved with each checkpoint."""

    evaluated_epochs: int = 0
    best_score: float = -1.0  # of the selection metric
    epochs_since_best: int = 0
    epochs_since_cut: int = 0
    stopped_early: bool = False

    @classmethod
    def from_saved(cls, saved: dict) -> "Progress":
        saved = dict(saved)
        if "best_bleu4" in saved:  # as runs before the selection metric saved it
            saved["best_score"] = saved.pop("best_bleu4")
        return cls(**saved)

    def after_validation(self, epoch: int, score: float, lr_scale: float, config, log) -> float:
        """Takes epoch ``epoch``'s validation score (``selection_metric``); returns the
        learning-rate scale from now on.

        After ``plateau_patience`` epochs without a better score the scale is multiplied
        by ``plateau_factor`` (and again after as many more); after
        ``early_stopping_patience`` such epochs (0: never) ``stopped_early`` is set.
        """
        name = selection_metric(config)[1]
        self.evaluated_epochs = epoch + 1
        if score > self.best_score:
            self.best_score = score
            self.epochs_since_best = self.epochs_since_cut = 0
        else:
            self.epochs_since_best += 1
            self.epochs_since_cut += 1
            if self.epochs_since_cut >= config.plateau_patience:
                lr_scale *= config.plateau_factor
                self.epochs_since_cut = 0
                log(f"val {name} plateau: learning rate scaled to {lr_scale:g} of the schedule")
        if config.early_stopping_patience and \
                self.epochs_since_best >= config.early_stopping_patience:
            self.stopped_early = True
            log(f"stopping early: no better val {name} for {self.epochs_since_best} epochs")
        return lr_scale


def evaluate_split(replicated, state: TrainState, model, batcher: Batcher, index: SplitIndex,
                   vocabulary, config, p_eval) -> dict:
    """Validation loss (teacher forcing, on all devices), greedy BLEU-1..4 and CIDEr-D over a
    split.

    Each process decodes its share; the captions of all processes are gathered and
    scored on each, so all of them take the same decisions from the result."""
    devices = jax.local_device_count()
    sums = None
    images, captions = [], []
    search = CaptionSearch(model, {"params": state.params, "batch_stats": state.batch_stats},
                           vocabulary, SearchOptions(max_length=config.eval.max_length),
                           max_batch=config.eval.batch_size)
    for batch in batcher.epoch(0):
        out = unreplicate(p_eval(replicated, shard(batch, devices)))
        sums = out if sums is None else jax.tree.map(np.add, sums, out)
        captions.append(search(model_inputs(batch)).tokens)
        images.append(np.where(batch["weights"] > 0, batch["image_index"], -1))
    images = distributed.allgather(np.concatenate(images)).reshape(-1)
    captions = distributed.allgather(np.concatenate(captions))
    hypotheses = {int(image): vocabulary.decode(tokens) for image, tokens
                  in zip(images, captions.reshape(len(images), -1)) if image >= 0}
    references = {i: index.captions[i] for i in hypotheses}
    # The Python tokenizer: BLEU as pycocoevalcap's scorer computes it, without starting Java.
    scores = caption_metrics(references, hypotheses, metrics=("bleu", "cider"), tokenizer="python")
    if any(index.objects):  # a grounded dataset: which objects the captions name, right or not
        scores.update(object_metrics(
            list(hypotheses.values()),
            [[(o["colour"], o["shape"]) for o in index.objects[i]] for i in hypotheses]))
    loss = sum(float(value) / max(float(sums["counts"][per]), 1.0)
               for per, terms in sums["terms"].items() for value in terms.values())
    return {"val_loss": loss, **scores, "examples": dict(list(hypotheses.items())[:3])}


def end_of_epoch(step, epoch, model, val_batches, val_index, vocabulary, config, p_eval,
                  progress: Progress, checkpoints: Checkpoints, metrics_log, replicated,
                  state: TrainState, log) -> tuple[dict, float]:
    """Validation, the best checkpoint, plateau cut and early stop, the epoch's checkpoint.

    Returns the validation record and the learning-rate scale from now on.
    """
    metrics = evaluate_split(replicated, state, model, val_batches, val_index, vocabulary, config,
                             p_eval)
    examples = metrics.pop("examples")
    metric = selection_metric(config)[0]
    lr_scale = progress.after_validation(epoch, metrics[metric], float(state.lr_scale),
                                         config, log)
    state = state.replace(lr_scale=np.asarray(lr_scale, np.float32))
    if progress.epochs_since_best == 0:
        checkpoints.save_best(state, dataclasses.asdict(progress), metrics[metric])
    record = {"step": step, "epoch": epoch + 1, **metrics, f"best_{metric}": progress.best_score,
              "lr_scale": lr_scale}
    metrics_log.write(record)
    log(f"epoch {epoch + 1}: val loss {metrics['val_loss']:.4f}, BLEU-4 {metrics['bleu4']:.4f}, "
        f"CIDEr-D {metrics['cider']:.4f}; e.g. {next(iter(examples.values()), '')!r}")
    checkpoints.save(state, dataclasses.asdict(progress))
    return record, lr_scale
