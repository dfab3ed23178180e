"""``jaxcap caption``: caption image files with a trained run.

The run directory says everything: the best checkpoint, the vocabulary, the
encoder and how its images were prepared (size, resize policy,
normalisation). Images are decoded by a thread pool and captioned through
``ContinuousSearch``'s slots (``--batch-size`` of them, on all local devices: an
image that is captioned leaves its slot to the next one), and written as JSON
lines ``{"image", "caption", "score"}`` in the order
given. An unusable file is reported on stderr with the reason and skipped.

``--attention-dir`` adds one PNG per image in the Show, Attend and Tell style:
the image, then one panel per word with the attention it was emitted under,
upsampled from the feature grid and laid over the image.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from jaxcap.continuous import ContinuousSearch
from jaxcap.decode import SearchOptions
from jaxcap.data.images import load_or_reason
from jaxcap.errors import UserError
from jaxcap.extract import list_images
from jaxcap.runs import load_run

PANEL = 224  # pixels per panel side in attention figures
LABEL = 20  # pixels under each panel for its word
COLUMNS = 5


class CaptionError(UserError):
    """Arguments that cannot be used; the message says what to do."""


def attention_figure(image: np.ndarray, words: list[str], alphas: np.ndarray,
                     columns: int = COLUMNS) -> Image.Image:
    """The image, then one panel per word: ``alphas`` (words, P) over a square grid.

    ``image`` is what the model saw, at any square size; panels are ``PANEL``
    pixels with the word written under each (``panel_label``), ``columns``
    panels per row; each panel's attention is scaled to its own maximum.
    """
    grid = math.isqrt(alphas.shape[-1])
    if grid * grid != alphas.shape[-1] or len(alphas) < len(words):
        raise ValueError(f"need one square attention map per word, got {alphas.shape} for "
                         f"{len(words)} words")
    picture = np.asarray(Image.fromarray(image).resize((PANEL, PANEL), Image.Resampling.BICUBIC),
                         np.float32)
    panels = [(Image.fromarray(picture.astype(np.uint8)), "")]
    for word, alpha in zip(words, alphas):
        heat = Image.fromarray(alpha.reshape(grid, grid).astype(np.float32), mode="F")
        heat = np.asarray(heat.resize((PANEL, PANEL), Image.Resampling.BILINEAR))
        heat = heat / max(float(heat.max()), 1e-12)
        shaded = picture * (0.15 + 0.85 * heat[..., None])  # unattended regions fade to black
        panels.append((Image.fromarray(np.clip(shaded, 0, 255).astype(np.uint8)),
                       panel_label(word, alpha)))
    columns = min(columns, len(panels))
    rows = -(-len(panels) // columns)
    figure = Image.new("RGB", (columns * PANEL, rows * (PANEL + LABEL)), "white")
    draw = ImageDraw.Draw(figure)
    for index, (panel, word) in enumerate(panels):
        x, y = (index % columns) * PANEL, (index // columns) * (PANEL + LABEL)
        figure.paste(panel, (x, y))
        draw.text((x + 4, y + PANEL + 4), word, fill="black")
    return figure


def panel_label(word: str, alpha: np.ndarray) -> str:
    """The word, and the share of attention on the image where the decoder could look
    elsewhere (``adaptive``'s sentinel takes the rest)."""
    share = float(np.sum(alpha))
    return word if share > 0.995 else f"{word} ({share:.0%} image)"


def gather_images(arguments: list[str]) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
    """``(name, path)`` of every file named or inside a named folder; and the missing ones."""
    found, missing = [], []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found += [(str(path / name), file) for name, file in list_images(path)]
        elif path.is_file():
            found.append((argument, path))
        else:
            missing.append((argument, "no such file or directory"))
    return found, missing


def _figure_names(names: list[str]) -> dict[str, str]:
    """A distinct ``.png`` name per image (``a/x.jpg`` and ``b/x.jpg`` both have stem x)."""
    taken: dict[str, int] = {}
    out = {}
    for name in names:
        stem = Path(name).stem
        taken[stem] = taken.get(stem, 0) + 1
        out[name] = f"{stem}.png" if taken[stem] == 1 else f"{stem}-{taken[stem]}.png"
    return out


def caption_images(search, size: int, resize: str, images: list[tuple[str, Path]],
                   batch_size: int = 64, attention_dir: str | os.PathLike | None = None,
                   write=print, report=None, workers: int = 8) -> tuple[int, int]:
    """Captions ``images`` in order with ``search`` (a ``ContinuousSearch`` or an exported
    captioner's: anything with ``stream``), prepared at ``size`` by ``resize``,
    ``write``-ing one JSON line each; returns (done, skipped). Unusable files go to
    ``report(name, reason)`` and are skipped.
    """
    report = report or (lambda name, reason: print(f"skipped {name}: {reason}", file=sys.stderr))
    figures = _figure_names([name for name, _ in images])
    if attention_dir is not None:
        attention_dir = Path(attention_dir)
        attention_dir.mkdir(parents=True, exist_ok=True)
    done, skipped = 0, [0]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        readable = _readable(images, size, resize, pool, batch_size, report, skipped)
        for (name, path), tokens, score, alphas in search.stream(readable):
            text = search.vocabulary.decode(tokens)
            write(json.dumps({"image": name, "caption": text, "score": float(score)}))
            if attention_dir is not None:
                words = text.split()
                picture, _, _ = load_or_reason(path, PANEL, resize)  # what the model saw, sharper
                attention_figure(picture, words, alphas[:len(words)]).save(
                    attention_dir / figures[name])
            done += 1
    return done, skipped[0]


def _readable(images, size: int, resize: str, pool, ahead: int, report, skipped):
    """``((name, path), pixels)`` of every usable image, decoded ``ahead`` at a time by
    ``pool``; the others go to ``report`` and are counted in ``skipped[0]``."""
    for start in range(0, len(images), ahead):
        chunk = images[start:start + ahead]
        for (name, path), (pixels, error, _) in zip(chunk, pool.map(
                lambda item: load_or_reason(item[1], size, resize), chunk)):
            if error is None:
                yield (name, path), pixels
            else:
                report(name, error)
                skipped[0] += 1


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise CaptionError("--batch-size must be at least 1")


# The search flags and the options they set (jaxcap.cli._add_search_options).
SEARCH_FLAGS = {"beam": "beam_size", "max_length": "max_length", "min_length": "min_length",
                "length_penalty": "length_penalty", "no_repeat_ngram": "no_repeat_ngram",
                "temperature": "temperature", "top_k": "top_k", "seed": "seed"}


def given_search_flags(args) -> dict:
    """``{option: value}`` of the search flags given on the command line."""
    return {option: getattr(args, flag) for flag, option in SEARCH_FLAGS.items()
            if getattr(args, flag, None) is not None}


def search_options(args, max_length: int) -> SearchOptions:
    """The search options of the ``caption``, ``evaluate``, ``serve`` and ``export`` command
    lines: the flags given, the command's beam and ``max_length`` (the run's) otherwise."""
    try:
        return SearchOptions(**{"beam_size": args.default_beam, "max_length": max_length,
                                **given_search_flags(args)})
    except ValueError as error:
        raise CaptionError(str(error)) from None


def check_exported_search(args, search: SearchOptions) -> None:
    """An exported captioner decodes with its own search: a flag that asks for another one
    is an error naming it."""
    for flag, option in SEARCH_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None and value != getattr(search, option):
            raise CaptionError(f"--{flag.replace('_', '-')} {value}: the exported captioner "
                               f"decodes with {option}={getattr(search, option)} (export it "
                               f"again to decode otherwise)")


def _search(args):
    """``(search, image size, resize rule, what was loaded)`` of the command line."""
    if args.exported:
        from jaxcap.export import ExportedSearch

        search = ExportedSearch(args.exported, max_batch=args.batch_size)
        check_exported_search(args, search.options)
        return search, search.image_size, search.resize, args.exported
    run = load_run(args.workdir, args.dtype)
    # Through slots: an image that is captioned leaves its slot to the next one.
    search = ContinuousSearch(run.image_model, run.image_variables, run.vocabulary,
                              search_options(args, run.config.eval.max_length),
                              slots=args.batch_size)
    config = run.config
    return (search, config.encoder.image_size, config.encoder.resize,
            f"{run.workdir} (step {run.step})")


def main(args) -> int:
    """``jaxcap caption``: see ``jaxcap.cli``."""
    check_batch_size(args.batch_size)
    search, size, resize, source = _search(args)
    images, missing = gather_images(args.images)
    for name, reason in missing:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    output = Path(args.output) if args.output else None
    partial = output.with_name(output.name + ".partial") if output else None
    handle = open(partial, "w", encoding="utf8") if output else sys.stdout
    try:
        done, skipped = caption_images(
            search, size, resize, images, args.batch_size, args.attention_dir,
            write=lambda line: print(line, file=handle, flush=output is None))
    finally:
        if output:
            handle.close()
    if output:
        os.replace(partial, output)  # a finished file or none: an old one is never half-replaced
    print(f"captioned {done} images with {source}; skipped {skipped + len(missing)}",
          file=sys.stderr)
    return 0 if done or not (skipped or missing) else 1
