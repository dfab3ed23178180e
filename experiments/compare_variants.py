"""Compare decoder variants fairly: same data, budget and seeds; one table, two plots.

    python experiments/compare_variants.py --config shapes \
        --variants none soft hard adaptive updown transformer --seeds 3 \
        --out experiments/results/shapes-variants [--beam 3] [--no-meteor] \
        [--primary bleu4] [--config.KEY=VALUE ...]

Every variant is trained with each seed (``seed``, ``seed + 1``, ...) by
``jaxcap.train.train_and_evaluate``, then its best checkpoint is evaluated on
the test split as ``jaxcap evaluate`` does (beam 3 by default; on grounded data
also content accuracy, object precision/recall, attention correctness and the
``novel`` split). The ``--config.KEY=VALUE`` overrides apply to every run.

A run is keyed on everything that determines it: the resolved config (all but
the folders where data and caches live), the dataset (name, version, split
sizes), the jaxcap version, the search and the metrics. Its folder is
``OUT/runs/VARIANT-seedS-DIGEST``, DIGEST that key's without the seed (the
recipe's, the same for every seed of a variant). Rerunning the same command
skips the runs that are finished and resumes the others from their last
checkpoint; a changed setting trains anew in a folder of its own (the log names
what differs from the run it replaces, which is kept). The runner resumes, so a
long comparison may be computed in several sittings.

Writes ``OUT/results.md`` (per variant: mean and 95% interval over seeds of each
metric, the decoder's parameter count and training captions/s, the recipe
digest and the source trees; which differences in the primary metric exceed
the seed spread, by Welch's t-test over seeds with Holm's correction; the
machine and the total time), ``OUT/results.json`` (every run's figures),
``OUT/validation.png`` (validation BLEU-4 by epoch per variant) and
``OUT/metrics.png`` (the test metrics with their spread).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from scipy import stats  # noqa: E402  (a dependency of JAX)

from jaxcap import __version__, configs  # noqa: E402
from jaxcap.data.builders import split_sizes  # noqa: E402
from jaxcap.data.prepare import prepare_dataset  # noqa: E402
from jaxcap.decode import SearchOptions  # noqa: E402
from jaxcap.evaluate import evaluate_run  # noqa: E402
from jaxcap.files import write_json_atomic  # noqa: E402
from jaxcap.metrics import COCO_METRICS  # noqa: E402
from jaxcap.models.decoders import VARIANTS  # noqa: E402
from jaxcap.runs import load_run  # noqa: E402
from jaxcap.train import train_and_evaluate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# (part, key in the evaluation, column title); those absent from every run are left out
COLUMNS = [("test", "bleu4", "BLEU-4"), ("test", "meteor", "METEOR"),
           ("test", "cider", "CIDEr-D"), ("test", "content_accuracy", "content acc."),
           ("test", "object_precision", "obj. precision"),
           ("test", "object_recall", "obj. recall"),
           ("test", "attention_correctness", "attention corr."),
           ("test", "attention_uniform", "(uniform)"),
           ("novel", "content_accuracy", "novel content acc.")]
# Where data and caches live: they do not change what a run computes.
LOCATIONS = (("dataset", "data_dir"), ("encoder", "features_dir"))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="shapes", help="a built-in config name or a file")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=3, help="runs per variant")
    parser.add_argument("--out", required=True, help="folder for the runs and the results")
    parser.add_argument("--beam", type=int, default=3, help="beam size of the evaluation")
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (its JVM)")
    parser.add_argument("--primary", default="bleu4",
                        help="the test metric whose differences are tested (default bleu4)")
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    args.overrides = overrides
    return args


def run_config(args, variant: str, seed_offset: int):
    config = configs.override(configs.load(args.config), args.overrides)
    config.decoder.variant = variant
    config.seed = config.seed + seed_offset
    return config


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:10]


def dataset_identity(config) -> dict:
    """The dataset a run reads: name, builder config, version and split sizes (it is
    built here if it is not yet, as training would)."""
    built = prepare_dataset(config)
    return {"name": config.dataset.name,
            "config": built.builder_config.name if built.builder_config else None,
            "version": str(built.info.version), "splits": split_sizes(built)}


def run_key(config, args, dataset: dict) -> dict:
    """Everything that determines a run's figures (``seed`` among the config's)."""
    resolved = json.loads(config.to_json_best_effort())
    for section, name in LOCATIONS:
        resolved[section].pop(name, None)
    search = SearchOptions(beam_size=args.beam, max_length=config.eval.max_length)
    return {"config": resolved, "dataset": dataset, "jaxcap_version": __version__,
            "search": dataclasses.asdict(search),
            "metrics": [m for m in COCO_METRICS if not (args.no_meteor and m == "meteor")]}


def recipe_digest(key: dict) -> str:
    """The key's digest without the seed: one per variant and recipe."""
    config = {name: value for name, value in key["config"].items() if name != "seed"}
    return digest({**key, "config": config})


def differences(old, new, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every setting that differs between two keys."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for name in sorted(old.keys() | new.keys())
                for line in differences(old.get(name), new.get(name), f"{prefix}{name}.")]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def source_tree() -> str:
    """The commit the code runs from (with ``-dirty`` when it has changes), or the version."""
    try:
        return subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty",
                               "--abbrev=12"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"jaxcap {__version__} (not a git checkout)"


def machine() -> str:
    """The CPU's model name, as ``lscpu`` gives it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def train_captions_per_s(workdir: Path) -> float:
    """The median of the logged training rates (the first interval holds the compilation)."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["captions_per_s"] for r in records if "captions_per_s" in r]
    return statistics.median(rates[1:] or rates)


def validation_curve(workdir: Path) -> list[float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["bleu4"] for r in sorted((r for r in records if "val_loss" in r),
                                       key=lambda r: r["epoch"])]


def _read(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _write(path: Path, value) -> None:
    write_json_atomic(path, value, indent=2)


def one_run(args, variant: str, seed_offset: int, dataset: dict, log) -> dict:
    """Trains (or resumes) and evaluates one run; returns its figures."""
    config = run_config(args, variant, seed_offset)
    key = run_key(config, args, dataset)
    recipe = recipe_digest(key)
    runs = Path(args.out).absolute() / "runs"
    name = f"{variant}-seed{config.seed}"
    workdir = runs / f"{name}-{recipe}"
    done = _read(workdir / "compare.json")
    if done is not None and done["key"] == key:
        log(f"{workdir.name}: finished earlier, skipped")
        return done
    for other in sorted(runs.glob(f"{name}-*")):
        earlier = _read(other / "compare_key.json")
        if other != workdir and earlier is not None:
            log(f"{name}: settings differ from {other.name} "
                f"({'; '.join(differences(earlier, key)[:5])}); it is kept, and this run "
                f"trains anew in {workdir.name}")
    workdir.mkdir(parents=True, exist_ok=True)
    _write(workdir / "compare_key.json", key)
    trees = (_read(workdir / "compare_trees.json") or []) + [source_tree()]
    _write(workdir / "compare_trees.json", list(dict.fromkeys(trees)))
    log(f"{workdir.name}: training")
    started, load = time.perf_counter(), os.getloadavg()[0]
    train_and_evaluate(config, workdir)
    log(f"{workdir.name}: evaluating (beam {args.beam})")
    run = load_run(workdir)
    options = SearchOptions(beam_size=args.beam, max_length=config.eval.max_length)
    report = evaluate_run(run, "test", options, config.eval.batch_size, key["metrics"], log=log)
    figures = {
        "variant": variant, "seed": config.seed, "workdir": str(workdir.relative_to(
            Path(args.out).absolute())), "key": key, "recipe_digest": recipe,
        "source_trees": _read(workdir / "compare_trees.json"), "machine": machine(),
        "load_at_start": load,
        "parameters": sum(x.size for x in jax.tree.leaves(run.variables["params"]["decoder"])),
        "train_captions_per_s": train_captions_per_s(workdir),
        "validation_bleu4": validation_curve(workdir),
        "test": report["metrics"]["test"], "novel": report["metrics"].get("novel", {}),
        "wall_s": time.perf_counter() - started}
    _write(workdir / "compare.json", figures)
    jax.clear_caches()  # the next run compiles programs of its own
    return figures


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval (Student's t over seeds; 0 for one)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, 0.0
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, float(half)


def _cell(values: list[float]) -> str:
    mean, half = interval(values)
    return f"{mean:.3f}" if len(values) < 2 else f"{mean:.3f} ± {half:.3f}"


def significant_differences(runs: list[dict], variants: list[str], metric: str) -> list[dict]:
    """Every pair of variants on the test ``metric``: Welch's t-test over their seeds, the
    p-values adjusted by Holm's step-down method over all pairs."""
    values = {v: [r["test"][metric] for r in runs if r["variant"] == v] for v in variants}
    pairs = []
    for a, b in itertools.combinations(variants, 2):
        if len(values[a]) < 2 or len(values[b]) < 2:
            continue
        test = stats.ttest_ind(values[a], values[b], equal_var=False)
        p = float(test.pvalue) if test.pvalue == test.pvalue else 1.0  # equal constants: NaN
        pairs.append({"a": a, "b": b, "difference": statistics.mean(values[a]) -
                      statistics.mean(values[b]), "p": p})
    order = sorted(range(len(pairs)), key=lambda i: pairs[i]["p"])
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pairs) - rank) * pairs[i]["p"]))
        pairs[i]["p_holm"] = running
    return pairs


def results_table(runs: list[dict], args) -> str:
    by_variant = {v: [r for r in runs if r["variant"] == v] for v in args.variants}
    columns = [(part, key, title) for part, key, title in COLUMNS
               if any(key in r[part] for r in runs)]
    header = ["variant", *(title for _, _, title in columns), "decoder parameters",
              "train captions/s", "recipe"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for variant, group in by_variant.items():
        cells = [variant]
        cells += [_cell([r[part][key] for r in group]) if all(key in r[part] for r in group)
                  else "-" for part, key, _ in columns]
        cells += [f"{group[0]['parameters']:,}",
                  f"{statistics.mean(r['train_captions_per_s'] for r in group):.0f}",
                  f"`{group[0]['recipe_digest']}`"]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({r["seed"] for r in runs})
    overrides = " ".join(f"`--config.{o}`" for o in args.overrides) or "no overrides"
    return "\n".join(lines) + "\n\n" + (
        f"Test split (and `novel`: colour-shape pairs never seen in training), beam "
        f"{args.beam}; mean ± half-width of the 95% interval (Student's t) over seeds "
        f"{seeds}. Config `{args.config}` with {overrides}. `recipe`: the digest of "
        f"everything a run's figures depend on but its seed (`results.json` has each run's "
        f"whole key).\n")


def significance_section(runs: list[dict], args) -> str:
    pairs = significant_differences(runs, args.variants, args.primary)
    if not pairs:
        return ""
    lines = [f"## Which differences exceed the seed spread ({args.primary})", "",
             f"Welch's t-test over seeds for every pair of variants, p-values adjusted for "
             f"{len(pairs)} comparisons by Holm's method; a difference is marked where the "
             f"adjusted p is below 0.05.", "",
             "| variants | difference | p | p (Holm) | exceeds the seed spread |",
             "| --- | --- | --- | --- | --- |"]
    for pair in sorted(pairs, key=lambda pair: pair["p"]):
        lines.append(f"| {pair['a']} - {pair['b']} | {pair['difference']:+.3f} | "
                     f"{pair['p']:.3g} | {pair['p_holm']:.3g} | "
                     f"{'yes' if pair['p_holm'] < 0.05 else 'no'} |")
    return "\n".join(lines) + "\n"


def provenance_section(runs: list[dict], args) -> str:
    trees = sorted({tree for r in runs for tree in r["source_trees"]})
    machines = sorted({r["machine"] for r in runs})
    total = sum(r["wall_s"] for r in runs)
    command = " ".join(["python experiments/compare_variants.py", "--config", args.config,
                        "--variants", *args.variants, "--seeds", str(args.seeds),
                        "--out", args.out, "--beam", str(args.beam),
                        *(["--no-meteor"] if args.no_meteor else []),
                        *([f"--primary {args.primary}"] if args.primary != "bleu4" else []),
                        *(f"--config.{o}" for o in args.overrides)])
    return "\n".join([
        "## How these were made", "",
        f"- Command: `{command}`",
        f"- Machine: {', '.join(machines)} ({os.cpu_count()} cores where the table was "
        f"written)",
        f"- Total time: {total / 3600:.2f} h of training and evaluation over {len(runs)} runs "
        f"(each run's in `results.json`, with the load average when it started)",
        f"- Source trees: {', '.join(f'`{t}`' for t in trees)}", ""])


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

    keys = [(part, key, title) for part, key, title in COLUMNS
            if key != "attention_uniform" and all(key in r[part] for r in runs)]
    figure, axes = plt.subplots(figsize=(max(7, 1.3 * len(keys)), 4.5))
    width = 0.8 / len(args.variants)
    for i, variant in enumerate(args.variants):
        group = [r for r in runs if r["variant"] == variant]
        spread = [interval([r[part][k] for r in group]) for part, k, _ in keys]
        axes.bar([j + i * width for j in range(len(keys))], [m for m, _ in spread], width,
                 yerr=[h for _, h in spread], capsize=2, label=variant)
    axes.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))],
                    [title for _, _, title in keys], rotation=30, ha="right")
    axes.set(ylabel="score", title=f"Test metrics, beam {args.beam} (error bars: 95% interval)")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(out / "metrics.png", dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    log = lambda message: print(f"compare: {message}", file=sys.stderr, flush=True)  # noqa: E731
    dataset = dataset_identity(run_config(args, args.variants[0], 0))
    runs = [one_run(args, variant, seed, dataset, log)
            for variant in args.variants for seed in range(args.seeds)]
    if any(args.primary not in r["test"] for r in runs):
        raise SystemExit(f"compare: --primary {args.primary} is not a test metric of these runs")
    _write(out / "results.json", runs)
    (out / "results.md").write_text("\n".join([
        "# Decoder variants compared", "", results_table(runs, args),
        significance_section(runs, args), provenance_section(runs, args)]))
    plot(runs, args, out)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
