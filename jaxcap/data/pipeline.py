"""The input pipeline: grain over a TFDS data source, to fixed-shape host batches.

One split of one dataset becomes, per epoch, a deterministic sequence of
batches, each a dict of numpy arrays with a leading batch axis (this process's
share of ``batch_size``):

* ``tokens`` (B, max_length) int32: ``<start> words <end> <pad>...``
* ``weights`` (B,) float32: 1 for real examples, 0 for the padding that fills
  the last batch (evaluation never drops data);
* ``image_index`` (B,) int32: the example's image in the split (-1 on padding);
* ``features`` (B, H, W, C) from ``jaxcap extract``'s ``features.npy`` joined by
  image id (memory-mapped, read row by row), or ``image`` (B, S, S, 3) uint8
  decoded with ``jaxcap.data.images`` (normalisation happens on the device).

Order: a permutation drawn from (seed, epoch), so a run that restarts at epoch
``e``, batch ``k`` sees exactly the batches it would have seen. ``batch_size``
is the global batch: with several JAX processes (multi-host) process ``p`` takes
the ``p``-th contiguous slice of every global batch, so the global batches, and
the examples each device sees, do not depend on how many processes share them.
Captions: ``sample`` draws one caption per image per epoch (from seed, epoch and
image); ``all`` makes every caption its own example.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import grain
import numpy as np

from jaxcap.data.images import load_image
from jaxcap.data.readers import DataError
from jaxcap.data.text import Vocabulary

CAPTION_MODES = ("sample", "all")
PADDING = (-1, -1)  # the (image, caption) pair that fills the last batch


class FeatureStore:
    """``features.npy`` + ``ids.txt`` of ``jaxcap extract``, looked up by image id."""

    def __init__(self, features_dir: str | os.PathLike):
        self.directory = Path(features_dir)
        try:
            self.array = np.load(self.directory / "features.npy", mmap_mode="r")
            names = (self.directory / "ids.txt").read_text(encoding="utf8").splitlines()
        except (OSError, ValueError) as error:
            raise DataError(f"{self.directory}: no readable features.npy and ids.txt "
                            f"(run 'jaxcap extract' first): {error}") from None
        if len(names) != len(self.array):
            raise DataError(f"{self.directory}: ids.txt has {len(names)} lines but "
                            f"features.npy has {len(self.array)} rows")
        self.rows = {name: row for row, name in enumerate(names)}

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])

    def check(self, image_ids: list[str]) -> None:
        missing = [i for i in image_ids if i not in self.rows]
        if missing:
            raise DataError(f"{self.directory}: no features for {len(missing)} images of the "
                            f"split, e.g. {missing[:3]}; extract them with 'jaxcap extract'")

    def __getitem__(self, image_id: str) -> np.ndarray:
        return np.array(self.array[self.rows[image_id]])


class SplitIndex:
    """Image ids, captions and annotated objects of one split, read once (images are
    read per batch)."""

    def __init__(self, source):
        self.source = source
        self.image_ids: list[str] = []
        self.captions: list[list[str]] = []
        self.objects: list[list[dict]] = []  # empty lists for datasets without grounding
        for i in range(len(source)):
            record = source[i]
            self.image_ids.append(record_text(record["image_id"]))
            self.captions.append([record_text(c) for c in record["captions"]])
            objects = record["objects"]
            self.objects.append([{"colour": record_text(c), "shape": record_text(s), "box": box}
                                 for c, s, box in zip(objects["colour"], objects["shape"],
                                                      objects["box"])])

    def __len__(self) -> int:
        return len(self.image_ids)


def record_text(value) -> str:
    """A TFDS text field as ``str`` (data sources return bytes)."""
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    batch_size: int
    max_length: int
    seed: int = 0
    captions: str = "sample"
    shuffle: bool = True
    drop_remainder: bool = False
    image_size: int = 224
    resize: str = "direct"
    length_multiple: int = 0  # > 0: pad each batch to its longest caption, rounded up to this
    bucket_window: int = 20  # batches sorted together by length when bucketing
    num_threads: int = 8
    prefetch: int = 64
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        if self.captions not in CAPTION_MODES:
            raise ValueError(f"captions must be one of {CAPTION_MODES}, got {self.captions!r}")
        if self.batch_size < 1 or self.length_multiple < 0:
            raise ValueError(f"batch_size must be at least 1 and length_multiple at least 0, "
                             f"got {self.batch_size} and {self.length_multiple}")
        if self.batch_size % self.process_count:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of the "
                             f"{self.process_count} processes")

    @property
    def process_batch_size(self) -> int:
        """This process's slice of each global batch."""
        return self.batch_size // self.process_count


class EpochExamples:
    """Random access to the (image, caption, padded length) examples of one epoch.

    A grain ``MapDataset`` source: ``__getitem__(k)`` is example ``k`` of this
    process's shard, already padded to whole global batches (so every process
    gets the same number of batches).

    Length bucketing (training, ``length_multiple > 0``): the shuffled order is
    cut into windows of ``bucket_window`` batches, each window is sorted by
    caption length and cut into batches, and the batches are shuffled again.
    A batch is padded only to its longest caption, rounded up to a multiple of
    ``length_multiple`` (so few shapes compile); the steps a fixed
    ``max_length`` would spend on padding are not spent. The number of batches
    per epoch does not change, and every process's batch ``k`` comes from the
    same global group, so all processes run the same shape.
    """

    def __init__(self, index: SplitIndex, lengths: list[list[int]], options: PipelineOptions,
                 epoch: int):
        rng = np.random.default_rng([options.seed, epoch])
        if options.captions == "all":
            pairs = [(i, c) for i, caps in enumerate(index.captions) for c in range(len(caps))]
        else:
            picks = rng.random(len(index))
            pairs = [(i, int(p * len(caps))) for i, (p, caps) in enumerate(zip(picks, index.captions))]
        order = rng.permutation(len(pairs)) if options.shuffle else np.arange(len(pairs))
        per_batch = options.batch_size  # global
        whole = len(pairs) // per_batch if options.drop_remainder else -(-len(pairs) // per_batch)
        ordered = [pairs[order[p]] if p < len(pairs) else PADDING
                   for p in range(whole * per_batch)]
        length_of = lambda pair: lengths[pair[0]][pair[1]] if pair != PADDING else 0  # noqa: E731
        sized = [(*pair, options.max_length) for pair in ordered]
        if options.length_multiple and options.drop_remainder:
            window = per_batch * max(1, options.bucket_window)
            for start in range(0, len(ordered), window):
                ordered[start:start + window] = sorted(ordered[start:start + window], key=length_of)
            groups = [ordered[g * per_batch:(g + 1) * per_batch] for g in range(whole)]
            sized = []
            for g in rng.permutation(whole):
                longest = max(length_of(pair) for pair in groups[g])
                padded = min(options.max_length, -(-longest // options.length_multiple)
                             * options.length_multiple)
                sized += [(*pair, padded) for pair in groups[g]]
        share = options.process_batch_size
        first = options.process_index * share
        self.pairs = [pair for start in range(0, len(sized), per_batch)
                      for pair in sized[start + first:start + first + share]]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int):
        return self.pairs[k]


class Batcher:
    """Turns examples into batches for one split; ``epoch(e)`` iterates one epoch."""

    def __init__(self, source, vocabulary: Vocabulary, options: PipelineOptions,
                 features: FeatureStore | None = None, index: SplitIndex | None = None):
        self.source = source
        self.index = index or SplitIndex(source)
        self.vocabulary = vocabulary
        self.options = options
        self.features = features
        if features is not None:
            features.check(self.index.image_ids)
        self.lengths = [[len(vocabulary.encode(c, options.max_length)) for c in caps]
                        for caps in self.index.captions]

    def _examples(self, epoch: int) -> EpochExamples:
        return EpochExamples(self.index, self.lengths, self.options, epoch)

    def num_batches(self, epoch: int = 0) -> int:
        return len(self._examples(epoch)) // self.options.process_batch_size

    def _example(self, entry):
        image, caption, length = entry
        padding = (image, caption) == PADDING
        options = self.options
        if padding:
            tokens = np.zeros(length, np.int32)
        else:
            tokens = self.vocabulary.encode_padded(self.index.captions[image][caption], length)
        example = {"tokens": tokens, "weights": np.float32(not padding),
                   "image_index": np.int32(image)}
        if self.features is not None:
            example["features"] = (np.zeros(self.features.shape, self.features.array.dtype)
                                   if padding else self.features[self.index.image_ids[image]])
        elif padding:
            example["image"] = np.zeros((options.image_size, options.image_size, 3), np.uint8)
        else:
            data = self.source[image]["image"].tobytes()
            example["image"] = load_image(data, options.image_size, options.resize)
        return example

    @staticmethod
    def _stack(examples):
        return {key: np.stack([e[key] for e in examples]) for key in examples[0]}

    def epoch(self, epoch: int, start_batch: int = 0):
        """Batches of ``epoch`` from ``start_batch`` on (for exact resumption)."""
        examples = self._examples(epoch)
        dataset = (grain.MapDataset.source(examples)
                   .map(self._example)
                   .batch(self.options.process_batch_size, batch_fn=self._stack))
        dataset = dataset[start_batch:]
        read = grain.ReadOptions(num_threads=self.options.num_threads,
                                 prefetch_buffer_size=self.options.prefetch)
        return iter(dataset.to_iter_dataset(read))


def model_inputs(batch):
    """What the model reads of a batch: its cached features, or its images."""
    return batch["features"] if "features" in batch else batch["image"]
