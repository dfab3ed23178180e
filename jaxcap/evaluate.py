"""``jaxcap evaluate``: decode a split with a trained run and score it the way papers do.

The split is read through the same pipeline as training's validation (cached
features or images, as the run was trained), decoded as one stream through
``ContinuousSearch``'s slots (beam search by default) and scored by
``jaxcap.metrics``: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D; on ``shapes`` also
content accuracy and attention correctness, on the split and on the ``novel``
split (colour-shape pairs never seen in training).

Writes ``RUN_DIR/eval_SPLIT.json`` (every figure and the search settings) and
``RUN_DIR/captions_SPLIT.json`` in the COCO results format
(``[{"image_id", "caption"}]``), and prints a table.
"""

from __future__ import annotations

import dataclasses
import re
import sys

import jax

from jaxcap.continuous import ContinuousSearch
from jaxcap.decode import SearchOptions
from jaxcap.files import write_json_atomic
from jaxcap.metrics import COCO_METRICS, caption_metrics, grounded_metrics, java_available
from jaxcap.runs import RunError, TrainedRun, load_run

TABLE_ROWS = [("bleu1", "BLEU-1"), ("bleu2", "BLEU-2"), ("bleu3", "BLEU-3"), ("bleu4", "BLEU-4"),
              ("meteor", "METEOR"), ("rougeL", "ROUGE-L"), ("cider", "CIDEr-D"),
              ("content_accuracy", "content accuracy"),
              ("object_precision", "object precision"), ("object_recall", "object recall"),
              ("attention_correctness", "attention correctness"),
              ("attention_uniform", "  (uniform attention)"), ("images", "images")]


@dataclasses.dataclass
class DecodedSplit:
    image_ids: list[str]
    references: list[list[str]]
    captions: list[str]
    scores: list[float]
    alphas: list  # per image (words, P): the attention each word was emitted under
    objects: list[list[dict]]  # per image; empty without grounding


def decode_split(run: TrainedRun, split: str, options: SearchOptions,
                 batch_size: int = 64) -> DecodedSplit:
    """Every image of ``split``, in order, captioned by ``run``'s best checkpoint."""
    # The data stack (TFDS, grain) is loaded here, when a split is read, not by importing
    # this module: serving and captioning files never need it.
    from jaxcap.data.pipeline import Batcher, model_inputs
    from jaxcap.data.prepare import pipeline_options, prepare_dataset, prepare_features

    config = run.config
    built = prepare_dataset(config)
    sources = built.as_data_source()
    if split not in sources:
        raise RunError(f"the {config.dataset.name} dataset has no split {split!r}; "
                       f"it has {sorted(sources)}")
    source = sources[split]
    devices = jax.local_device_count()
    _, options_eval = pipeline_options(config)
    options_eval = dataclasses.replace(options_eval, captions="sample",
                                       batch_size=-(-batch_size // devices) * devices,
                                       process_index=0, process_count=1)
    features = (None if run.reads_images else
                prepare_features(config, built, run.workdir / "encoder", split))
    batches = Batcher(source, run.vocabulary, options_eval, features)
    # The split as one stream through the slots: an image that is captioned leaves its
    # slot to the next one, across the pipeline's batches.
    search = ContinuousSearch(run.model, run.variables, run.vocabulary, options,
                              slots=options_eval.batch_size)
    rows = ((int(image), inputs) for batch in batches.epoch(0)
            for image, weight, inputs in zip(batch["image_index"], batch["weights"],
                                             model_inputs(batch)) if weight)
    decoded = {}
    for image, tokens, score, alphas in search.stream(rows):
        text = run.vocabulary.decode(tokens)
        decoded[image] = (text, float(score), alphas[:len(text.split())])
    index = batches.index
    order = sorted(decoded)
    assert order == list(range(len(index))), "every image is decoded once"
    return DecodedSplit(
        image_ids=index.image_ids, references=index.captions,
        captions=[decoded[i][0] for i in order], scores=[decoded[i][1] for i in order],
        alphas=[decoded[i][2] for i in order],
        objects=[index.objects[i] for i in order] if any(index.objects) else [])


def score_split(decoded: DecodedSplit, metrics=COCO_METRICS, tokenizer: str = "auto") -> dict:
    keys = range(len(decoded.image_ids))
    scores = caption_metrics({k: decoded.references[k] for k in keys},
                             {k: decoded.captions[k] for k in keys}, metrics, tokenizer)
    if decoded.objects:
        scores.update(grounded_metrics(decoded.captions, decoded.alphas, decoded.objects))
    scores["images"] = len(decoded.image_ids)
    return scores


def coco_results(decoded: DecodedSplit, dataset: str) -> list[dict]:
    """``[{"image_id", "caption"}]``; COCO's numeric ids where the file names carry them."""
    def image_id(name: str):
        match = re.search(r"_(\d+)\.jpg$", name) if dataset == "coco" else None
        return int(match.group(1)) if match else name

    return [{"image_id": image_id(name), "caption": caption}
            for name, caption in zip(decoded.image_ids, decoded.captions)]


def evaluate_run(run: TrainedRun, split: str, options: SearchOptions, batch_size: int = 64,
                 metrics=COCO_METRICS, tokenizer: str = "auto", log=None) -> dict:
    """Decodes and scores ``split`` (and ``novel`` on shapes); writes the result files."""
    log = log or (lambda message: print(message, file=sys.stderr))
    if tokenizer == "auto":
        tokenizer = "ptb" if java_available() else "python"
    if "meteor" in metrics and not java_available():
        log("warning: Java is not installed: METEOR is skipped, captions are tokenised in Python")
        metrics = [m for m in metrics if m != "meteor"]
    splits = [split]
    if run.config.dataset.name == "shapes" and split != "novel":
        splits.append("novel")
    report = {"workdir": str(run.workdir), "step": run.step, "split": split,
              "search": dataclasses.asdict(options), "tokenizer": tokenizer, "metrics": {}}
    for name in splits:
        try:
            decoded = decode_split(run, name, options, batch_size)
        except RunError:
            if name == split:
                raise
            continue  # a shapes dataset built without a novel split
        report["metrics"][name] = score_split(decoded, metrics, tokenizer)
        write_json_atomic(run.workdir / f"captions_{name}.json",
                    coco_results(decoded, run.config.dataset.name))
    write_json_atomic(run.workdir / f"eval_{split}.json", report)
    return report


def format_table(report: dict) -> str:
    splits = list(report["metrics"])
    lines = [f"{'metric':24s}" + "".join(f"{s:>10s}" for s in splits)]
    for key, label in TABLE_ROWS:
        values = [report["metrics"][s].get(key) for s in splits]
        if all(v is None for v in values):
            continue
        lines.append(f"{label:24s}" + "".join(
            f"{'-':>10s}" if v is None else f"{v:>10d}" if isinstance(v, int) else f"{v:>10.4f}"
            for v in values))
    return "\n".join(lines)


def main(args) -> int:
    """``jaxcap evaluate``: see ``jaxcap.cli``."""
    from jaxcap.caption import check_batch_size, search_options

    check_batch_size(args.batch_size)
    run = load_run(args.workdir, args.dtype)
    metrics = [m for m in COCO_METRICS if not (args.no_meteor and m == "meteor")]
    report = evaluate_run(run, args.split, search_options(args, run.config.eval.max_length),
                          args.batch_size, metrics)
    print(f"{report['workdir']}: best checkpoint (step {report['step']}), beam "
          f"{report['search']['beam_size']}, {report['tokenizer']} tokenizer")
    print(format_table(report))
    print(f"written: {run.workdir / f'eval_{args.split}.json'} and captions_<split>.json beside it",
          file=sys.stderr)
    return 0
