"""What one request may ask of ``jaxcap serve``, and the guards that hold requests to it.

* ``Limits``: every bound the server keeps, each set by a flag of ``jaxcap serve``.
* ``BodyLimit`` (ASGI middleware): a body over ``max_body_bytes`` is answered 413,
  before it is read (``Content-Length``) or while it streams in (chunked).
* ``search_options``: a request's search options, each checked against its range
  (422 naming the option). Options that set a program's shapes (beam, maximum
  length, the n-gram size blocked) are held to a few values each; the others
  (minimum length, top-k, temperature, length penalty, seed) are arguments of
  the program, so no value of theirs compiles anything.
* ``DecodeBudget``: the bytes the images being decoded may hold at once, over
  all requests; an image's share is known from its header before it is decoded.
"""

import asyncio
import contextlib
import dataclasses

from jaxcap.data.images import DECODE_BYTES_PER_PIXEL
from jaxcap.decode import MAX_SEED, SearchOptions
from jaxcap.errors import UserError


class ServeError(UserError):
    """The service cannot start as asked; the message says what to do."""


class OptionError(ValueError):
    """A request's search option out of its range; the message names it (answered 422)."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask; the server refuses more (413/422) rather than slow down."""

    max_body_bytes: int = 20 * 2 ** 20
    max_images: int = 64  # per request
    max_beam: int = 10
    max_length: int = 40  # tokens, <start> and <end> included
    max_no_repeat_ngram: int = 4
    max_temperature: float = 100.0
    max_length_penalty: float = 10.0  # in magnitude
    queue_images: int = 1024  # images waiting for the worker; more is 503
    timeout_s: float = 30.0  # from arrival to answer; more is 504
    max_pixels: int = 40_000_000  # an image decoding to more is refused from its header
    decode_bytes: int = 2 ** 30  # held by the images being decoded at once, over all requests
    cached_searches: int = 16  # option sets whose programs are kept besides the default's

    def check(self) -> None:
        """Raises a ``ServeError`` where the limits cannot hold together."""
        largest = self.max_pixels * DECODE_BYTES_PER_PIXEL
        if largest > self.decode_bytes:
            raise ServeError(
                f"--max-decode-mb ({self.decode_bytes / 2 ** 20:g}) must hold one image of "
                f"--max-pixels ({self.max_pixels}): {largest / 2 ** 20:.0f} MB "
                f"({DECODE_BYTES_PER_PIXEL} bytes a pixel at most while it decodes)")


# The search options a request may set (form fields or query parameters), and their types.
SEARCH_FIELDS = {"beam": int, "max_length": int, "min_length": int, "length_penalty": float,
                 "no_repeat_ngram": int, "temperature": float, "top_k": int, "seed": int}


def option_ranges(limits: Limits, vocabulary_size: int, max_length: int) -> dict:
    """Each option's (least, most) for a request whose maximum length is ``max_length``."""
    return {"beam": (1, limits.max_beam), "max_length": (2, limits.max_length),
            "min_length": (0, max_length - 2),
            "no_repeat_ngram": (0, min(limits.max_no_repeat_ngram, max_length - 1)),
            "top_k": (0, vocabulary_size), "temperature": (0.0, limits.max_temperature),
            "length_penalty": (-limits.max_length_penalty, limits.max_length_penalty),
            "seed": (0, MAX_SEED)}


def search_options(fields: dict, defaults: SearchOptions, limits: Limits,
                   vocabulary_size: int) -> SearchOptions:
    """The search options a request asks for, on top of the server's defaults; an
    ``OptionError`` names the first option that is not a number of its kind in its range."""
    chosen = {"beam": defaults.beam_size, **{name: getattr(defaults, name)
                                             for name in SEARCH_FIELDS if name != "beam"}}
    for name, kind in SEARCH_FIELDS.items():
        if name in fields:
            try:
                chosen[name] = kind(fields[name])
            except ValueError:
                raise OptionError(f"{name}={fields[name]!r}: must be "
                                  f"{'an integer' if kind is int else 'a number'}") from None
    if chosen["temperature"] > 0 and "beam" not in fields:
        chosen["beam"] = 1  # sampling draws one caption
    ranges = option_ranges(limits, vocabulary_size, chosen["max_length"])
    for name in ("max_length", *(n for n in SEARCH_FIELDS if n != "max_length")):
        least, most = ranges[name]
        if not least <= chosen[name] <= most:  # NaN too
            raise OptionError(f"{name}={chosen[name]!r}: must be between {least} and {most}")
    try:
        return SearchOptions(beam_size=chosen.pop("beam"), **chosen)
    except ValueError as error:  # options that do not go together
        raise OptionError(str(error)) from None


def programs_bound(limits: Limits, buckets: int) -> int:
    """The most compiled search programs a server holds: the default's and those of
    ``cached_searches`` other option sets, a program per bucket size each."""
    return (1 + limits.cached_searches) * buckets


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
        over = started = False

        async def counted_receive():
            nonlocal received, over
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                over = True
                raise _TooLarge
            return message

        async def guarded_send(message):
            # Once the body is over the limit, what the app answers (Starlette's error
            # middleware answers 500 to the exception above) is not sent: the 413 is.
            nonlocal started
            if over:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except _TooLarge:
            pass
        if over and not started:
            await self._refuse(send)

    async def _refuse(self, send):
        body = (f'{{"detail": "request body over the limit of {self.limit} bytes"}}').encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class DecodeBudget:
    """Bytes held by images being decoded, over all requests: a decode waits until its share
    fits in ``capacity``."""

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, amount: int):
        async with self._changed:
            await self._changed.wait_for(lambda: self.used + amount <= self.capacity)
            self.used += amount
        try:
            yield
        finally:
            async with self._changed:
                self.used -= amount
                self._changed.notify_all()


def image_share(width: int, height: int) -> int:
    """The most bytes decoding an image of that decoded size holds at once."""
    return width * height * DECODE_BYTES_PER_PIXEL
