"""A run's log: ``metrics.jsonl`` (one JSON object a line: training intervals, validations,
the final test score) and TensorBoard events when tensorboardX is installed. A resumed run
moves the lines logged after the checkpoint it resumes from aside, never deleting them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jaxcap import distributed
from jaxcap.files import write_text_atomic


def _tensorboardx_writer():
    """tensorboardX's ``SummaryWriter``, or None when it is not installed.

    tensorboardX imports PyTorch whenever that is installed, only to accept its tensors:
    2.2 s of every run's start. jaxcap logs floats, so PyTorch is kept out while
    tensorboardX loads (a ``None`` module makes its ``import torch`` fail)."""
    keep_out = "torch" not in sys.modules
    if keep_out:
        sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    finally:
        if keep_out:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsLog:
    """``metrics.jsonl`` (and TensorBoard events when tensorboardX is installed)."""

    def __init__(self, workdir: Path, resume_step: int, evaluated_epochs: int):
        self.path = workdir / "metrics.jsonl"
        self.writes = distributed.is_primary()  # one log for all processes
        self.writer = None
        if not self.writes:
            return
        if self.path.exists():
            # What a stopped run logged after the checkpoint it resumes from is logged again;
            # those lines move to metrics.jsonl.before-resume-STEP, never deleted.
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            keep = [self._keep(json.loads(line), resume_step, evaluated_epochs)
                    for line in lines]
            if not all(keep):
                with open(workdir / f"metrics.jsonl.before-resume-{resume_step}", "a") as out:
                    out.writelines(line + "\n" for line, k in zip(lines, keep) if not k)
                kept = [line for line, k in zip(lines, keep) if k]
                write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        summary_writer = _tensorboardx_writer()
        if summary_writer is not None:
            self.writer = summary_writer(str(workdir / "tensorboard"), purge_step=resume_step + 1)

    @staticmethod
    def _keep(record, step, epochs) -> bool:
        if "split" in record:  # a final test evaluation: redone when the run ends again
            return False
        return record.get("epoch", 0) <= epochs if "val_loss" in record else record["step"] <= step

    def write(self, record: dict) -> None:
        if not self.writes:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            prefix = record.get("split", "val" if "val_loss" in record else "train") + "/"
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(prefix + key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
