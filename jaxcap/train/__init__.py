"""Training: ``train_and_evaluate(config, workdir)`` and the ``jaxcap train`` command.

One module per concern, in the order a run meets them:

* ``settings``: every setting checked before anything is written;
* ``run_dir``: the run directory started or resumed (its saved config compared,
  an SCST run's start from another run, the encoder's weights written);
* ``state``: the train state, the schedule, Adam, a run's initial state;
* ``steps``: the jitted steps on every device (the loss terms, the train and
  evaluation steps) and the moves of state and batches to and from the devices;
* ``validation``: the end of an epoch (validation, best checkpoint, plateau cut,
  early stopping);
* ``metrics_log``: ``metrics.jsonl`` and TensorBoard;
* ``loop``: the loop itself.

Nothing that reads a run after training imports this package (``jaxcap.runs``).
"""

from jaxcap.train.loop import main, train_and_evaluate
from jaxcap.train.settings import TrainingError

__all__ = ["TrainingError", "main", "train_and_evaluate"]
