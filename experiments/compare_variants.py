"""Compare decoder variants fairly: same data, budget and seeds; one table, two plots.

    python experiments/compare_variants.py --config shapes \
        --variants none soft hard adaptive updown transformer --seeds 2 --out runs/compare \
        [--beam 3] [--no-meteor] [--config.KEY=VALUE ...]

Every variant is trained with each seed (``seed``, ``seed + 1``, ...) into
``OUT/runs/VARIANT-seedS`` by ``jaxcap.train.train_and_evaluate``, then its best
checkpoint is evaluated on the test split as ``jaxcap evaluate`` does (beam 3 by
default; on grounded data also content accuracy, object precision/recall where
the metrics have them, attention correctness and the ``novel`` split). The
``--config.KEY=VALUE`` overrides apply to every run.

Writes ``OUT/results.md`` (mean and spread over seeds of every metric, the
decoder's parameter count and training captions/s per variant), ``OUT/results.json``
(every run's figures), ``OUT/validation.png`` (validation BLEU-4 by epoch per
variant) and ``OUT/metrics.png`` (the test metrics with their spread).

Rerunning the same command skips runs that are finished (trained and
evaluated with the same search) and resumes the others from their last
checkpoint; runs are never started afresh behind the user's back.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from jaxcap import configs  # noqa: E402
from jaxcap.decode import SearchOptions  # noqa: E402
from jaxcap.evaluate import evaluate_run  # noqa: E402
from jaxcap.metrics import COCO_METRICS  # noqa: E402
from jaxcap.models.decoders import VARIANTS  # noqa: E402
from jaxcap.runs import load_run  # noqa: E402
from jaxcap.train import train_and_evaluate  # noqa: E402

# (key in the evaluation, column title); grounded ones appear where the data has them
COLUMNS = [("bleu1", "BLEU-1"), ("bleu2", "BLEU-2"), ("bleu3", "BLEU-3"), ("bleu4", "BLEU-4"),
           ("meteor", "METEOR"), ("rougeL", "ROUGE-L"), ("cider", "CIDEr-D"),
           ("content_accuracy", "content acc."), ("object_precision", "obj. precision"),
           ("object_recall", "obj. recall"), ("attention_correctness", "attention corr."),
           ("attention_uniform", "(uniform)")]
NOVEL_COLUMNS = [("bleu4", "novel BLEU-4"), ("content_accuracy", "novel content acc."),
                 ("attention_correctness", "novel attention corr.")]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="shapes", help="a built-in config name or a file")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=2, help="runs per variant")
    parser.add_argument("--out", required=True, help="folder for the runs and the results")
    parser.add_argument("--beam", type=int, default=3, help="beam size of the evaluation")
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (its JVM)")
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    args.overrides = overrides
    return args


def run_config(args, variant: str, seed_offset: int):
    config = configs.override(configs.load(args.config), args.overrides)
    config.decoder.variant = variant
    config.seed = config.seed + seed_offset
    return config


def train_captions_per_s(workdir: Path) -> float:
    """The median of the logged training rates (the first interval holds the compilation)."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["captions_per_s"] for r in records if "captions_per_s" in r]
    return statistics.median(rates[1:] or rates)


def validation_curve(workdir: Path) -> list[float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["bleu4"] for r in sorted((r for r in records if "val_loss" in r),
                                       key=lambda r: r["epoch"])]


def one_run(args, variant: str, seed_offset: int, log) -> dict:
    """Trains (or resumes) and evaluates one run; returns its figures."""
    config = run_config(args, variant, seed_offset)
    workdir = Path(args.out).absolute() / "runs" / f"{variant}-seed{config.seed}"
    options = SearchOptions(beam_size=args.beam, max_length=config.eval.max_length)
    metrics = [m for m in COCO_METRICS if not (args.no_meteor and m == "meteor")]
    done = workdir / "compare.json"
    wanted = {"search": dataclasses.asdict(options), "metrics": metrics}
    if done.exists() and json.loads(done.read_text())["settings"] == wanted:
        log(f"{workdir.name}: finished earlier, skipped")
        return json.loads(done.read_text())
    log(f"{workdir.name}: training")
    started = time.perf_counter()
    train_and_evaluate(config, workdir)
    log(f"{workdir.name}: evaluating (beam {args.beam})")
    run = load_run(workdir)
    report = evaluate_run(run, "test", options, config.eval.batch_size, metrics, log=log)
    figures = {
        "variant": variant, "seed": config.seed, "workdir": str(workdir), "settings": wanted,
        "parameters": sum(x.size for x in jax.tree.leaves(run.variables["params"]["decoder"])),
        "train_captions_per_s": train_captions_per_s(workdir),
        "validation_bleu4": validation_curve(workdir),
        "test": report["metrics"]["test"], "novel": report["metrics"].get("novel", {}),
        "wall_s": time.perf_counter() - started}
    partial = done.with_suffix(".partial")
    partial.write_text(json.dumps(figures, indent=2) + "\n")
    os.replace(partial, done)
    return figures


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def results_table(runs: list[dict], args) -> str:
    by_variant = {v: [r for r in runs if r["variant"] == v] for v in args.variants}
    columns = [(part, key, title) for part, cols in (("test", COLUMNS), ("novel", NOVEL_COLUMNS))
               for key, title in cols if any(key in r[part] for r in runs)]
    header = ["variant", "decoder parameters", "train captions/s",
              *(title for _, _, title in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for variant, group in by_variant.items():
        cells = [variant, f"{group[0]['parameters']:,}",
                 f"{statistics.mean(r['train_captions_per_s'] for r in group):.0f}"]
        cells += [_spread([r[part][key] for r in group]) if key in group[0][part] else "-"
                  for part, key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({r["seed"] for r in runs})
    overrides = " ".join(f"`--config.{o}`" for o in args.overrides) or "no overrides"
    note = (f"Test split, beam {args.beam}; mean ± standard deviation over seeds {seeds}. "
            f"Config `{args.config}` with {overrides}.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def plot(runs: list[dict], args, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for variant in args.variants:
        curves = [r["validation_bleu4"] for r in runs if r["variant"] == variant]
        epochs = min(len(c) for c in curves)
        mean = [statistics.mean(c[e] for c in curves) for e in range(epochs)]
        axes.plot(range(1, epochs + 1), mean, marker="o", label=variant)
        if len(curves) > 1:
            low = [min(c[e] for c in curves) for e in range(epochs)]
            high = [max(c[e] for c in curves) for e in range(epochs)]
            axes.fill_between(range(1, epochs + 1), low, high, alpha=0.2)
    axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes.set(xlabel="epoch", ylabel="validation BLEU-4 (greedy)",
             title="Validation by epoch (mean over seeds, band: min to max)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / "validation.png", dpi=100)
    plt.close(figure)

    keys = [(key, title) for key, title in COLUMNS
            if key != "attention_uniform" and all(key in r["test"] for r in runs)]
    figure, axes = plt.subplots(figsize=(max(7, 1.3 * len(keys)), 4.5))
    width = 0.8 / len(args.variants)
    for i, variant in enumerate(args.variants):
        group = [r for r in runs if r["variant"] == variant]
        means = [statistics.mean(r["test"][k] for r in group) for k, _ in keys]
        errors = [statistics.stdev(r["test"][k] for r in group) if len(group) > 1 else 0
                  for k, _ in keys]
        axes.bar([j + i * width for j in range(len(keys))], means, width, yerr=errors,
                 capsize=2, label=variant)
    axes.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))],
                    [title for _, title in keys], rotation=30, ha="right")
    axes.set(ylabel="test score", title=f"Test metrics, beam {args.beam} (error bars: std)")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(out / "metrics.png", dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    log = lambda message: print(f"compare: {message}", file=sys.stderr, flush=True)  # noqa: E731
    runs = [one_run(args, variant, seed, log)
            for variant in args.variants for seed in range(args.seeds)]
    (out / "results.json").write_text(json.dumps(runs, indent=2) + "\n")
    (out / "results.md").write_text("# Decoder variants compared\n\n" + results_table(runs, args))
    plot(runs, args, out)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
