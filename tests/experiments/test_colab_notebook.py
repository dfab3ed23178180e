"""experiments/colab_tpu.ipynb runs, every cell, on a CPU standing in for an 8-core TPU."""

import base64
import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from tests.xla_flags import with_devices

nbformat = pytest.importorskip("nbformat", reason="nbformat reads the notebook (pip install "
                               "'.[test]')")
nbclient = pytest.importorskip("nbclient", reason="nbclient executes the notebook (pip install "
                               "'.[test]')")
pytest.importorskip("ipykernel", reason="the notebook runs in an IPython kernel")

ROOT = Path(__file__).parents[2]
NOTEBOOK = ROOT / "experiments" / "colab_tpu.ipynb"


def test_the_colab_notebook_runs_every_cell_on_a_cpu(tmp_path, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    (parameters,) = [i for i, cell in enumerate(notebook.cells)
                     if "parameters" in cell.metadata.get("tags", [])]
    # As papermill does: a cell after the parameters replaces them.
    notebook.cells.insert(parameters + 1, nbformat.v4.new_code_cell(
        f"SMOKE_TEST = True\nACCELERATOR = 'cpu'\nWORK = {str(tmp_path / 'work')!r}"))
    # The kernel inherits the environment: 8 CPU devices stand in for the TPU's cores.
    monkeypatch.setenv("XLA_FLAGS", with_devices(os.environ["XLA_FLAGS"], 8))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # The kernel starts in tmp_path: without the checkout on its path it would import
    # whichever jaxcap is installed, and where none is, the install cell would reach
    # for the network.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

    def text(cell):
        return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")

    def images(cell):
        return [Image.open(io.BytesIO(base64.b64decode(o.data["image/png"])))
                for o in cell.outputs if "image/png" in o.get("data", {})]

    cells = {cell.source.split("\n")[0]: cell for cell in notebook.cells
             if cell.cell_type == "code"}
    assert "8 cpu devices in 1 process(es)" in text(cells["import jax"])
    run = tmp_path / "work" / "runs" / "tiny"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in records) and records[-1]["split"] == "test"
    (training,) = [c for c in notebook.cells if "train_and_evaluate" in c.source]
    assert len(images(training)) == 1  # the loss curve
    (evaluation,) = [c for c in notebook.cells if "evaluate_run" in c.source]
    assert "BLEU-4" in text(evaluation) and "CIDEr-D" in text(evaluation)
    (captioning,) = [c for c in notebook.cells if "attention_figure(" in c.source]
    figures = images(captioning)
    assert len(figures) == 4 and text(captioning).count("log-prob") == 4
    assert all(f.width >= 2 * 224 for f in figures)  # the image and at least one word's panel
