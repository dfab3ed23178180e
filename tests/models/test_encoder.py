"""A run's own copy of the encoder weights: the stem and the stages its model uses."""

import jax
import numpy as np
import pytest

from jaxcap import configs
from jaxcap.train.run_dir import prepare_encoder
from jaxcap.convert import init_weights
from jaxcap.models.encoder import WeightsError, build_encoder, cut_to_stage, load_encoder


@pytest.fixture(scope="module")
def whole_and_cut(tmp_path_factory, resnet18_weights):
    """The whole ResNet-18 (seed 0) and the same network drawn only up to stage 2."""
    drawn = init_weights(tmp_path_factory.mktemp("weights") / "cut", depth=18, variant="v1.5",
                         seed=0, log=lambda _: None, stages=2)
    return load_encoder(resnet18_weights), load_encoder(drawn)


def test_weights_drawn_up_to_a_stage_are_the_whole_networks_first_stages(whole_and_cut, rng):
    (metadata, whole), (drawn_metadata, drawn) = whole_and_cut
    cut_metadata, cut = cut_to_stage(metadata, whole, 2)
    assert drawn_metadata["stages"] == cut_metadata["stages"] == 2 and "stages" not in metadata
    assert sorted(drawn["params"]) == ["stage1_block1", "stage1_block2", "stage2_block1",
                                       "stage2_block2", "stem_bn", "stem_conv"]
    assert jax.tree.structure(drawn) == jax.tree.structure(cut)
    jax.tree.map(np.testing.assert_array_equal, drawn, cut)  # the same draws, bit for bit
    images = rng.uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(build_encoder(metadata, stage=2).apply(whole, images),
                                  build_encoder(drawn_metadata).apply(drawn, images))


def test_a_stage_past_the_cut_is_a_clear_error(whole_and_cut):
    _, (metadata, variables) = whole_and_cut
    with pytest.raises(WeightsError, match="hold stages 1-2 .* stage 3 needs the converted"):
        build_encoder(metadata, stage=3)
    with pytest.raises(WeightsError, match="hold stages 1-2"):
        cut_to_stage(metadata, variables, 4)
    with pytest.raises(WeightsError, match="stages must be 1..4"):
        init_weights("unused", depth=18, stages=5)


def test_a_run_copies_converted_weights_cut_after_its_stage(tmp_path, resnet18_weights):
    config = configs.load("tiny")  # stage 2
    config.encoder.weights = str(resnet18_weights)
    metadata, variables = load_encoder(prepare_encoder(config, tmp_path))
    whole_metadata, whole = load_encoder(resnet18_weights)
    assert metadata == dict(whole_metadata, stages=2)  # the source is still named
    jax.tree.map(np.testing.assert_array_equal, variables,
                 cut_to_stage(whole_metadata, whole, 2)[1])
    config.encoder.stage = 4
    config.encoder.weights = str(tmp_path / "encoder")  # a run's copy is no converted weights
    with pytest.raises(WeightsError, match="hold stages 1-2"):
        prepare_encoder(config, tmp_path / "other")
