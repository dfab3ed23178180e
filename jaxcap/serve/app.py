"""The HTTP application of ``jaxcap serve``: its endpoints, its health, and the command.

A request to ``POST /v1/captions`` meets, in order: the body limit (413); its
search options, each in its range (422 naming it); each file's header, whose
decoded size must be within ``max_pixels`` (else that file gets an error naming
it, undecoded); the decode budget, which bounds the bytes held by images being
decoded over all requests; the decoding (a thread pool, the run's own
preprocessing; a file that is not a readable image gets an error naming it); the
queue (503 with ``Retry-After`` when full); and the batcher, within the
request's deadline (504 after ``timeout_s``).

If the decode loop, the compiling loop or the warm-up ends with an error, the
service turns not-ready (``/readyz`` 503 with the reason), answers every request
503, and the process exits with a non-zero status.
"""

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import math
import time
from pathlib import Path

import jax
import numpy as np

from jaxcap import __version__
from jaxcap.data.images import ImageError, decoded_size, load_image
from jaxcap.data.text import END_ID
from jaxcap.decode import CaptionSearch, SearchOptions
from jaxcap.serve.batcher import DynamicBatcher, QueueFull, log
from jaxcap.serve.limits import (SEARCH_FIELDS, BodyLimit, DecodeBudget, Limits, OptionError,
                                 ServeError, image_share, programs_bound, search_options)

PAGE = Path(__file__).parents[1] / "static" / "index.html"

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


class Refused(Exception):
    """A request answered with an error status; ``detail`` says why."""

    def __init__(self, status: int, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


@dataclasses.dataclass
class Served:
    """What a server serves: its default search, how other options get theirs (None: the
    default's only, as for an exported captioner), its vocabulary, how its images are
    prepared and what ``/v1/model`` says of it."""

    default_search: object  # a CaptionSearch, or an exported captioner's
    make_search: object  # options -> a search, or None
    vocabulary: object
    image_size: int
    resize: str
    description: dict

    @classmethod
    def of_run(cls, run, defaults: SearchOptions, max_batch: int) -> "Served":
        default = CaptionSearch(run.image_model, run.image_variables, run.vocabulary, defaults,
                                max_batch)
        config = run.config

        def make_search(options):  # the variables laid out once, shared by every search
            return CaptionSearch(run.image_model, default.variables, run.vocabulary, options,
                                 default.max_batch)
        return cls(default, make_search, run.vocabulary, config.encoder.image_size,
                   config.encoder.resize, {
                       "run": run.workdir.name, "checkpoint_step": run.step,
                       "dataset": config.dataset.name, "decoder_variant": config.decoder.variant,
                       "encoder": {"stage": config.encoder.stage, "mode": config.encoder.mode}})

    @classmethod
    def of_export(cls, directory, max_batch: int) -> "Served":
        from jaxcap.export import ExportedSearch

        search = ExportedSearch(directory, max_batch)
        about = search.captioner.spec.get("run", {})
        return cls(search, None, search.vocabulary, search.image_size, search.resize, {
            "exported": Path(directory).name, "run": about.get("name"),
            "checkpoint_step": about.get("checkpoint_step"), "dataset": about.get("dataset"),
            "decoder_variant": about.get("decoder_variant"),
            "platforms": search.captioner.spec["platforms"]})


class Service:
    """What the endpoints share: what is served, the batcher, the decoding pools and the
    health."""

    def __init__(self, served: Served, max_wait_ms: float, limits: Limits, on_failure=None):
        limits.check()
        self.served, self.limits = served, limits
        self.defaults = served.default_search.options
        self.max_wait_ms = max_wait_ms
        self.side, self.resize = served.image_size, served.resize
        self.batcher = DynamicBatcher(served.default_search, (self.side, self.side, 3),
                                      max_wait_ms, limits.queue_images, limits.cached_searches,
                                      served.make_search)
        self.images = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="image")
        self.budget = DecodeBudget(limits.decode_bytes)
        self.request_ids = itertools.count(1)
        self.failed: str | None = None
        self.on_failure = on_failure
        self._tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------------ health

    async def start(self) -> None:
        for name, work in (("decode loop", self.batcher.run_forever()),
                           ("compiling loop", self.batcher.compile_forever()),
                           ("warm-up", self._warm())):
            task = asyncio.create_task(work, name=name)
            task.add_done_callback(self._ended)
            self._tasks.append(task)

    async def _warm(self) -> None:
        buckets = await self.batcher.warm_up()
        log.info("ready: compiled buckets %s of the default search", buckets)

    def _ended(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        self.failed = f"the {task.get_name()} failed: {type(error).__name__}: {error}"
        log.error("%s; the service stops", self.failed, exc_info=error)
        self.batcher.ready = False
        if self.on_failure is not None:
            self.on_failure()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.images.shutdown(wait=False)
        self.batcher.shutdown()

    def readiness(self) -> tuple[int, dict]:
        if self.failed:
            return 503, {"status": "failed", "reason": self.failed}
        if not self.batcher.ready:
            return 503, {"status": "warming up"}
        return 200, {"status": "ready"}

    def model(self) -> dict:
        batcher, described = self.batcher, dict(self.served.description)
        return {
            **described, "jaxcap_version": __version__,
            "encoder": {"image_size": self.side, "resize": self.resize,
                        **described.pop("encoder", {})},
            "vocabulary_size": len(self.served.vocabulary),
            "devices": [str(device) for device in jax.local_devices()],
            "search_defaults": dataclasses.asdict(self.defaults),
            "batching": {"max_batch": batcher.max_batch, "max_wait_ms": self.max_wait_ms,
                         "buckets": batcher.search(self.defaults).buckets,
                         "bucket_ms": {size: round(1000 * seconds, 2)
                                       for size, seconds in batcher.bucket_seconds.items()},
                         "queued_images": batcher.queued_images(),
                         "compiled_programs": batcher.compiled_programs,
                         "programs_bound": programs_bound(
                             self.limits, len(batcher.search(self.defaults).buckets))},
            "limits": dataclasses.asdict(self.limits)}

    # ------------------------------------------------------------------ a request

    async def caption(self, request) -> tuple[int, dict]:
        """``(status, body)`` of one ``POST /v1/captions``; raises ``Refused``."""
        started, request_id = time.monotonic(), next(self.request_ids)
        if self.failed:
            raise Refused(503, f"the service has stopped: {self.failed}")
        fields, files = await self._read(request)
        try:
            options = search_options(fields, self.defaults, self.limits,
                                     len(self.served.vocabulary))
        except OptionError as error:
            raise Refused(422, str(error)) from None
        if self.served.make_search is None and options != self.defaults:
            raise Refused(422, f"this server decodes with one search only (an exported "
                               f"captioner's): {self.defaults}")
        attention = fields.get("attention", "false").lower() in ("1", "true", "yes", "on")
        deadline = started + self.limits.timeout_s
        pixels, errors = await self._within(deadline, self._decode(files))
        results: list[dict | None] = [None] * len(files)
        for index, reason in errors.items():
            results[index] = {"image": files[index][0], "error": f"{files[index][0]}: {reason}"}
        batch = {"id": None, "images": None}
        if pixels:
            try:
                future = self.batcher.submit(np.stack(list(pixels.values())), options)
            except QueueFull:
                raise Refused(503, "the queue is full; retry shortly",
                              {"Retry-After": "1"}) from None
            found, rows, batch["id"], batch["images"] = await self._within(deadline, future)
            for row, index in zip(range(rows.start, rows.stop), pixels):
                results[index] = _result(found, row, files[index][0], self.served.vocabulary,
                                         attention)
        log.info("request %d images=%d batch=%s (%s images) latency_ms=%.1f", request_id,
                 len(files), batch["id"], batch["images"], 1000 * (time.monotonic() - started))
        return (200 if pixels else 422), {"results": results, "batch": batch}

    async def _within(self, deadline: float, awaitable):
        try:
            return await asyncio.wait_for(awaitable, deadline - time.monotonic())
        except TimeoutError:
            raise Refused(504, f"not answered within {self.limits.timeout_s:g} s") from None

    async def _read(self, request) -> tuple[dict, list[tuple[str, bytes]]]:
        """The request's fields and its files, ``(name, bytes)`` in order."""
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_files=self.limits.max_images + 1)
            fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
            files = [(upload.filename or f"image{i}", await upload.read())
                     for i, upload in enumerate(form.getlist("images"))
                     if not isinstance(upload, str)]
        else:  # a raw image body: options in the query string
            fields = dict(request.query_params)
            body = await request.body()
            files = [(fields.get("name", "image"), body)] if body else []
        if not files:
            raise Refused(422, "no image: send multipart field 'images' or an image body")
        if len(files) > self.limits.max_images:
            raise Refused(413, f"{len(files)} images; at most {self.limits.max_images} a request")
        return fields, files

    async def _decode(self, files) -> tuple[dict[int, np.ndarray], dict[int, str]]:
        """``({index: pixels}, {index: why not})`` of the request's files, in order."""
        loop = asyncio.get_running_loop()

        async def one(data: bytes):
            try:
                width, height = await loop.run_in_executor(self.images, decoded_size, data,
                                                           self.side)
                async with self.budget.hold(image_share(width, height)
                                            if width * height <= self.limits.max_pixels else 0):
                    return await loop.run_in_executor(self.images, load_image, data, self.side,
                                                      self.resize, self.limits.max_pixels)
            except ImageError as error:
                return str(error)

        decoded = await asyncio.gather(*(one(data) for _, data in files))
        pixels = {i: value for i, value in enumerate(decoded) if isinstance(value, np.ndarray)}
        return pixels, {i: value for i, value in enumerate(decoded) if isinstance(value, str)}


def _result(captions, row: int, name: str, vocabulary, attention: bool) -> dict:
    tokens = [int(t) for t in captions.tokens[row][1:]]
    ids = tokens[:tokens.index(END_ID)] if END_ID in tokens else tokens
    out = {"image": name, "caption": captions.texts[row], "score": float(captions.scores[row]),
           "tokens": ids, "words": [vocabulary.tokens[t] for t in ids]}
    if attention:
        alphas = captions.alphas[row, :len(ids)]
        grid = math.isqrt(alphas.shape[-1])
        out["attention"] = np.round(alphas.reshape(len(ids), grid, grid), 5).tolist()
    return out


def create_app(run, defaults: SearchOptions | None = None, max_batch: int = 32,
               max_wait_ms: float = 10, limits: Limits = Limits(), on_failure=None):
    """The ASGI application serving ``run`` (a trained run with the ``defaults`` search, or a
    ``Served``) with FastAPI, wrapped in the body limit. ``on_failure``: called once if the
    service stops working (``jaxcap serve`` exits)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import HTMLResponse, JSONResponse
    except ImportError as error:
        raise ServeError(f"jaxcap serve needs FastAPI: pip install 'jaxcap[serve]' "
                         f"({error})") from None
    served = run if isinstance(run, Served) else Served.of_run(run, defaults, max_batch)
    service = Service(served, max_wait_ms, limits, on_failure)

    async def lifespan(app):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(title="jaxcap", version=__version__, lifespan=lifespan,
                  description="Captions images with a trained jaxcap run. Requests are "
                              "batched dynamically; see /v1/model for what is served.")
    app.state.service = service

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return PAGE.read_text(encoding="utf8")

    @app.get("/healthz", summary="The process is up")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Ready: the default search is compiled and nothing has failed")
    async def readyz():
        status, body = service.readiness()
        return JSONResponse(body, status_code=status)

    @app.get("/v1/model", summary="What is served, the search defaults and the limits")
    async def model():
        return service.model()

    @app.post("/v1/captions", summary="Caption one or more images",
              openapi_extra=CAPTIONS_REQUEST)
    async def captions(request: Request):
        """Multipart form (field ``images``, repeatable, plus search options), or one raw
        image as the body (search options then as query parameters). Returns
        ``{"results": [...]}`` in request order: ``{image, caption, score, tokens, words}``
        (plus ``attention``, words x grid x grid, when asked) or ``{image, error}``."""
        # The form is read by the service rather than declared as FastAPI parameters: their
        # per-request introspection cost about 1.8 ms a request, a third of the service's
        # own CPU time per image on the benchmark's 2 cores.
        try:
            status, body = await service.caption(request)
        except Refused as refused:
            return JSONResponse({"detail": refused.detail}, status_code=refused.status,
                                headers=refused.headers)
        return JSONResponse(body, status_code=status)

    return BodyLimit(app, limits.max_body_bytes)


def check_arguments(args) -> None:
    """The service's limits in their ranges, before the run is loaded."""
    for flag, value, least in (("--max-batch", args.max_batch, 1),
                               ("--max-images", args.max_images, 1),
                               ("--max-wait-ms", args.max_wait_ms, 0),
                               ("--max-pixels", args.max_pixels, 1),
                               ("--cached-searches", args.cached_searches, 0)):
        if value < least:
            raise ServeError(f"{flag} must be at least {least}, got {value:g}")
    for flag, value in (("--max-body-mb", args.max_body_mb), ("--timeout-s", args.timeout_s),
                        ("--max-decode-mb", args.max_decode_mb)):
        if not value > 0:
            raise ServeError(f"{flag} must be above 0, got {value:g}")
    if args.max_wait_ms >= 1000 * args.timeout_s:  # a lone request would always time out
        raise ServeError(f"--max-wait-ms ({args.max_wait_ms:g}) must be below --timeout-s "
                         f"({args.timeout_s:g} s)")
    if args.queue_images < args.max_images:  # a request of --max-images would never enter
        raise ServeError(f"--queue-images ({args.queue_images}) must be at least --max-images "
                         f"({args.max_images})")
    limits_of(args).check()


def limits_of(args) -> Limits:
    return Limits(max_body_bytes=int(args.max_body_mb * 2 ** 20), max_images=args.max_images,
                  queue_images=args.queue_images, timeout_s=args.timeout_s,
                  max_pixels=args.max_pixels, decode_bytes=int(args.max_decode_mb * 2 ** 20),
                  cached_searches=args.cached_searches)


def served_by(args) -> Served:
    """What the command line asks to serve: a run's best checkpoint, or an exported captioner."""
    from jaxcap.caption import check_exported_search, search_options as command_line_options

    if args.exported:
        served = Served.of_export(args.exported, args.max_batch)
        check_exported_search(args, served.default_search.options)
        return served
    from jaxcap.runs import load_run

    run = load_run(args.workdir, args.dtype)
    return Served.of_run(run, command_line_options(args, run.config.eval.max_length),
                         args.max_batch)


def main(args) -> int:
    """``jaxcap serve``: see ``jaxcap.cli``."""
    check_arguments(args)
    # Its own handler: absl (imported with the data stack) has taken the root logger.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s jaxcap serve: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    served = served_by(args)
    import uvicorn  # present when FastAPI is: both come with jaxcap[serve]

    server = None

    def stop():
        server.should_exit = True

    app = create_app(served, max_wait_ms=args.max_wait_ms, limits=limits_of(args),
                     on_failure=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                           log_level="warning"))
    server.run()
    failed = app.app.state.service.failed
    if failed:
        raise ServeError(f"{failed}; the service stopped")
    return 0
