"""The variant comparison runner end to end on a tiny budget: two variants, one seed."""

import importlib.util
import json
from pathlib import Path

from tests.conftest import TINY_CONFIG

RUNNER = Path(__file__).parents[2] / "experiments" / "compare_variants.py"


def _runner():
    spec = importlib.util.spec_from_file_location("compare_variants", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trains_evaluates_tabulates_plots_and_skips_what_is_finished(tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("compare")
    data_dir = tmp_path_factory.getbasetemp() / "tiny_datasets"
    argv = ["--config", TINY_CONFIG, "--variants", "none", "transformer", "--seeds", "1",
            "--out", str(out), "--beam", "2", "--no-meteor",
            f"--config.dataset.data_dir={data_dir}", "--config.dataset.shapes.num_novel=8",
            "--config.num_epochs=1"]
    runner = _runner()
    assert runner.main(argv) == 0
    runs = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["seed"]) for r in runs] == [("none", 0), ("transformer", 0)]
    for run in runs:
        assert len(run["validation_bleu4"]) == 1 and run["parameters"] > 0
        assert 0 <= run["test"]["bleu4"] <= 1 and "content_accuracy" in run["novel"]
        assert "meteor" not in run["test"] and run["train_captions_per_s"] > 0
    table = (out / "results.md").read_text()
    assert "| none |" in table and "| transformer |" in table and "content acc." in table
    assert "`--config.num_epochs=1`" in table
    for image in ("validation.png", "metrics.png"):
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Rerun: what is finished is skipped, and the results are the same.
    capsys.readouterr()
    assert runner.main(argv) == 0
    log = capsys.readouterr().err
    assert "none-seed0: finished earlier, skipped" in log
    assert "transformer-seed0: finished earlier, skipped" in log and "training" not in log
    assert json.loads((out / "results.json").read_text()) == runs
