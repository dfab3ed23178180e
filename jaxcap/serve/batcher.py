"""The queue between requests and the decoder: dynamic batches, and the programs they run.

* Jobs (one request's images and search options) wait in a queue. One worker
  takes the oldest job whose program is compiled, then whatever jobs with the
  same options arrive within ``max_wait_ms``, up to ``max_batch`` images, and
  decodes them as one ``CaptionSearch`` call on all local devices, in a thread
  of its own (so the event loop keeps accepting requests); each job gets its own
  rows back. A batch is padded to its bucket; where the default search's timings
  say that a smaller bucket filled now decodes more images per second (a CPU:
  time grows with the rows; an accelerator: padding is nearly free), the batch is
  cut to it and the jobs left over lead the next batch. A batch that holds as many
  images as a full queue would be cut to goes without waiting longer.
* Programs: the default search's are compiled, and timed, before the server says
  it is ready. Options that need another program (``SearchOptions.program``: beam
  size, maximum length, n-gram size blocked) have theirs compiled ahead of time in
  a thread of their own, at a lower priority, so that default batches keep
  decoding meanwhile; their jobs wait for it. The server holds the default's and
  those of the ``cached_searches`` option sets used last, and nothing else (each
  set dropped is freed with JAX's caches): at most ``programs_bound`` programs.
"""

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import gc
import itertools
import logging
import os
import threading
import time

import jax
import numpy as np

from jaxcap.decode import CaptionSearch, SearchOptions

log = logging.getLogger("jaxcap.serve")


class QueueFull(Exception):
    pass


@dataclasses.dataclass
class _Job:
    pixels: np.ndarray  # (n, S, S, 3) uint8
    options: SearchOptions
    arrived: float
    future: asyncio.Future


# The compiling thread's nice value (on Linux a thread's own): the decoding thread gets about
# nine tenths of a core they share. Not 19: a compile would then starve on a loaded machine
# (a fiftieth of a core), and its requests time out.
COMPILE_NICENESS = 10


def _lower_priority() -> None:
    """Run by the compiling thread as it starts."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), COMPILE_NICENESS)


class DynamicBatcher:
    """Groups jobs with equal search options into ``CaptionSearch`` calls of at most
    ``max_batch`` images, waiting at most ``max_wait_ms`` for a batch to fill."""

    def __init__(self, default_search, input_shape: tuple, max_wait_ms: float,
                 queue_images: int, cached_searches: int = 16, make_search=None):
        """``default_search``: the search of the default options (a ``CaptionSearch``, or an
        exported captioner's); ``make_search(options)`` makes one for other options (None:
        the default's is the only one); ``input_shape``: one image's."""
        self.defaults, self._default = default_search.options, default_search
        self.input_shape, self.make_search = input_shape, make_search
        self.max_wait = max_wait_ms / 1000
        self.queue_images, self.cached_searches = queue_images, cached_searches
        self.max_batch = self._default.max_batch
        # program -> the search holding its compiled programs, least recently used first
        self._programs: collections.OrderedDict[tuple, CaptionSearch] = \
            collections.OrderedDict()
        self._wanted: asyncio.Queue = asyncio.Queue()
        self._queued_programs: set[tuple] = set()
        self._jobs: collections.deque[_Job] = collections.deque()
        self._forming: list[_Job] = []  # the batch waiting to fill
        self._arrived = asyncio.Event()
        self.decoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="decode")
        self.compiler = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="compile", initializer=_lower_priority)
        self._batch_ids = itertools.count(1)
        self.bucket_seconds: dict[int, float] = {}  # the default search's, from warm_up
        self.ready = False

    # ------------------------------------------------------------------ programs

    def search(self, options: SearchOptions) -> CaptionSearch | None:
        """The search for ``options`` with its programs compiled, or None while they are not."""
        if options == self.defaults or options.program == self.defaults.program and \
                self.make_search is not None:
            return self._default.with_options(options)
        search = self._programs.get(options.program)
        if search is None:
            return None
        self._programs.move_to_end(options.program)
        return search.with_options(options)

    @property
    def compiled_programs(self) -> int:
        """The compiled search programs this server holds."""
        return self._default.compiled + sum(s.compiled for s in self._programs.values())

    async def compile_forever(self) -> None:
        """Compiles, one at a time, the programs that queued jobs are waiting for."""
        loop = asyncio.get_running_loop()
        while True:
            program = await self._wanted.get()
            self._queued_programs.discard(program)
            waiting = next((job for job in self._jobs if job.options.program == program
                            and not job.future.done()), None)
            if waiting is None or program in self._programs:
                continue  # its requests gave up, or it was compiled meanwhile
            search = self.make_search(waiting.options)
            await loop.run_in_executor(self.compiler, search.compile, self.input_shape,
                                       np.uint8)
            self._programs[program] = search
            dropped = []
            while len(self._programs) > self.cached_searches:
                dropped.append(self._programs.popitem(last=False))
            if dropped:
                # Programs compiled ahead of time also stay in JAX's own caches: cleared, the
                # dropped ones are freed; those held here (the default's too) are kept.
                del dropped
                await loop.run_in_executor(self.compiler, _release_caches)
            self._arrived.set()

    async def warm_up(self, timings: int = 3) -> list[int]:
        """Compiles every bucket of the default search, and times each in the decoding
        thread (best of ``timings`` calls on one image repeated, so that every bucket
        decodes the same captions); returns the bucket sizes."""
        loop = asyncio.get_running_loop()
        search = self._default
        await loop.run_in_executor(self.compiler, search.compile, self.input_shape, np.uint8)

        def timed(pixels):
            started = time.perf_counter()
            search(pixels)
            return time.perf_counter() - started

        for size in search.buckets:
            pixels = np.zeros((size, *self.input_shape), np.uint8)
            self.bucket_seconds[size] = min([await loop.run_in_executor(
                self.decoder, timed, pixels) for _ in range(timings)])
        self.ready = True
        return search.buckets

    # ------------------------------------------------------------------ batches

    def batch_images(self, waiting: int) -> int:
        """How many of ``waiting`` images (at most ``max_batch``) to decode now: the
        bucket that holds them all, or a smaller one filled completely where the
        default search's timings promise at least 10% more images per second (ties go
        to the larger batch, which leaves fewer requests waiting)."""
        search = self._default
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
        program = options.program
        if self.make_search is None and self.search(options) is None:
            raise ValueError(f"this server decodes with {self.defaults} only")
        if self.search(options) is None and program not in self._queued_programs:
            self._queued_programs.add(program)
            self._wanted.put_nowait(program)
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

    def _first_ready(self) -> _Job | None:
        return next((job for job in self._jobs if not job.future.done()
                     and self.search(job.options) is not None), None)

    async def _form_batch(self) -> list[_Job]:
        """The oldest live job whose program is compiled and those that join it within
        ``max_wait``; [] when every job of the forming batch gave up while it waited."""
        while (first := self._first_ready()) is None:
            self._jobs = collections.deque(job for job in self._jobs if not job.future.done())
            self._arrived.clear()
            await self._arrived.wait()
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

    def shutdown(self) -> None:
        self.decoder.shutdown(wait=False)
        self.compiler.shutdown(wait=False)


def _release_caches() -> None:
    jax.clear_caches()
    gc.collect()
