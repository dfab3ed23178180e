"""The variant comparison runner end to end on a tiny budget: two variants, one seed; its
runs keyed on everything that determines them; its statistics on hand-made figures."""

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import TINY_CONFIG

RUNNER = Path(__file__).parents[2] / "experiments" / "compare_variants.py"


def _runner():
    spec = importlib.util.spec_from_file_location("compare_variants", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trains_evaluates_tabulates_plots_and_skips_only_what_is_the_same(tmp_path_factory,
                                                                            capsys):
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
        key = run["key"]
        assert key["config"]["num_epochs"] == 1 and key["config"]["decoder"]["variant"] == \
            run["variant"]
        assert key["dataset"]["name"] == "shapes" and key["dataset"]["splits"]["novel"] == 8
        assert key["jaxcap_version"] and key["search"]["beam_size"] == 2
        assert "data_dir" not in key["config"]["dataset"]  # where data lives changes nothing
        assert run["workdir"] == f"runs/{run['variant']}-seed0-{run['recipe_digest']}"
        assert run["source_trees"] and run["machine"]
    table = (out / "results.md").read_text()
    assert "| none |" in table and "| transformer |" in table and "content acc." in table
    assert "`--config.num_epochs=1`" in table and f"`{runs[0]['recipe_digest']}`" in table
    assert "Machine:" in table and "Total time:" in table and "Source trees:" in table
    for image in ("validation.png", "metrics.png"):
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Rerun: what is finished is skipped, and the results are the same.
    capsys.readouterr()
    assert runner.main(argv) == 0
    log = capsys.readouterr().err
    assert f"{runs[0]['workdir'][5:]}: finished earlier, skipped" in log
    assert "training" not in log
    assert json.loads((out / "results.json").read_text()) == runs

    # A changed setting is a run of its own: never the old figures under the new settings.
    changed = [a for a in argv if a != "transformer"]
    changed[changed.index("--config.num_epochs=1")] = "--config.num_epochs=2"
    assert runner.main(changed) == 0
    log = capsys.readouterr().err
    assert "finished earlier" not in log and "num_epochs: 1 -> 2" in log
    rerun = json.loads((out / "results.json").read_text())
    assert len(rerun) == 1 and rerun[0]["key"]["config"]["num_epochs"] == 2
    assert len(rerun[0]["validation_bleu4"]) == 2
    assert rerun[0]["recipe_digest"] != runs[0]["recipe_digest"]
    assert (out / runs[0]["workdir"] / "compare.json").exists()  # the old run is kept


def test_intervals_and_the_differences_that_exceed_the_seed_spread():
    runner = _runner()
    mean, half = runner.interval([0.5, 0.6, 0.7])
    # t(0.975, 2) = 4.303; standard deviation 0.1 over 3 seeds
    assert mean == pytest.approx(0.6) and half == pytest.approx(4.303 * 0.1 / 3 ** 0.5, rel=1e-3)
    assert runner.interval([0.4]) == (0.4, 0.0)

    def runs(variant, values):
        return [{"variant": variant, "test": {"bleu4": v}} for v in values]

    figures = (runs("a", [0.90, 0.91, 0.92]) + runs("b", [0.50, 0.51, 0.52]) +
               runs("c", [0.905, 0.915, 0.925]))
    pairs = {(p["a"], p["b"]): p for p in
             runner.significant_differences(figures, ["a", "b", "c"], "bleu4")}
    assert pairs[("a", "b")]["p_holm"] < 0.05 and pairs[("b", "c")]["p_holm"] < 0.05
    assert pairs[("a", "c")]["p_holm"] > 0.05
    assert pairs[("a", "b")]["difference"] == pytest.approx(0.4)
    # Holm: the smallest p times the number of pairs, each next one at least the last
    ranked = sorted(pairs.values(), key=lambda p: p["p"])
    assert ranked[0]["p_holm"] == pytest.approx(min(1, 3 * ranked[0]["p"]))
    assert [p["p_holm"] for p in ranked] == sorted(p["p_holm"] for p in ranked)
