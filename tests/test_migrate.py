"""jaxcap migrate: a run whose parameters were renamed is carried over and resumes exactly."""

import json
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from jaxcap import cli, migrate
from jaxcap.checkpoints import CheckpointError, Checkpoints, saved_layout
from jaxcap.migrate import parse_rename, rename_saved, saved_state_shapes
from jaxcap.models.encoder import load_encoder
from jaxcap.runs import build_model, load_run, read_run
from jaxcap.train.state import init_state, learning_rate_schedule, make_optimizer

TINY_CONFIG = "tiny"  # jaxcap/configs/tiny.py

# What an older release might have called two of today's modules.
OLD_NAMES = {"decoder/h_projection/": "decoder/hidden_projection/",
             "decoder/attention/encoder/": "decoder/attention/regions/"}
RENAMES = [f"--rename=^{old}={new}" for new, old in OLD_NAMES.items()]  # back to today's


def _train_state_shapes(workdir):
    """The train state a run's checkpoints hold, as shapes (as the trainer builds it)."""
    workdir, config, vocabulary = read_run(workdir)
    metadata, encoder_variables = load_encoder(workdir / "encoder")
    model = build_model(config, vocabulary, metadata)
    tx = make_optimizer(config, learning_rate_schedule(config, 1))
    embedding = np.zeros((len(vocabulary), config.decoder.embed_dim), np.float32)
    side = config.encoder.image_size  # the tiny run trains end to end, on images
    return config, jax.eval_shape(lambda: init_state(model, config, (side, side, 3), embedding,
                                                     encoder_variables, tx))


def _as_older_release_wrote_it(workdir):
    """Rewrites every checkpoint of ``workdir`` under OLD_NAMES (parameters, Adam's moments)."""
    step_dirs = [p for folder in ("checkpoints", "best") for p in (workdir / folder).iterdir()
                 if p.name.isdigit()]
    paths = traverse_util.flatten_dict(saved_state_shapes(step_dirs[0])["params"], sep="/")
    mapping = {path: path.replace(new, old, 1) for path in paths
               for new, old in OLD_NAMES.items() if path.startswith(new)}
    for step_dir in step_dirs:
        with ocp.StandardCheckpointer() as checkpointer:
            state = checkpointer.restore(step_dir / "state", saved_state_shapes(step_dir))
            shutil.rmtree(step_dir / "state")
            checkpointer.save(step_dir / "state", rename_saved(state, mapping))
    return sorted(mapping.values())


def _snapshot(workdir):
    return {p.relative_to(workdir): p.read_bytes() for p in workdir.rglob("*") if p.is_file()}


def _losses(workdir):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def test_a_renamed_run_is_refused_then_migrated_and_resumes_exactly(tmp_path, tmp_path_factory,
                                                                    trained_run, capsys):
    original = tmp_path / "original"
    shutil.copytree(trained_run, original)
    renamed = tmp_path / "renamed"
    shutil.copytree(trained_run, renamed)
    old_paths = _as_older_release_wrote_it(renamed)
    assert "decoder/hidden_projection/kernel" in old_paths
    assert "decoder/hidden_projection/kernel" in saved_layout(next(
        p for p in (renamed / "best").iterdir() if p.name.isdigit()))
    data_dir = tmp_path_factory.getbasetemp() / "tiny_datasets"  # where conftest trained it
    resume = ["--config", TINY_CONFIG, f"--config.dataset.data_dir={data_dir}",
              "--config.dataset.shapes.num_novel=8", "--config.num_epochs=4"]

    before = _snapshot(renamed)
    assert cli.main(["train", "--workdir", str(renamed), *resume]) == 2
    err = capsys.readouterr().err
    assert "does not fit the model" in err and f"jaxcap migrate {renamed}" in err
    assert cli.main(["migrate", str(renamed)]) == 2  # no release renamed these: say what to add
    assert "--rename OLD=NEW" in capsys.readouterr().err
    assert cli.main(["migrate", str(renamed), "--dry-run", *RENAMES]) == 0
    assert "decoder/hidden_projection/kernel -> decoder/h_projection/kernel" in \
        capsys.readouterr().err
    assert _snapshot(renamed) == before  # refused, failed and dry runs touch nothing

    assert cli.main(["migrate", str(renamed), *RENAMES]) == 0
    info = json.loads((renamed / "run_info.json").read_text())
    backup = renamed / info["migrations"][-1]["originals"]
    assert {p.relative_to(backup) for p in backup.rglob("*") if p.is_file()} == \
        {p for p in before if p.parts[0] in ("checkpoints", "best")}
    assert "decoder/h_projection/kernel" in info["params"]
    assert cli.main(["migrate", str(renamed)]) == 0  # now nothing to do
    assert "nothing to do" in capsys.readouterr().err

    # Bit for bit the state the original resumes from (parameters, Adam's moments, step,
    # loop progress), so training goes on exactly as the original would (the exactness of
    # resuming itself is tested in test_train.py).
    config, abstract = _train_state_shapes(original)
    restored = []
    for workdir in (original, renamed):
        checkpoints = Checkpoints(workdir, config.keep_checkpoints)
        try:
            restored.append(checkpoints.restore_latest(abstract))
        finally:
            checkpoints.close()
    jax.tree.map(np.testing.assert_array_equal, restored[0], restored[1])
    jax.tree.map(np.testing.assert_array_equal, load_run(original).variables,
                 load_run(renamed).variables)
    assert cli.main(["train", "--workdir", str(renamed), *resume]) == 0
    assert _losses(renamed)[-1][0] == 24 and _losses(renamed)[:18] == _losses(original)


def test_a_migration_stopped_between_its_renames_is_finished_by_the_next(
        tmp_path, trained_run, monkeypatch):
    """Killed after a step's state was renamed aside and before its renamed copy took its
    place: the step has no state item, but both copies are whole. Loading refuses (moving
    nothing), and the next migration finishes the swap."""
    original = tmp_path / "original"
    shutil.copytree(trained_run, original)
    renamed = tmp_path / "renamed"
    shutil.copytree(trained_run, renamed)
    _as_older_release_wrote_it(renamed)
    renames = [parse_rename(r.split("=", 1)[1]) for r in RENAMES]

    def killed(step_dir):
        (step_dir / "state").rename(step_dir / migrate.ASIDE)
        raise KeyboardInterrupt  # the process ends here

    monkeypatch.setattr(migrate, "swap_in", killed)
    with pytest.raises(KeyboardInterrupt):
        migrate.migrate(renamed, renames, log=lambda _: None)
    monkeypatch.undo()
    stopped = next(p for p in (renamed / "best").iterdir() if p.name.isdigit())
    assert not (stopped / "state").exists()
    assert (stopped / migrate.ASIDE).is_dir() and (stopped / migrate.STAGED).is_dir()
    with pytest.raises(CheckpointError, match="middle of a migration .* to finish it"):
        load_run(renamed)
    assert not (renamed / "unreadable_checkpoints").exists()

    assert migrate.migrate(renamed, renames, log=lambda _: None) > 0
    for step_dir in migrate._step_dirs(renamed):
        assert sorted(p.name for p in step_dir.iterdir() if p.name.startswith("state")) == \
            ["state"]
    jax.tree.map(np.testing.assert_array_equal, load_run(original).variables,
                 load_run(renamed).variables)
