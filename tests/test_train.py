"""Training: pmap equals one device, exact resume after SIGKILL, fallback, mismatch, NaN."""

import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from jaxcap import __version__, checkpoints, cli, configs
from jaxcap.convert import init_weights
from jaxcap.models.captioner import Captioner, build_captioner
from jaxcap.models.decoders import VARIANTS, SoftAttentionDecoder, make_decoder
from jaxcap.models.encoder import build_encoder
from jaxcap.runs import load_run
from jaxcap.train import run_dir, settings
from jaxcap.train.state import init_state, learning_rate_schedule, make_optimizer
from jaxcap.train.steps import replicate, train_step, unreplicate
from jaxcap.train.validation import Progress
from tests.killing import kill_after_checkpoint

TINY = "tiny"  # jaxcap/configs/tiny.py


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Shared across runs: the tiny dataset and its features are built once."""
    return tmp_path_factory.mktemp("datasets")


def _train_args(workdir, data_dir, *extra):
    return ["train", "--config", TINY, "--workdir", str(workdir),
            f"--config.dataset.data_dir={data_dir}", *extra]


def _losses(workdir):
    lines = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r and "val_loss" not in r]


def _validation(workdir, key):
    lines = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r[key]) for r in lines if "val_loss" in r]


def _evals(workdir):
    lines = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["val_loss"], r["bleu4"]) for r in lines if "val_loss" in r]


def _tiny_training(rng, dropout=0.0):
    """A tiny decoder's state, a batch of 8 captions and its train step."""
    config = configs.load(TINY)
    config.schedule = "constant"  # warmup would make the first update zero
    model = Captioner(SoftAttentionDecoder(vocab_size=30, feature_dim=8, embed_dim=50,
                                           hidden_dim=16, attention_dim=8,
                                           dropout_rate=dropout))
    tx = make_optimizer(config, learning_rate_schedule(config, 100))
    embedding = rng.normal(size=(30, 50)).astype(np.float32)
    state = init_state(model, config, (2, 2, 8), embedding, None, tx)
    tokens = rng.integers(3, 30, (8, config.text.max_length)).astype(np.int32)
    lengths = rng.integers(3, config.text.max_length, 8)
    tokens[np.arange(config.text.max_length)[None, :] >= lengths[:, None]] = 0
    batch = {"features": rng.normal(size=(8, 2, 2, 8)).astype(np.float32), "tokens": tokens,
             "weights": np.ones(8, np.float32)}
    step = lambda s, b, r: train_step(s, b, r, model=model, tx=tx,  # noqa: E731
                                      label_smoothing=0.1)
    return state, batch, step


def test_pmap_step_on_four_devices_equals_one_device_on_the_whole_batch(rng):
    state, batch, step = _tiny_training(rng)
    rng_key = jax.random.PRNGKey(3)
    devices = jax.local_devices()
    assert len(devices) == 4
    four = jax.pmap(step, axis_name="batch")(
        replicate(state), jax.tree.map(lambda x: x.reshape(4, 2, *x.shape[1:]), batch),
        replicate(rng_key))
    one = jax.pmap(step, axis_name="batch", devices=devices[:1])(
        replicate(state, devices[:1]), jax.tree.map(lambda x: x[None], batch),
        replicate(rng_key, devices[:1]))
    np.testing.assert_allclose(four[1]["loss"][0], one[1]["loss"][0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b[0], rtol=2e-5, atol=1e-7),
                 four[0].params, one[0].params)
    assert not np.allclose(four[0].params["decoder"]["output"]["kernel"][0],
                           state.params["decoder"]["output"]["kernel"])


def test_the_train_step_is_traced_once_from_the_replicated_state_to_its_own_outputs(rng):
    """``replicate`` lays the state out as the pmapped step returns it, so the
    second step runs the first one's program: with flax's default layout every run
    traced and compiled its train step twice."""
    state, batch, step = _tiny_training(rng)
    traces = []

    def traced_step(*args):
        traces.append(len(traces))  # Python runs only when JAX traces
        return step(*args)

    p_step = jax.pmap(traced_step, axis_name="batch", donate_argnums=(0,))
    shards = jax.tree.map(lambda x: x.reshape(4, 2, *x.shape[1:]), batch)
    key = replicate(jax.random.PRNGKey(3))
    state = replicate(state)
    for _ in range(3):
        state, _ = p_step(state, shards, key)
    assert traces == [0]


def test_replicate_and_unreplicate_copy_on_the_host_without_compiling_anything(rng):
    """Each program compiled per parameter shape (stacking, indexing) cost a tiny run 4 s
    of its 24 with the compilation cache warm; odd shapes here, so none is cached."""
    tree = {"w": rng.normal(size=(3, 7, 11)).astype(np.float32),
            "step": jnp.asarray(5, jnp.int32), "key": jax.random.PRNGKey(13),
            "flag": np.asarray(True), "half": jnp.asarray(rng.normal(size=(13,)), jnp.bfloat16)}
    compiled = []

    def count(name, *_, **__):
        if name.endswith("backend_compile_duration"):
            compiled.append(name)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        copies = replicate(tree)
        back = unreplicate(copies)
        first = replicate(tree, jax.local_devices()[:1])
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert compiled == []
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for name, value in tree.items():
        assert copies[name].shape == (4, *np.shape(value))
        assert [s.device for s in copies[name].addressable_shards] == jax.local_devices()
        for shard in copies[name].addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data)[0], np.asarray(value))
        assert isinstance(back[name], np.ndarray) and back[name].dtype == np.asarray(value).dtype
        np.testing.assert_array_equal(back[name], np.asarray(value))
        assert first[name].shape == (1, *np.shape(value))


@pytest.mark.parametrize("variant", ["soft", "transformer"])
def test_a_new_state_draws_the_decoder_of_the_whole_captioner_and_keeps_the_encoder(
        rng, variant):
    """``init_state`` initialises the decoder alone (on a grid of the encoder's shape): its
    draws must be those of initialising the whole captioner, encoder in front."""
    config = configs.load(TINY)
    config.decoder.variant = variant
    config.encoder.update(mode="end_to_end", stage=1, image_size=16)
    metadata = dict(architecture="resnet", depth=18, variant="v1.5", preprocessing="torch")
    model = build_captioner(config, 30, metadata)
    tx = make_optimizer(config, learning_rate_schedule(config, 100))
    embedding = rng.normal(size=(30, 50)).astype(np.float32)
    encoder = jax.jit(build_encoder(metadata, stage=1).init)(jax.random.PRNGKey(1),
                                                             np.zeros((1, 16, 16, 3)))
    state = init_state(model, config, (16, 16, 3), embedding, encoder, tx)
    whole = jax.jit(model.init)(
        {"params": jax.random.PRNGKey(config.seed), "dropout": jax.random.PRNGKey(0)},
        np.zeros((1, 16, 16, 3), np.uint8),
        np.zeros((1, config.text.max_length - 1), np.int32))
    expected = whole["params"]["decoder"]
    expected["embed"]["embedding"] = embedding
    jax.tree.map(np.testing.assert_array_equal, state.params["decoder"], expected)
    assert jax.tree.structure(state.params["decoder"]) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal,
                 {"params": state.params["encoder"], "batch_stats": state.batch_stats["encoder"]},
                 encoder)
    assert set(state.batch_stats) == {"encoder"} | ({"decoder"} & set(whole["batch_stats"]))
    jax.tree.map(lambda m: np.testing.assert_array_equal(m, np.zeros_like(m)),
                 state.opt_state)


@pytest.mark.parametrize("batchnorm", ["frozen", "batch"])
def test_an_encoder_in_the_graph_trains_its_batchnorm_over_all_devices(rng, batchnorm):
    """``encoder.batchnorm=batch`` normalises by the statistics of the whole batch, over
    every device, and moves the running ones: 4 devices give the update of 1 device.
    ``frozen`` (pretrained weights) leaves them where they are."""
    config = configs.load(TINY)
    config.encoder.update(batchnorm=batchnorm, stage=1, image_size=16)
    config.decoder.dropout = 0.0  # with dropout each device draws its own masks
    metadata = dict(architecture="resnet", depth=18, variant="v1.5", preprocessing="torch")
    model = build_captioner(config, 30, metadata)
    assert model.train_batchnorm == (batchnorm == "batch")
    tx = optax.sgd(0.1)  # Adam's first step is about ±lr for any gradient, however small
    embedding = rng.normal(size=(30, 50)).astype(np.float32)
    encoder = jax.jit(build_encoder(metadata, stage=1).init)(jax.random.PRNGKey(1),
                                                             np.zeros((1, 16, 16, 3)))
    state = init_state(model, config, (16, 16, 3), embedding, encoder, tx)
    tokens = rng.integers(3, 30, (8, config.text.max_length)).astype(np.int32)
    batch = {"image": rng.integers(0, 256, (8, 16, 16, 3)).astype(np.uint8), "tokens": tokens,
             "weights": np.ones(8, np.float32)}
    step = functools.partial(train_step, model=model, tx=tx, label_smoothing=0.0)
    key, devices = jax.random.PRNGKey(0), jax.local_devices()
    four = jax.pmap(step, axis_name="batch")(
        replicate(state), jax.tree.map(lambda x: x.reshape(4, 2, *x.shape[1:]), batch),
        replicate(key))[0]
    one = jax.pmap(step, axis_name="batch", devices=devices[:1])(
        replicate(state, devices[:1]), jax.tree.map(lambda x: x[None], batch),
        replicate(key, devices[:1]))[0]
    for name in ("params", "batch_stats"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b[0], rtol=1e-4, atol=1e-6),
                     getattr(four, name), getattr(one, name))
    before = state.batch_stats["encoder"]["stem_bn"]["mean"]
    after = four.batch_stats["encoder"]["stem_bn"]["mean"][0]
    assert np.array_equal(after, before) == (batchnorm == "frozen")


def test_with_dropout_each_device_draws_its_own_stream(rng):
    """What the README says of dropout on several devices: device d draws its masks from
    the step's key folded with d, so 4 devices give the update of one device running the
    4 shards with those 4 streams (vmap over the same axis name), not that of one device
    drawing one mask for the whole batch."""
    state, batch, step = _tiny_training(rng, dropout=0.5)
    key = jax.random.PRNGKey(3)
    shards = jax.tree.map(lambda x: x.reshape(4, 2, *x.shape[1:]), batch)
    four = jax.pmap(step, axis_name="batch")(replicate(state), shards, replicate(key))
    streams = jax.jit(jax.vmap(step, axis_name="batch", in_axes=(None, 0, None)))(
        state, shards, key)
    np.testing.assert_allclose(four[1]["loss"][0], streams[1]["loss"][0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b[0], rtol=2e-5, atol=1e-7),
                 four[0].params, streams[0].params)
    whole = jax.pmap(step, axis_name="batch", devices=jax.local_devices()[:1])(
        replicate(state, jax.local_devices()[:1]),
        jax.tree.map(lambda x: x[None], batch), replicate(key, jax.local_devices()[:1]))
    assert abs(float(whole[1]["loss"][0]) - float(four[1]["loss"][0])) > 1e-4


def test_the_learning_rate_scale_scales_every_update(rng):
    state, batch, step = _tiny_training(rng)
    one = jax.pmap(step, axis_name="batch", devices=jax.local_devices()[:1])
    args = (jax.tree.map(lambda x: x[None], batch), jax.random.PRNGKey(0)[None])
    moved = {}
    for scale in (1.0, 0.5):
        scaled = state.replace(lr_scale=np.float32(scale))
        new = one(replicate(scaled, jax.local_devices()[:1]), *args)[0]
        moved[scale] = jax.tree.map(lambda a, b: a[0] - b, new.params, state.params)
    # atol: each movement is a difference of parameters up to ~4 (float32 spacing 5e-7)
    jax.tree.map(lambda full, half: np.testing.assert_allclose(half, full / 2, rtol=1e-5,
                                                               atol=1e-6),
                 moved[1.0], moved[0.5])


@pytest.mark.parametrize("scores, scales, stops_after", [
    # patience 2 for a cut, 3 for stopping; a better score resets both counts
    ([0.1, 0.2, 0.2, 0.1, 0.3, 0.3, 0.3, 0.3], [1, 1, 1, .5, .5, .5, .25, .25], 8),
    ([0.1, 0.1, 0.1, 0.1, 0.1], [1, 1, .5, .5], 4),
    ([0.1, 0.2, 0.3, 0.4], [1, 1, 1, 1], None),
])
def test_plateau_cuts_the_rate_and_patience_stops_the_run(scores, scales, stops_after):
    config = configs.load(TINY)
    config.plateau_patience, config.plateau_factor, config.early_stopping_patience = 2, 0.5, 3
    progress, scale, seen = Progress(), 1.0, []
    for epoch, bleu4 in enumerate(scores):
        scale = progress.after_validation(epoch, bleu4, scale, config, log=lambda _: None)
        seen.append(scale)
        if progress.stopped_early:
            break
    assert seen == scales[:len(seen)]
    assert (len(seen) if progress.stopped_early else None) == stops_after
    config.early_stopping_patience = 0  # off
    progress = Progress()
    for epoch in range(20):
        progress.after_validation(epoch, 0.0, 1.0, config, log=lambda _: None)
    assert not progress.stopped_early


def test_progress_saved_before_the_selection_metric_reads_back():
    saved = dict(evaluated_epochs=2, best_bleu4=0.5, epochs_since_best=1, epochs_since_cut=1,
                 stopped_early=False)
    assert Progress.from_saved(saved) == Progress(2, 0.5, 1, 1, False)


def test_a_run_that_stops_improving_cuts_its_rate_and_stops_early(tmp_path, data_dir):
    """With the learning rate at 0 and BatchNorm's statistics frozen the model never
    changes, so val BLEU-4 never improves after epoch 1."""
    workdir = tmp_path / "flat"
    args = _train_args(workdir, data_dir, "--config.learning_rate=0", "--config.num_epochs=6",
                       "--config.encoder.batchnorm=frozen",
                       "--config.plateau_patience=1", "--config.early_stopping_patience=2")
    assert cli.main(args) == 0
    assert [(e, r) for e, r in _validation(workdir, "lr_scale")] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert _losses(workdir)[-1][0] == 3 * 6  # 3 of 6 epochs, 6 steps each


@pytest.mark.parametrize("device_count", [1, 4])
def test_a_nonfinite_step_leaves_parameters_and_adam_moments_untouched(rng, device_count):
    state, batch, step = _tiny_training(rng)
    batch["features"][0, 0, 0, 0] = np.nan  # one image, on the first device only
    devices = jax.local_devices()[:device_count]
    new, metrics = jax.pmap(step, axis_name="batch", devices=devices)(
        replicate(state, devices),
        jax.tree.map(lambda x: x.reshape(device_count, -1, *x.shape[1:]), batch),
        replicate(jax.random.PRNGKey(3), devices))
    assert not np.isfinite(metrics["loss"]).any()
    assert new.nonfinite.all() and (new.step == 1).all()
    jax.tree.map(lambda kept, old: np.testing.assert_array_equal(
        kept, np.broadcast_to(old, kept.shape)), (new.params, new.opt_state),
        (state.params, state.opt_state))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("runs") / "whole"
    assert cli.main(_train_args(workdir, data_dir)) == 0
    return workdir


def test_run_writes_a_self_describing_directory(uninterrupted):
    for name in ("config.json", "vocabulary.json", "encoder/metadata.json", "metrics.jsonl"):
        assert (uninterrupted / name).exists(), name
    losses = _losses(uninterrupted)
    assert [s for s, _ in losses] == list(range(1, 19))  # 48 images / 8 = 6 steps x 3 epochs
    assert losses[-1][1] < losses[0][1]
    assert [e for e, _, _ in _evals(uninterrupted)] == [1, 2, 3]
    for key in ("content_accuracy", "object_precision", "object_recall"):  # shapes is grounded
        assert all(0 <= value <= 1 for _, value in _validation(uninterrupted, key)), key
    assert sorted(int(p.name) for p in (uninterrupted / "checkpoints").iterdir()
                  if p.name.isdigit()) == [12, 16, 18]  # the last 3 of 4, 6, 8, 12, 16, 18
    assert [p.name for p in (uninterrupted / "best").iterdir() if p.name.isdigit()]


def test_a_run_loads_without_orbax_warnings_and_its_layout_reads_from_the_metadata(
        uninterrupted, caplog):
    with caplog.at_level("WARNING"):
        run = load_run(uninterrupted)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []
    best = next(p for p in (uninterrupted / "best").iterdir() if p.name.isdigit())
    assert checkpoints.saved_layout(best) == checkpoints.param_layout(run.variables["params"])
    assert checkpoints.saved_layout(best, "batch_stats") == checkpoints.param_layout(
        run.variables["batch_stats"])


def test_sigkill_and_restart_reproduce_the_uninterrupted_losses(tmp_path, data_dir, uninterrupted):
    workdir = tmp_path / "killed"
    kill_after_checkpoint(_train_args(workdir, data_dir), workdir, 8)
    assert cli.main(_train_args(workdir, data_dir)) == 0
    assert _losses(workdir) == _losses(uninterrupted)
    assert _evals(workdir) == _evals(uninterrupted)


def test_unreadable_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, data_dir,
                                                                    uninterrupted):
    workdir = _copy(uninterrupted, tmp_path, "damaged")  # checkpoints 12, 16 and 18
    latest = workdir / "checkpoints" / "18"
    for path in latest.rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "state" in path.parts:
            path.write_bytes(b"\0" * 7)
    with pytest.warns(UserWarning, match="checkpoint 18 .* is unreadable"):
        assert cli.main(_train_args(workdir, data_dir)) == 0
    assert _losses(workdir) == _losses(uninterrupted)  # steps 17 and 18 trained again
    moved = list((workdir / "unreadable_checkpoints").iterdir())
    assert [p.name.split("-")[0] for p in moved] == ["18"]  # that one, and nothing else
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [12, 16, 18]


def test_a_run_holds_the_encoder_stages_its_model_uses_and_one_with_all_resumes_alike(
        tmp_path, data_dir, uninterrupted):
    """A new run's encoder is cut after its stage (2 in tiny); a run written before, whose
    copy holds the whole network, resumes as it was and trains the same losses."""
    cut = checkpoints.saved_layout(uninterrupted / "checkpoints" / "18")
    assert {path.split("/")[1][:6] for path in cut if path.startswith("encoder/")} == {
        "stem_b", "stem_c", "stage1", "stage2"}
    workdir = tmp_path / "whole_encoder"
    config = configs.load(TINY)
    init_weights(workdir / "encoder", config.encoder.init_depth, config.encoder.init_variant,
                 seed=config.seed, log=lambda _: None)
    assert cli.main(_train_args(workdir, data_dir, "--config.num_epochs=2")) == 0
    assert cli.main(_train_args(workdir, data_dir)) == 0  # resumed for the third epoch
    whole = checkpoints.saved_layout(workdir / "checkpoints" / "18")
    assert set(whole) - set(cut) == {path for path in whole if path.startswith(
        ("encoder/stage3", "encoder/stage4"))} != set()
    assert _losses(workdir) == _losses(uninterrupted)
    assert _evals(workdir) == _evals(uninterrupted)


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, data_dir):
    """A run trained for 4 steps (one checkpoint, at step 4): each test resumes a copy."""
    workdir = tmp_path_factory.mktemp("runs") / "four"
    assert cli.main(_train_args(workdir, data_dir, "--config.num_train_steps=4")) == 0
    return workdir


def _copy(run, tmp_path, name):
    shutil.copytree(run, tmp_path / name)
    return tmp_path / name


def _snapshot(workdir):
    """Every file of a run directory and its bytes: to show that nothing was touched."""
    return {p.relative_to(workdir): p.read_bytes() for p in workdir.rglob("*") if p.is_file()}


def _write_config(workdir, config):  # as jaxcap writes it
    (workdir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def test_a_checkpoint_that_does_not_fit_the_model_is_a_clear_error_touching_nothing(
        tmp_path, data_dir, four_steps, capsys):
    """What an upgrade that renames parameters looks like: the model the run's config now
    builds has other parameter names than its checkpoints."""
    workdir = _copy(four_steps, tmp_path, "renamed")
    config = json.loads((workdir / "config.json").read_text())
    config["decoder"]["variant"] = "updown"
    _write_config(workdir, config)
    before = _snapshot(workdir)
    assert cli.main(_train_args(workdir, data_dir, "--config.num_train_steps=4",
                                "--config.decoder.variant=updown")) == 2
    err = capsys.readouterr().err
    assert "checkpoint 4" in err and "does not fit the model" in err
    assert "parameters differ" in err and "absent in the checkpoint" in err
    assert f"written by jaxcap {__version__}" in err
    assert _snapshot(workdir) == before


@pytest.mark.parametrize("failure", [
    PermissionError(13, "Permission denied"), MemoryError(),
    ValueError("UNAVAILABLE: Error reading \"params.decoder\" in OCDBT database: try again"),
    ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB"),
    ValueError("DEADLINE_EXCEEDED: Error reading from gs://bucket/run/checkpoints/4"),
    RuntimeError("an error nobody has shown to mean damage")],
    ids=["permission", "memory", "unavailable", "resource_exhausted", "deadline", "unknown"])
def test_a_failure_that_is_not_damage_is_raised_touching_nothing(tmp_path, data_dir, four_steps,
                                                                 monkeypatch, failure):
    """Only what is shown damaged is set aside: a restore that ran out of memory or met a busy
    store fails as it is, every checkpoint stays where it was, and a rerun tries again."""
    workdir = _copy(four_steps, tmp_path, "failing")
    before = _snapshot(workdir)

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(ocp.CheckpointManager, "restore", fail)
    with pytest.raises(type(failure)):
        cli.main(_train_args(workdir, data_dir, "--config.num_train_steps=4"))
    assert _snapshot(workdir) == before
    monkeypatch.undo()
    assert cli.main(_train_args(workdir, data_dir, "--config.num_train_steps=4")) == 0


@pytest.mark.parametrize("damage", ["truncated", "deleted", "unparsable"])
def test_damaged_files_are_what_sets_a_checkpoint_aside(tmp_path, data_dir, four_steps, damage):
    workdir = _copy(four_steps, tmp_path, damage)
    state = workdir / "checkpoints" / "4" / "state"
    chunks = [p for p in (state / "ocdbt.process_0" / "d").iterdir()]
    if damage == "truncated":
        for chunk in chunks:
            chunk.write_bytes(chunk.read_bytes()[:chunk.stat().st_size // 2])
    elif damage == "deleted":
        (state / "_METADATA").unlink()
    else:
        (state / "_METADATA").write_text("{not json")
    with pytest.warns(UserWarning, match="checkpoint 4 .* is unreadable"):
        assert cli.main(_train_args(workdir, data_dir, "--config.num_train_steps=4")) == 2
    assert [p.name.split("-")[0] for p in (workdir / "unreadable_checkpoints").iterdir()] == ["4"]


def test_when_no_checkpoint_is_readable_the_run_stops_and_never_restarts_from_zero(
        tmp_path, data_dir, four_steps, capsys):
    workdir = _copy(four_steps, tmp_path, "lost")
    history = (workdir / "metrics.jsonl").read_text()
    for path in (workdir / "checkpoints").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(b"\0" * 7)
    for attempt in range(2):  # the rerun does not start from 0 either
        with (pytest.warns(UserWarning, match="is unreadable") if attempt == 0
              else contextlib.nullcontext()):
            assert cli.main(_train_args(workdir, data_dir, "--config.num_train_steps=4")) == 2
        err = capsys.readouterr().err
        assert "no checkpoint" in err and "unreadable_checkpoints" in err and "new --workdir" in err
        assert (workdir / "metrics.jsonl").read_text() == history
    assert [p.name.split("-")[0] for p in (workdir / "unreadable_checkpoints").iterdir()] == ["4"]


def test_resuming_keeps_the_log_lines_it_trims_and_records_the_run(tmp_path, data_dir):
    workdir = tmp_path / "history"
    assert cli.main(_train_args(workdir, data_dir, "--config.num_train_steps=6")) == 0
    first = (workdir / "metrics.jsonl").read_text().splitlines()
    test_record = [line for line in first if '"split"' in line]
    assert len(test_record) == 1  # the end-of-run test score: redone when the run ends again
    assert cli.main(_train_args(workdir, data_dir, "--config.num_train_steps=7")) == 0
    kept = (workdir / "metrics.jsonl.before-resume-6").read_text().splitlines()
    assert kept == test_record
    now = (workdir / "metrics.jsonl").read_text().splitlines()
    assert now[:len(first) - 1] == [line for line in first if line not in test_record]
    info = json.loads((workdir / "run_info.json").read_text())
    assert info["jaxcap_version"] == info["last_run_by"] == __version__
    assert info["params"]["decoder/output/kernel"][0] == 32  # the tiny config's hidden_dim
    assert "decoder/h_projection/kernel" in info["params"]


def test_changed_model_config_on_resume_is_a_clear_error(tmp_path, data_dir, capsys):
    workdir = tmp_path / "run"
    assert cli.main(_train_args(workdir, data_dir, "--config.num_train_steps=2")) == 0
    assert cli.main(_train_args(workdir, data_dir, "--config.decoder.hidden_dim=64")) == 2
    err = capsys.readouterr().err
    assert "another model config (decoder.hidden_dim: 32 -> 64)" in err  # that setting alone


def test_a_changed_scst_stage_boundary_is_refused_once_the_run_has_a_checkpoint(
        tmp_path, data_dir, four_steps, capsys):
    """Switching a cross-entropy run to SCST later (or moving the switch) would change the
    score its best checkpoints were picked and compared by: refused, naming the setting,
    with config.json and every checkpoint as they were."""
    workdir = _copy(four_steps, tmp_path, "stage")
    before = _snapshot(workdir)
    assert cli.main(_train_args(workdir, data_dir, "--config.num_train_steps=8",
                                "--config.scst.from_epoch=1", "--config.scst.samples=2")) == 2
    err = capsys.readouterr().err
    assert "scst.from_epoch=-1, not 1" in err and "--config.scst.from_epoch=-1" in err
    assert _snapshot(workdir) == before


def test_a_run_stopped_before_its_first_checkpoint_says_it_may_be_started_again(
        tmp_path, data_dir, capsys):
    """As a run stopped while it prepared its data: config.json written, no checkpoint."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    config = configs.load("tiny")
    config.decoder.hidden_dim = 48
    run_dir.write_config(config, workdir)
    assert cli.main(_train_args(workdir, data_dir, "--config.num_train_steps=2")) == 2
    err = capsys.readouterr().err
    assert "(decoder.hidden_dim: 48 -> 32)" in err and "It has no checkpoint yet" in err


def test_a_run_written_before_the_decoder_variants_resumes_and_loads(tmp_path, data_dir,
                                                                     four_steps, capsys):
    """Its config.json has no per-variant sections, no encoder.batchnorm and no SCST: the
    new settings take their defaults, except where the run trained otherwise before them
    (its encoder's BatchNorm statistics were frozen, and stay so; it trained by
    cross-entropy only and picks its best checkpoint by BLEU-4, whatever today's config
    says)."""
    workdir = _copy(four_steps, tmp_path, "older")
    config = json.loads((workdir / "config.json").read_text())
    for name in VARIANTS:
        del config["decoder"][name]
    del config["encoder"]["batchnorm"], config["scst"], config["objective"]
    (workdir / "config.json").write_text(json.dumps(config))
    run = load_run(workdir)
    assert isinstance(run.model.decoder, SoftAttentionDecoder) and run.model.decoder.fast_path
    assert run.config.scst.from_epoch == -1
    assert cli.main(_train_args(workdir, data_dir, "--config.num_train_steps=5",
                                "--config.scst.from_epoch=0")) == 0
    assert [step for step, _ in _losses(workdir)] == [1, 2, 3, 4, 5]
    err = capsys.readouterr().err
    assert "encoder.batchnorm: 'frozen', as the run was started" in err
    assert "scst.from_epoch: -1, as the run was started" in err
    assert not any("reward" in json.loads(line)
                   for line in (workdir / "metrics.jsonl").read_text().splitlines())
    assert json.loads((workdir / "config.json").read_text())["encoder"]["batchnorm"] == "frozen"
    with ocp.StandardCheckpointer() as checkpointer:
        stats = [checkpointer.restore(workdir / "checkpoints" / str(step) / "state")[
            "batch_stats"]["encoder"]["stem_bn"]["mean"] for step in (4, 5)]
    np.testing.assert_array_equal(stats[0], stats[1])
    assert cli.main(_train_args(workdir, data_dir, "--config.decoder.variant=updown")) == 2
    assert "decoder" in capsys.readouterr().err


def test_bfloat16_training_keeps_float32_state_and_runs_decode_in_either_precision(
        tmp_path, uninterrupted, rng):
    """Mixed precision through the trainer: parameters, Adam's moments and the loss stay
    float32 (so checkpoints are float32 whatever a run computed in), and a run's
    checkpoint computes in either precision, from the command line too."""
    config = configs.load(TINY)
    model = Captioner(make_decoder(config.decoder, 30, 8, jnp.bfloat16))
    tx = make_optimizer(config, learning_rate_schedule(config, 100))
    state = init_state(model, config, (2, 2, 8), rng.normal(size=(30, 50)).astype(np.float32),
                       None, tx)
    _, batch, _ = _tiny_training(rng)
    one = jax.local_devices()[:1]
    step = jax.pmap(lambda s, b, r: train_step(s, b, r, model=model, tx=tx, label_smoothing=0.0),
                    axis_name="batch", devices=one)
    state, metrics = step(replicate(state, one),
                          jax.tree.map(lambda x: x[None], batch),
                          replicate(jax.random.PRNGKey(0), one))
    assert metrics["loss"].dtype == np.float32 and np.isfinite(float(metrics["loss"][0]))
    leaves = jax.tree.leaves((state.params, state.opt_state))
    assert {x.dtype for x in leaves if np.issubdtype(x.dtype, np.floating)} == {
        np.dtype(np.float32)}

    images = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    logits = {}
    for dtype in ("float32", "bfloat16"):
        run = load_run(uninterrupted, dtype=dtype)
        assert run.image_model.decoder.dtype == jnp.dtype(dtype)
        assert {x.dtype for x in jax.tree.leaves(run.variables)} == {np.dtype(np.float32)}
        logits[dtype] = np.asarray(run.image_model.apply(
            run.image_variables, images, np.ones((2, 3), np.int32))["logits"])
        assert logits[dtype].dtype == np.float32 and np.all(np.isfinite(logits[dtype]))
    np.testing.assert_allclose(logits["bfloat16"], logits["float32"], atol=0.1 * np.abs(
        logits["float32"]).max())
    image, captions = tmp_path / "scene.png", tmp_path / "captions.jsonl"
    Image.fromarray(images[0]).save(image)
    assert cli.main(["caption", "--workdir", str(uninterrupted), str(image), "--dtype",
                     "bfloat16", "--beam", "2", "--output", str(captions)]) == 0
    assert json.loads(captions.read_text())["caption"]


def test_the_metrics_reach_tensorboard_without_importing_pytorch(tmp_path):
    """tensorboardX imports PyTorch whenever it is installed (2.2 s of each run's start):
    the run's log keeps it out, and PyTorch imports as usual afterwards."""
    pytest.importorskip("tensorboardX")
    script = ("import importlib.util, sys; from pathlib import Path; "
              "from jaxcap.train.metrics_log import MetricsLog; "
              "log = MetricsLog(Path(sys.argv[1]), 0, 0); "
              "log.write({'step': 1, 'epoch': 0, 'loss': 2.5}); log.close(); "
              "print('torch' in sys.modules); "
              "importlib.util.find_spec('torch') and __import__('torch').zeros(1)")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"]
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.5
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and b"train/loss" in events[0].read_bytes()


def test_nan_loss_stops_the_run_without_a_checkpoint_of_it(tmp_path, data_dir, capsys):
    workdir = tmp_path / "nan"
    status = cli.main(_train_args(workdir, data_dir, "--config.learning_rate=1e30",
                                  "--config.checkpoint_every_steps=1", "--config.warmup_steps=1"))
    assert status == 2
    err = capsys.readouterr().err
    assert "the loss became NaN or Inf before step" in err
    bad_step = int(err.split("before step ")[1].split(";")[0])
    saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert all(step < bad_step for step in saved)
    assert all(np.isfinite(loss) for _, loss in _losses(workdir))


@pytest.mark.parametrize("setting, message", [
    ("batch_size=0", "batch_size=0: must be at least 1"),
    ("eval.batch_size=-8", "eval.batch_size=-8: must be at least 1"),
    ("checkpoint_every_steps=0", "checkpoint_every_steps=0: must be at least 1"),
    ("keep_checkpoints=0", "keep_checkpoints=0: must be at least 1"),
    ("text.length_multiple=-1", "text.length_multiple=-1: must be at least 0"),
    ("text.max_length=2", "text.max_length=2: must be at least 3"),
    ("decoder.hidden_dim=0", "decoder.hidden_dim=0: must be at least 1"),
    ("learning_rate=-0.001", "learning_rate=-0.001: must be at least 0"),
    ("grad_clip_norm=0", "grad_clip_norm=0.0: must be above 0"),
    ("dtype=float16", "dtype='float16': must be one of float32, bfloat16"),
    ("text.captions=every", "text.captions='every': must be one of sample, all"),
    ("encoder.stage=5", "encoder.stage=5: must be one of 1, 2, 3, 4"),
    ("decoder.dropout=1", "decoder.dropout=1.0: must be at least 0 and below 1"),
    ("decoder.variant=transformer decoder.transformer.heads=3",
     "decoder.transformer.width=256: must be a multiple of decoder.transformer.heads (3)"),
    ("decoder.variant=transformer decoder.transformer.width=18 decoder.transformer.heads=2",
     "decoder.transformer.width=18: must be a multiple of 4"),
    ("plateau_factor=1.5", "plateau_factor=1.5: must be above 0 and at most 1"),
    ("num_epochs=0", "num_epochs=0: must be at least 1 (or num_train_steps at least 1)"),
    ("encoder.image_size=0", "encoder.image_size=0: must be at least 1"),
    ("glove.source=/no/such/glove.txt", "/no/such/glove.txt: no such file (glove.source takes"),
    ("decoder.embed_dim=64", "decoder.embed_dim is 64 but the GloVe vectors (default) have 50"),
    ("dataset.shapes.num_train=-5", "the shapes dataset's num_train must be at least 0, got -5"),
    # Checked where the model and the schedule are built too; found only there, they had
    # bound the run directory to the mistake (config.json was written before).
    ("decoder.variant=bogus", "unknown decoder variant 'bogus'"),
    ("schedule=sometimes", "schedule='sometimes': must be one of constant, warmup, cosine"),
    ("objective=reinforce", "objective='reinforce': must be one of cross_entropy, scst"),
    ("encoder.mode=both", "encoder.mode must be features or end_to_end, got 'both'"),
])
def test_a_setting_out_of_range_is_an_error_naming_it_before_anything_is_written(
        tmp_path, capsys, setting, message):
    workdir = tmp_path / "run"
    assert cli.main(["train", "--config", "tiny", "--workdir", str(workdir),
                     "--config.dataset.data_dir=" + str(tmp_path / "data"),
                     *(f"--config.{part}" for part in setting.split())]) == 2
    assert f"jaxcap train: error: {message}" in capsys.readouterr().err
    assert not workdir.exists() and not (tmp_path / "data").exists()


def test_a_run_may_set_steps_instead_of_epochs():
    config = configs.load("tiny")
    config.num_epochs, config.num_train_steps = 0, 5
    settings.check_settings(config)


def test_config_overrides_are_typed_and_checked():
    config = configs.load("shapes")
    configs.override(config, ["decoder.hidden_dim=64", "glove.freeze=true", "learning_rate=1e-3",
                              "encoder.weights=~/w"])
    assert config.decoder.hidden_dim == 64 and config.glove.freeze is True
    assert config.learning_rate == 1e-3 and config.encoder.weights == os.path.expanduser("~/w")
    with pytest.raises(configs.ConfigError, match="decoder.hiden_dim: no such config key"):
        configs.override(config, ["decoder.hiden_dim=3"])
    with pytest.raises(configs.ConfigError, match="batch_size=many"):
        configs.override(config, ["batch_size=many"])
