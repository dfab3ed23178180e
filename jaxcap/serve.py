"""``jaxcap serve``: a trained run behind an HTTP endpoint, with dynamic batching.

The pieces, in the order a request meets them:

* ``BodyLimit`` (ASGI middleware): a body over ``max_body_bytes`` is answered
  413 before (``Content-Length``) or while (chunked) it is read.
* ``POST /v1/captions``: the images are decoded (a thread pool, the run's own
  preprocessing); a file that is not a readable image gets ``{image, error}``;
  the others go to the batcher as one job and wait for it at most
  ``timeout_s`` (504 after that). A full queue is 503 with ``Retry-After``.
* ``DynamicBatcher``: one worker takes the oldest job, then whatever jobs with
  the same search options arrive within ``max_wait_ms``, up to ``max_batch``
  images, and decodes them as one ``CaptionSearch`` call on all local devices
  (in a thread, so the event loop keeps accepting requests); each job gets its
  own rows back. Every bucket size of the default search is compiled, and
  timed, before ``/readyz`` says ready; a ``CaptionSearch`` per other option
  set is cached. A batch is padded to its bucket; where the timings say that
  a smaller bucket filled now decodes more images per second (a CPU: time
  grows with the rows; an accelerator: padding is nearly free), the batch is
  cut to it and the jobs left over lead the next batch. A batch that holds as
  many images as a full queue would be cut to goes without waiting longer.

Why FastAPI on uvicorn: the API documents itself (``/docs``, ``/openapi.json``)
from the same declarations that parse and check the requests, multipart
uploads come with it, and it is plain ASGI, so the middleware above and the
batcher are ordinary asyncio code. The page at ``/`` is one static HTML file.
(No ``from __future__ import annotations`` here: FastAPI reads the endpoints'
annotations, and the names they use are imported inside ``create_app``.)
"""

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import math
import time
from pathlib import Path

import jax
import numpy as np

from jaxcap import __version__
from jaxcap.data.text import END_ID
from jaxcap.decode import CaptionSearch, SearchOptions
from jaxcap.extract import load_or_reason
from jaxcap.runs import TrainedRun

log = logging.getLogger("jaxcap.serve")
PAGE = Path(__file__).parent / "static" / "index.html"


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask; the server refuses more (413/422) rather than slow down."""

    max_body_bytes: int = 20 * 2 ** 20
    max_images: int = 64  # per request
    max_beam: int = 10
    max_length: int = 40  # tokens, <start> and <end> included
    queue_images: int = 1024  # images waiting for the worker; more is 503
    timeout_s: float = 30.0  # from arrival to answer; more is 504


# Search options a request may set, as form fields or query parameters, and their types.
SEARCH_FIELDS = {"beam": int, "max_length": int, "min_length": int, "length_penalty": float,
                 "no_repeat_ngram": int, "temperature": float, "top_k": int, "seed": int}

# POST /v1/captions in the OpenAPI description (the endpoint reads its form itself).
CAPTIONS_REQUEST = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"},
                   "description": "image files (repeat the field for several)"},
        **{name: {"type": "integer" if kind is int else "number"}
           for name, kind in SEARCH_FIELDS.items()},
        "attention": {"type": "boolean", "description": "add each word's attention grid"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"},
                "description": "one raw image; search options, attention and name as "
                               "query parameters"}}}}


class ServeError(Exception):
    """The service cannot start as asked; the message says what to do."""


class QueueFull(Exception):
    pass


@dataclasses.dataclass
class _Job:
    pixels: np.ndarray  # (n, S, S, 3) uint8
    options: SearchOptions
    arrived: float
    future: asyncio.Future


class DynamicBatcher:
    """Groups jobs with equal search options into ``CaptionSearch`` calls of at most
    ``max_batch`` images, waiting at most ``max_wait_ms`` for a batch to fill."""

    def __init__(self, run: TrainedRun, defaults: SearchOptions, max_batch: int,
                 max_wait_ms: float, queue_images: int, cached_searches: int = 16):
        self.run, self.defaults = run, defaults
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.queue_images = queue_images
        self.cached_searches = cached_searches
        self._searches: collections.OrderedDict[SearchOptions, CaptionSearch] = \
            collections.OrderedDict()
        self._jobs: collections.deque[_Job] = collections.deque()
        self._forming: list[_Job] = []  # the batch waiting to fill
        self._arrived = asyncio.Event()
        self.decoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="decode")
        self._batch_ids = itertools.count(1)
        self.bucket_seconds: dict[int, float] = {}  # the default search's, from warm_up
        self.ready = False

    def search(self, options: SearchOptions) -> CaptionSearch:
        if options not in self._searches:
            self._searches[options] = CaptionSearch(self.run.image_model,
                                                    self.run.image_variables,
                                                    self.run.vocabulary, options, self.max_batch)
            while len(self._searches) > self.cached_searches:
                # The least recently used goes; its programs stay in the jit caches,
                # so using it again costs a copy of the variables, not a compilation.
                self._searches.popitem(last=False)
        self._searches.move_to_end(options)
        return self._searches[options]

    async def warm_up(self, timings: int = 3) -> list[int]:
        """Compiles every bucket of the default search, in the decoding thread (so before
        any batch of a request), and times each (best of ``timings`` calls on one image
        repeated, so that every bucket decodes the same captions); returns the bucket
        sizes."""
        search = self.search(self.defaults)
        side = self.run.config.encoder.image_size
        loop = asyncio.get_running_loop()

        def timed(pixels):
            started = time.perf_counter()
            search(pixels)
            return time.perf_counter() - started

        for size in search.buckets:
            pixels = np.zeros((size, side, side, 3), np.uint8)
            await loop.run_in_executor(self.decoder, search, pixels)  # compiles
            self.bucket_seconds[size] = min([await loop.run_in_executor(
                self.decoder, timed, pixels) for _ in range(timings)])
        self.ready = True
        return search.buckets

    def batch_images(self, waiting: int) -> int:
        """How many of ``waiting`` images (at most ``max_batch``) to decode now: the
        bucket that holds them all, or a smaller one filled completely where the
        default search's timings promise at least 10% more images per second (ties go
        to the larger batch, which leaves fewer requests waiting)."""
        search = self.search(self.defaults)
        if not all(size in self.bucket_seconds for size in search.buckets):
            return waiting
        padded = search.bucket(min(waiting, search.max_batch))
        rate = {size: min(waiting, size) / self.bucket_seconds[size]
                for size in search.buckets if size <= padded}
        best = max(rate.values())
        return min(waiting, max(size for size in rate if rate[size] >= best / 1.1))

    def enough_images(self, options: SearchOptions) -> int:
        """How many waiting images send a batch with ``options`` off without waiting for
        more: ``max_batch``, or for the default search the bucket a full queue would be
        cut to (more images would be cut off again, so waiting for them only delays the
        ones already there)."""
        return self.batch_images(self.max_batch) if options == self.defaults else self.max_batch

    def queued_images(self) -> int:
        """Images of live requests not yet handed to the decoder."""
        return sum(len(job.pixels) for job in itertools.chain(self._jobs, self._forming)
                   if not job.future.done())

    def submit(self, pixels: np.ndarray, options: SearchOptions) -> asyncio.Future:
        if self.queued_images() + len(pixels) > self.queue_images:
            raise QueueFull
        job = _Job(pixels, options, time.monotonic(), asyncio.get_running_loop().create_future())
        self._jobs.append(job)
        self._arrived.set()
        return job.future

    def _take(self, options: SearchOptions, room: int) -> list[_Job]:
        """Removes from the queue, oldest first, the live jobs with ``options`` that fit
        in ``room`` images; drops the jobs whose requests gave up."""
        taken, kept = [], collections.deque()
        for job in self._jobs:
            if job.future.done():  # its request gave up (timeout, client gone)
                continue
            if job.options == options and len(job.pixels) <= room and \
                    (job.options.temperature == 0 or not taken):
                # A sampled caption depends on its row's random stream: a sampling job
                # rides alone, so that its seed gives the same captions in any traffic.
                taken.append(job)
                room -= len(job.pixels)
            else:
                kept.append(job)
        self._jobs = kept
        return taken

    async def _form_batch(self) -> list[_Job]:
        """The oldest live job and those that join it within ``max_wait``; [] when every
        job of the forming batch gave up while it waited."""
        while not any(not job.future.done() for job in self._jobs):
            self._jobs.clear()
            self._arrived.clear()
            await self._arrived.wait()
        first = next(job for job in self._jobs if not job.future.done())
        options = first.options
        self._forming = self._take(options, max(self.max_batch, len(first.pixels)))
        enough = self.enough_images(options)
        while True:
            self._forming = [job for job in self._forming if not job.future.done()]
            size = sum(len(job.pixels) for job in self._forming)
            if not self._forming or options.temperature > 0 or size >= enough:
                break
            remaining = self._forming[0].arrived + self.max_wait - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
            self._forming += self._take(options, self.max_batch - size)
        batch, self._forming = self._forming, []
        if options == self.defaults and len(batch) > 1:
            batch = self._cut(batch, self.batch_images(sum(len(job.pixels) for job in batch)))
        return batch

    def _cut(self, batch: list[_Job], images: int) -> list[_Job]:
        """The batch's jobs, oldest first, that fit in ``images`` (the oldest always);
        the others go back to the head of the queue, in their order."""
        kept, room = [], images
        for job in batch:
            if kept and len(job.pixels) > room:
                break
            kept.append(job)
            room -= len(job.pixels)
        self._jobs.extendleft(reversed(batch[len(kept):]))
        return kept

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._form_batch()
            if not batch:
                continue
            batch_id = next(self._batch_ids)
            pixels = np.concatenate([job.pixels for job in batch])
            try:
                captions = await loop.run_in_executor(
                    self.decoder, self.search(batch[0].options), pixels)
            except Exception as error:  # noqa: BLE001  (answered to its requests, logged)
                log.exception("batch %d failed", batch_id)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            start = 0
            for job in batch:
                rows = slice(start, start + len(job.pixels))
                start = rows.stop
                if not job.future.done():
                    job.future.set_result((captions, rows, batch_id, len(pixels)))


class BodyLimit:
    """413 for a request body over ``limit`` bytes, declared or streamed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        received = 0
        started = False

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise _TooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send):
        body = (f'{{"detail": "request body over the limit of {self.limit} bytes"}}').encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def _result(captions, row: int, name: str, vocabulary, attention: bool) -> dict:
    tokens = [int(t) for t in captions.tokens[row][1:]]
    ids = tokens[:tokens.index(END_ID)] if END_ID in tokens else tokens
    text = captions.texts[row]
    out = {"image": name, "caption": text, "score": float(captions.scores[row]),
           "tokens": ids, "words": [vocabulary.tokens[t] for t in ids]}
    if attention:
        alphas = captions.alphas[row, :len(ids)]
        grid = math.isqrt(alphas.shape[-1])
        out["attention"] = np.round(alphas.reshape(len(ids), grid, grid), 5).tolist()
    return out


def create_app(run: TrainedRun, defaults: SearchOptions, max_batch: int = 32,
               max_wait_ms: float = 10, limits: Limits = Limits()):
    """The ASGI application serving ``run`` (FastAPI, wrapped in the body limit)."""
    try:
        from fastapi import FastAPI, HTTPException, Request
        from fastapi.responses import HTMLResponse, JSONResponse
    except ImportError as error:
        raise ServeError(f"jaxcap serve needs FastAPI: pip install 'jaxcap[serve]' "
                         f"({error})") from None

    batcher = DynamicBatcher(run, defaults, max_batch, max_wait_ms, limits.queue_images)
    decoding = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="image")
    side, resize = run.config.encoder.image_size, run.config.encoder.resize
    request_ids = itertools.count(1)

    async def warm():
        buckets = await batcher.warm_up()
        log.info("ready: compiled buckets %s of the default search", buckets)

    async def lifespan(app):
        tasks = [asyncio.create_task(batcher.run_forever()), asyncio.create_task(warm())]
        yield
        for task in tasks:
            task.cancel()
        decoding.shutdown(wait=False)
        batcher.decoder.shutdown(wait=False)

    app = FastAPI(title="jaxcap", version=__version__, lifespan=lifespan,
                  description="Captions images with a trained jaxcap run. Requests are "
                              "batched dynamically; see /v1/model for what is served.")

    def options_from(fields) -> SearchOptions:
        """The search options a request asks for (form fields or query parameters), on top
        of the server's defaults, within its limits."""
        chosen = dataclasses.asdict(defaults)
        try:
            for name, kind in SEARCH_FIELDS.items():
                if name in fields:
                    chosen[name if name != "beam" else "beam_size"] = kind(fields[name])
        except ValueError as error:
            raise HTTPException(422, f"bad search option: {error}") from None
        if chosen["temperature"] > 0 and "beam" not in fields:
            chosen["beam_size"] = 1  # sampling draws one caption
        if not 1 <= chosen["beam_size"] <= limits.max_beam:
            raise HTTPException(422, f"beam must be between 1 and {limits.max_beam}")
        if not 2 <= chosen["max_length"] <= limits.max_length:
            raise HTTPException(422, f"max_length must be between 2 and {limits.max_length}")
        try:
            return SearchOptions(**chosen)
        except ValueError as error:
            raise HTTPException(422, str(error)) from None

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return PAGE.read_text(encoding="utf8")

    @app.get("/healthz", summary="The process is up")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Ready: the default search is compiled")
    async def readyz():
        if not batcher.ready:
            return JSONResponse({"status": "warming up"}, status_code=503)
        return {"status": "ready"}

    @app.get("/v1/model", summary="What is served, the search defaults and the limits")
    async def model():
        config = run.config
        return {
            "run": str(run.workdir), "checkpoint_step": run.step, "jaxcap_version": __version__,
            "dataset": config.dataset.name, "decoder_variant": config.decoder.variant,
            "encoder": {"image_size": side, "resize": resize, "stage": config.encoder.stage,
                        "mode": config.encoder.mode},
            "vocabulary_size": len(run.vocabulary),
            "devices": [str(device) for device in jax.local_devices()],
            "search_defaults": dataclasses.asdict(defaults),
            "batching": {"max_batch": batcher.max_batch, "max_wait_ms": max_wait_ms,
                         "buckets": batcher.search(defaults).buckets,
                         "bucket_ms": {size: round(1000 * seconds, 2)
                                       for size, seconds in batcher.bucket_seconds.items()},
                         "queued_images": batcher.queued_images()},
            "limits": dataclasses.asdict(limits)}

    @app.post("/v1/captions", summary="Caption one or more images",
              openapi_extra=CAPTIONS_REQUEST)
    async def captions(request: Request):
        """Multipart form (field ``images``, repeatable, plus search options), or one raw
        image as the body (search options then as query parameters). Returns
        ``{"results": [...]}`` in request order: ``{image, caption, score, tokens, words}``
        (plus ``attention``, words x grid x grid, when asked) or ``{image, error}``."""
        # The form is read here rather than declared as FastAPI parameters: their
        # per-request introspection cost about 1.8 ms a request, a third of the service's
        # own CPU time per image on the benchmark's 2 cores.
        started = time.monotonic()
        request_id = next(request_ids)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_files=limits.max_images + 1)
            fields = {key: value for key, value in form.multi_items()
                      if isinstance(value, str)}
            files = [(upload.filename or f"image{i}", await upload.read())
                     for i, upload in enumerate(form.getlist("images"))
                     if not isinstance(upload, str)]
        else:  # a raw image body: options in the query string
            fields = dict(request.query_params)
            files = [(fields.get("name", "image"), await request.body())]
        if not files or not files[0][1]:
            raise HTTPException(422, "no image: send multipart field 'images' or an image body")
        if len(files) > limits.max_images:
            raise HTTPException(413, f"{len(files)} images; at most {limits.max_images} a request")
        options = options_from(fields)
        attention = fields.get("attention", "false").lower() in ("1", "true", "yes", "on")
        loop = asyncio.get_running_loop()
        loaded = await asyncio.gather(*(
            loop.run_in_executor(decoding, load_or_reason, lambda data=data: data, side, resize)
            for _, data in files))
        results: list[dict | None] = [None] * len(files)
        usable = []
        for index, ((name, _), (pixels, reason, _)) in enumerate(zip(files, loaded)):
            if reason is None:
                usable.append((index, name, pixels))
            else:
                results[index] = {"image": name, "error": f"{name}: {reason}"}
        batch_id = batch_size = None
        if usable:
            try:
                future = batcher.submit(np.stack([p for _, _, p in usable]), options)
            except QueueFull:
                raise HTTPException(503, "the queue is full; retry shortly",
                                    headers={"Retry-After": "1"}) from None
            remaining = limits.timeout_s - (time.monotonic() - started)
            try:
                found, rows, batch_id, batch_size = await asyncio.wait_for(future, remaining)
            except TimeoutError:
                log.info("request %d images=%d timed out after %.0f ms", request_id,
                         len(files), 1000 * (time.monotonic() - started))
                raise HTTPException(504, f"not answered within {limits.timeout_s:g} s") from None
            for row, (index, name, _) in zip(range(rows.start, rows.stop), usable):
                results[index] = _result(found, row, name, run.vocabulary, attention)
        latency = 1000 * (time.monotonic() - started)
        log.info("request %d images=%d batch=%s (%s images) latency_ms=%.1f", request_id,
                 len(files), batch_id, batch_size, latency)
        body = {"results": results, "batch": {"id": batch_id, "images": batch_size}}
        return JSONResponse(body, status_code=200 if usable else 422)

    return BodyLimit(app, limits.max_body_bytes)


def check_arguments(args) -> None:
    """The service's limits in their ranges, before the run is loaded."""
    for flag, value, least in (("--max-batch", args.max_batch, 1),
                               ("--max-images", args.max_images, 1),
                               ("--max-wait-ms", args.max_wait_ms, 0)):
        if value < least:
            raise ServeError(f"{flag} must be at least {least}, got {value:g}")
    for flag, value in (("--max-body-mb", args.max_body_mb), ("--timeout-s", args.timeout_s)):
        if not value > 0:
            raise ServeError(f"{flag} must be above 0, got {value:g}")
    if args.max_wait_ms >= 1000 * args.timeout_s:  # a lone request would always time out
        raise ServeError(f"--max-wait-ms ({args.max_wait_ms:g}) must be below --timeout-s "
                         f"({args.timeout_s:g} s)")
    if args.queue_images < args.max_images:  # a request of --max-images would never enter
        raise ServeError(f"--queue-images ({args.queue_images}) must be at least --max-images "
                         f"({args.max_images})")


def main(args) -> int:
    """``jaxcap serve``: see ``jaxcap.cli``."""
    from jaxcap.caption import search_options
    from jaxcap.runs import load_run

    check_arguments(args)

    # Its own handler: absl (imported with the data stack) has taken the root logger.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s jaxcap serve: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    run = load_run(args.workdir, args.dtype)
    limits = Limits(max_body_bytes=int(args.max_body_mb * 2 ** 20), max_images=args.max_images,
                    queue_images=args.queue_images, timeout_s=args.timeout_s)
    app = create_app(run, search_options(args, run), args.max_batch, args.max_wait_ms, limits)
    import uvicorn  # present when FastAPI is: both come with jaxcap[serve]

    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
