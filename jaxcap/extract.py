"""``jaxcap extract``: folders of images to spatial feature grids.

Output, in ``FEAT_DIR``::

    features.npy   (N, H, W, C), readable with numpy.load(..., mmap_mode='r')
    ids.txt        the N image names, one per line, in the same order
    skipped.tsv    name <TAB> reason, for every file that is not a usable image
    extract.json   settings, encoder metadata and progress (the resume record)

A file that could not be read for a reason that may pass (an I/O error, a
permission, a network mount that went away) is not skipped for good: the run
ends without ``features.npy``, lists those files in ``retryable.tsv`` and says
so, and the same command run again reads them again (and only them).

Batches have one fixed shape (the last is padded), so the model compiles once,
and each batch is split across all local devices. Images are decoded by a
thread pool while the devices run the previous batch. After every batch the
rows are flushed and ``extract.json`` is replaced atomically, so an interrupted
run, started again with the same arguments, continues where it stopped and
ends with the same files as an uninterrupted one.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from jaxcap.data.images import load_or_reason
from jaxcap.errors import UserError
from jaxcap.files import write_json_atomic, write_text_atomic
from jaxcap.models.encoder import build_encoder, load_encoder, weights_identity
from jaxcap.models.preprocessing import normalize
from jaxcap.models.resnet import output_channels, output_size

RECORD_FILE = "extract.json"
PARTIAL_FILE = "features.partial.npy"
DTYPES = {"float32": np.float32, "float16": np.float16}


class ExtractError(UserError):
    """A user mistake in the arguments or the output folder; the message says what to do."""


class RetryableError(ExtractError):
    """Some files could not be read for a reason that may pass; rerunning retries them."""


def list_images(images: str | os.PathLike) -> list[tuple[str, Path]]:
    """``(name, path)`` of every candidate image.

    A directory gives every non-hidden file below it (names relative to it, so
    that non-images are reported rather than silently ignored); a text file
    gives one path per line, relative to the list file's folder, named as
    written.
    """
    images = Path(images)
    if images.is_dir():
        paths = sorted(p for p in images.rglob("*")
                       if p.is_file() and not any(part.startswith(".")
                                                  for part in p.relative_to(images).parts))
        entries = [(p.relative_to(images).as_posix(), p) for p in paths]
    elif images.is_file():
        try:
            lines = images.read_text(encoding="utf8").splitlines()
        except UnicodeDecodeError as error:
            raise ExtractError(f"{images}: the image list is not UTF-8 text ({error})") from None
        entries = [(line.strip(), images.parent / line.strip()) for line in lines if line.strip()]
    else:
        raise ExtractError(f"{images}: no such directory or image list")
    if not entries:
        raise ExtractError(f"{images}: no image files found")
    return entries


def make_feature_fn(module, variables, style: str, out_dtype, devices):
    """A jitted ``uint8 images -> features`` whose batch is split over ``devices``."""
    mesh = Mesh(np.asarray(devices), ("batch",))
    batch_sharding = NamedSharding(mesh, PartitionSpec("batch"))
    replicated = NamedSharding(mesh, PartitionSpec())
    variables = jax.device_put(variables, replicated)

    @jax.jit
    def features(variables, images):
        return module.apply(variables, normalize(images, style), train=False).astype(out_dtype)

    def run(images: np.ndarray):
        return features(variables, jax.device_put(images, batch_sharding))

    return run


def _tsv(items) -> str:
    return "".join(f"{name}\t{reason}\n" for name, reason in items)


def extract(weights: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike,
            batch_size: int = 32, image_size: int = 224, grid: int | None = None,
            stage: int = 4, resize: str = "direct", dtype: str = "float32",
            workers: int | None = None, progress: bool = True, log=print) -> dict:
    """Extracts features of ``images`` (a folder or list file) into ``out``."""
    return extract_entries(weights, list_images(images), out, batch_size=batch_size,
                           image_size=image_size, grid=grid, stage=stage, resize=resize,
                           dtype=dtype, workers=workers, progress=progress, log=log)


def extract_entries(weights: str | os.PathLike, entries: list, out: str | os.PathLike,
                    batch_size: int = 32, image_size: int = 224, grid: int | None = None,
                    stage: int = 4, resize: str = "direct", dtype: str = "float32",
                    workers: int | None = None, progress: bool = True, log=print) -> dict:
    """Extracts features of ``entries``, ``(name, path or bytes-returning function)``
    pairs, into ``out``; returns the summary record (see the module's docstring)."""
    if dtype not in DTYPES:
        raise ExtractError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    for flag, value in (("--batch-size", batch_size), ("--image-size", image_size),
                        ("--grid", 1 if grid is None else grid)):
        if value < 1:
            raise ExtractError(f"{flag} must be at least 1, got {value}")
    out = Path(out)
    metadata, variables = load_encoder(weights)
    devices = jax.local_devices()
    # Every device gets the same share of every batch.
    batch_size = -(-batch_size // len(devices)) * len(devices)
    side = output_size(image_size, stage) if grid is None else grid
    row_shape = (side, side, output_channels(metadata["depth"], stage))
    settings = dict(image_size=image_size, grid=grid, stage=stage, resize=resize, dtype=dtype,
                    batch_size=batch_size)
    fingerprint = hashlib.sha256(json.dumps(
        [settings, weights_identity(metadata), [name for name, _ in entries]],
        sort_keys=True).encode()).hexdigest()

    out.mkdir(parents=True, exist_ok=True)
    record_path = out / RECORD_FILE
    record = dict(fingerprint=fingerprint, settings=settings, encoder=metadata,
                  total=len(entries), done=0, skipped=[], retryable=[], complete=False)
    if record_path.exists():
        previous = json.loads(record_path.read_text())
        if previous.get("fingerprint") != fingerprint:
            raise ExtractError(
                f"{out} holds features from other images, weights or settings; nothing was "
                "changed. Use a new --out, or delete that folder to start again.")
        record = {"retryable": [], **previous}  # records of jaxcap <= 0.2.0 have none
        if record["complete"]:
            log(f"{out}: already complete ({record['total'] - len(record['skipped'])} images)")
            return record
    elif (out / "features.npy").exists():
        raise ExtractError(f"{out}/features.npy exists without {RECORD_FILE}; nothing was "
                           "changed. Use a new --out.")

    partial_path = out / PARTIAL_FILE
    # Stopped after the rows were moved into place but before the record said so.
    moved = record["done"] == len(entries) and not partial_path.exists()
    if not moved:
        if record["done"] == 0 or not partial_path.exists():
            record.update(done=0, skipped=[], retryable=[])
            rows = np.lib.format.open_memmap(partial_path, mode="w+", dtype=DTYPES[dtype],
                                             shape=(len(entries), *row_shape))
        else:
            rows = np.load(partial_path, mmap_mode="r+")
        position = {name: index for index, (name, _) in enumerate(entries)}
        todo = sorted(position[name] for name, _ in record["retryable"])
        todo += range(record["done"], len(entries))
        if todo:
            module = build_encoder(metadata, stage=stage, grid=grid)
            feature_fn = make_feature_fn(module, variables, metadata["preprocessing"],
                                         DTYPES[dtype], devices)
            _run_batches(entries, todo, record, rows, feature_fn, batch_size, image_size,
                         resize, workers or min(32, (os.cpu_count() or 1) + 4), record_path,
                         progress)
        del rows
        if record["retryable"]:
            write_text_atomic(out / "retryable.tsv", _tsv(record["retryable"]))
            raise RetryableError(
                f"{len(record['retryable'])} files could not be read for reasons that may pass "
                f"(I/O errors, permissions; listed with the reason in {out}/retryable.tsv); the "
                f"other images are saved in {out}. Run the same command again to read those "
                f"files again.")
        _finish(out, entries, record)
    record["complete"] = True
    write_json_atomic(record_path, record)
    kept = record["total"] - len(record["skipped"])
    log(f"extracted {kept} images -> {out}/features.npy {(kept, *row_shape)} {dtype}; "
        f"skipped {len(record['skipped'])}" +
        (f" (reasons in {out}/skipped.tsv)" if record["skipped"] else ""))
    return record


def _run_batches(entries, todo, record, rows, feature_fn, batch_size, image_size, resize,
                 workers, record_path, progress):
    """Extracts the rows at positions ``todo`` (the retries, then the rest in order)."""
    chunks = [todo[begin:begin + batch_size] for begin in range(0, len(todo), batch_size)]
    bar = tqdm(total=len(todo), unit="img", disable=not progress, file=sys.stderr,
               desc="extract")
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        decoding = collections.deque()

        def submit(chunk):
            decoding.append((chunk, [pool.submit(load_or_reason, entries[index][1],
                                                 image_size, resize) for index in chunk]))

        for chunk in chunks[:2]:  # decode one batch ahead of the one being computed
            submit(chunk)
        pending = None  # the batch on the devices: (chunk, failures, result)
        for number in range(len(chunks)):
            chunk, futures = decoding.popleft()
            if number + 2 < len(chunks):
                submit(chunks[number + 2])
            batch = np.zeros((batch_size, image_size, image_size, 3), np.uint8)
            failures = []
            for offset, future in enumerate(futures):
                pixels, reason, retryable = future.result()
                if reason is None:
                    batch[offset] = pixels
                else:
                    failures.append((entries[chunk[offset]][0], reason, retryable))
            result = feature_fn(batch)  # asynchronous: the host goes on while it runs
            if pending is not None:
                _commit(pending, entries, rows, record, record_path, bar)
            pending = (chunk, failures, result)
        if pending is not None:
            _commit(pending, entries, rows, record, record_path, bar)
    bar.close()


def _commit(pending, entries, rows, record, record_path, bar):
    """Writes a batch's rows, then records it: a run killed in between redoes the batch."""
    chunk, failures, result = pending
    rows[np.asarray(chunk)] = np.asarray(result)[:len(chunk)]
    rows.flush()
    names = {entries[index][0] for index in chunk}
    record["done"] = max(record["done"], chunk[-1] + 1)
    record["retryable"] = [item for item in record["retryable"] if item[0] not in names]
    record["skipped"].extend([name, reason] for name, reason, retryable in failures
                             if not retryable)
    record["retryable"].extend([name, reason] for name, reason, retryable in failures
                               if retryable)
    write_json_atomic(record_path, record)
    bar.update(len(chunk))


def _finish(out: Path, entries, record) -> None:
    """Writes the final files from the partial array, dropping skipped rows.

    The features move into place last: once the partial array is gone, the
    other files are already final.
    """
    partial_path = out / PARTIAL_FILE
    skipped_names = {name for name, _ in record["skipped"]}
    keep = np.asarray([name not in skipped_names for name, _ in entries])
    names = [name for name, _ in entries if name not in skipped_names]
    write_text_atomic(out / "ids.txt", "".join(f"{name}\n" for name in names))
    write_text_atomic(out / "skipped.tsv", _tsv(record["skipped"]))
    (out / "retryable.tsv").unlink(missing_ok=True)  # all read now
    features_path = out / "features.npy"
    if keep.all():
        os.replace(partial_path, features_path)
    else:
        source = np.load(partial_path, mmap_mode="r")
        staging = out / "features.npy.partial"
        target = np.lib.format.open_memmap(staging, mode="w+", dtype=source.dtype,
                                           shape=(len(names), *source.shape[1:]))
        kept_rows = np.flatnonzero(keep)
        for begin in range(0, len(kept_rows), 256):  # bounded memory for large sets
            chunk = kept_rows[begin:begin + 256]
            target[begin:begin + len(chunk)] = source[chunk]
        target.flush()
        del target, source
        os.replace(staging, features_path)
        os.remove(partial_path)


def main(args) -> int:
    """``jaxcap extract``: see ``jaxcap.cli``."""
    extract(args.weights, args.images, args.out, batch_size=args.batch_size,
            image_size=args.image_size, grid=args.grid, stage=args.stage, resize=args.resize,
            dtype=args.dtype, workers=args.workers, progress=not args.quiet,
            log=lambda m: print(m, file=sys.stderr))
    return 0
