"""The grain pipeline: fixed shapes, padding with weights, order, shards, features."""

import dataclasses

import numpy as np
import pytest

from jaxcap.data import builders, shapes
from jaxcap.data.pipeline import Batcher, FeatureStore, PipelineOptions, SplitIndex
from jaxcap.data.readers import DataError
from jaxcap.data.text import Vocabulary

SPEC = shapes.ShapesSpec(seed=3, image_size=64, num_train=10, num_val=5, num_test=3, num_novel=0)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    built = builders.prepare("shapes", tmp_path_factory.mktemp("data"), spec=SPEC)
    return built.as_data_source()


@pytest.fixture(scope="module")
def vocabulary(sources):
    index = SplitIndex(sources["train"])
    return Vocabulary.build([c for caps in index.captions for c in caps], min_count=1)


def _all(batcher, epoch=0, start=0):
    return list(batcher.epoch(epoch, start))


def test_eval_batches_are_fixed_shape_and_pad_with_zero_weight(sources, vocabulary):
    options = PipelineOptions(batch_size=4, max_length=12, image_size=32, shuffle=False)
    batches = _all(Batcher(sources["val"], vocabulary, options))
    assert len(batches) == 2
    for batch in batches:
        assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
        assert batch["tokens"].shape == (4, 12) and batch["tokens"].dtype == np.int32
    assert batches[1]["weights"].tolist() == [1, 0, 0, 0]
    assert batches[1]["image_index"].tolist()[1:] == [-1, -1, -1]
    covered = np.concatenate([b["image_index"][b["weights"] > 0] for b in batches])
    assert sorted(covered.tolist()) == list(range(5))  # every image once, nothing dropped


def test_tokens_encode_one_of_the_images_captions(sources, vocabulary):
    batcher = Batcher(sources["train"], vocabulary, PipelineOptions(batch_size=5, max_length=20,
                                                                    image_size=32))
    for batch in _all(batcher):
        for tokens, image in zip(batch["tokens"], batch["image_index"]):
            assert vocabulary.decode(tokens) in batcher.index.captions[image]


def test_order_depends_on_seed_and_epoch_and_resumes_exactly(sources, vocabulary):
    options = PipelineOptions(batch_size=2, max_length=16, image_size=32, seed=1)
    batcher = Batcher(sources["train"], vocabulary, options)
    epoch0, epoch1 = _all(batcher, 0), _all(batcher, 1)
    again = _all(Batcher(sources["train"], vocabulary, options), 0)
    key = lambda bs: [(b["image_index"].tolist(), b["tokens"].tolist()) for b in bs]  # noqa: E731
    assert key(epoch0) == key(again)
    assert key(epoch0) != key(epoch1)
    assert key(_all(batcher, 1, start=3)) == key(epoch1[3:])
    np.testing.assert_array_equal(epoch1[4]["image"], _all(batcher, 1, start=4)[0]["image"])


def test_all_captions_mode_and_drop_remainder(sources, vocabulary):
    options = PipelineOptions(batch_size=4, max_length=16, image_size=32, captions="all",
                              drop_remainder=True)
    batcher = Batcher(sources["train"], vocabulary, options)
    batches = _all(batcher)
    assert len(batches) == 50 // 4 == batcher.num_batches()
    assert all(b["weights"].all() for b in batches)


def test_process_shards_are_disjoint_and_equal_in_length(sources, vocabulary):
    shards = [_all(Batcher(sources["val"], vocabulary, PipelineOptions(
        batch_size=4, max_length=12, image_size=32, process_index=p, process_count=2)))
        for p in range(2)]
    assert len(shards[0]) == len(shards[1])
    assert all(len(b["weights"]) == 2 for s in shards for b in s)
    seen = [set(np.concatenate([b["image_index"][b["weights"] > 0] for b in s]).tolist())
            for s in shards]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(5))


@pytest.mark.parametrize("length_multiple", [0, 4])
def test_processes_split_the_same_global_batches(sources, vocabulary, length_multiple):
    """Two processes' batch k, put together in process order, is the one process's batch k:
    the global batch (and what each device sees) does not depend on the process count."""
    options = PipelineOptions(batch_size=4, max_length=18, image_size=32, captions="all",
                              drop_remainder=True, length_multiple=length_multiple)
    whole = _all(Batcher(sources["train"], vocabulary, options), 1)
    shards = [_all(Batcher(sources["train"], vocabulary, dataclasses.replace(
        options, process_index=p, process_count=2)), 1) for p in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(whole)
    for k, batch in enumerate(whole):
        for key in batch:
            np.testing.assert_array_equal(
                np.concatenate([shards[0][k][key], shards[1][k][key]]), batch[key])
    with pytest.raises(ValueError, match="batch_size 3 is not a multiple of the 2 processes"):
        PipelineOptions(batch_size=3, max_length=18, process_count=2)


def test_features_are_joined_by_image_id(tmp_path, sources, vocabulary):
    index = SplitIndex(sources["val"])
    names = list(reversed(index.image_ids))  # a different order than the source's
    features = np.arange(len(names) * 2 * 2 * 3, dtype=np.float32).reshape(len(names), 2, 2, 3)
    np.save(tmp_path / "features.npy", features)
    (tmp_path / "ids.txt").write_text("\n".join(names) + "\n")
    store = FeatureStore(tmp_path)
    batcher = Batcher(sources["val"], vocabulary,
                      PipelineOptions(batch_size=3, max_length=12), features=store)
    for batch in _all(batcher):
        assert "image" not in batch and batch["features"].shape == (3, 2, 2, 3)
        for row, image, weight in zip(batch["features"], batch["image_index"], batch["weights"]):
            if weight:
                np.testing.assert_array_equal(row, features[names.index(index.image_ids[image])])
    (tmp_path / "ids.txt").write_text("\n".join(names[1:] + ["other.jpg"]) + "\n")
    with pytest.raises(DataError, match="no features for 1 images of the split"):
        Batcher(sources["val"], vocabulary, PipelineOptions(batch_size=3, max_length=12),
                features=FeatureStore(tmp_path))
    (tmp_path / "ids.txt").write_text("just_one\n")
    with pytest.raises(DataError, match="ids.txt has 1 lines but features.npy has 5 rows"):
        FeatureStore(tmp_path)


def test_length_bucketing_pads_each_batch_to_its_longest_caption(sources, vocabulary):
    plain = PipelineOptions(batch_size=4, max_length=18, image_size=32, captions="all",
                            drop_remainder=True)
    bucketed = PipelineOptions(batch_size=4, max_length=18, image_size=32, captions="all",
                               drop_remainder=True, length_multiple=4, bucket_window=3)
    plain_batches = _all(Batcher(sources["train"], vocabulary, plain))
    batches = _all(Batcher(sources["train"], vocabulary, bucketed))
    assert len(batches) == len(plain_batches)
    widths = set()
    for batch in batches:
        width = batch["tokens"].shape[1]
        longest = max(int((row != 0).sum()) for row in batch["tokens"])
        assert width in (4, 8, 12, 16, 18) and longest <= width < longest + 4
        widths.add(width)
    assert len(widths) > 1 and sum(b["tokens"].shape[1] for b in batches) < 18 * len(batches)
    key = lambda bs: sorted((int(i), vocabulary.decode(t)) for b in bs  # noqa: E731
                            for i, t in zip(b["image_index"], b["tokens"]))
    assert key(batches) == key(plain_batches)  # the same examples, grouped by length
    shards = [_all(Batcher(sources["train"], vocabulary, PipelineOptions(
        batch_size=4, max_length=18, image_size=32, captions="all", drop_remainder=True,
        length_multiple=4, process_index=p, process_count=2))) for p in range(2)]
    assert [b["tokens"].shape for b in shards[0]] == [b["tokens"].shape for b in shards[1]]


@pytest.mark.parametrize("change, message", [
    (dict(captions="every"), "captions must be one of"),
    (dict(batch_size=0), "batch_size must be at least 1"),
    (dict(length_multiple=-4), "length_multiple at least 0"),
    (dict(batch_size=6, process_count=4), "not a multiple of the 4 processes"),
])
def test_options_that_cannot_make_batches_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        PipelineOptions(**{"batch_size": 4, "max_length": 12, **change})
