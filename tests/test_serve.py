"""jaxcap serve over real HTTP on loopback: batching, results equal to CaptionSearch, every
error path, bounded concurrency and memory, and the page in a headless browser."""

import asyncio
import collections
import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="jaxcap serve needs the [serve] extra")
import httpx  # noqa: E402
import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402

from jaxcap import cli, decode  # noqa: E402
from jaxcap.data.images import load_image  # noqa: E402
from jaxcap.decode import CaptionSearch, SearchOptions  # noqa: E402
from jaxcap.runs import load_run  # noqa: E402
from jaxcap.serve import DynamicBatcher, Limits, Served, create_app  # noqa: E402
from jaxcap.serve.limits import DecodeBudget  # noqa: E402
from tests.image_fixtures import bomb_png  # noqa: E402

DEFAULTS = SearchOptions(beam_size=3, max_length=12)


@pytest.fixture(scope="module")
def run(trained_run):
    return load_run(trained_run)


@pytest.fixture(scope="module")
def photos(sample_photos, tmp_path_factory):
    """Real photos as the files a client sends: (name, bytes), PNG and JPEG."""
    return [(name, Path(path).read_bytes()) for name, path in sample_photos]


def _expected(run, photos, options=DEFAULTS):
    """What CaptionSearch says of the photos, one batch: {name: (caption, score)}."""
    side, resize = run.config.encoder.image_size, run.config.encoder.resize
    pixels = np.stack([load_image(data, side, resize) for _, data in photos])
    found = CaptionSearch(run.image_model, run.image_variables, run.vocabulary, options,
                          max_batch=8)(pixels)
    return {name: (text, float(score))
            for (name, _), text, score in zip(photos, found.texts, found.scores)}


@contextlib.contextmanager
def serving(app, wait_ready=True):
    """The app on a free loopback port, in a thread: yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 120
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    while wait_ready and httpx.get(f"{url}/readyz").status_code != 200:
        assert time.time() < deadline, "the server never became ready"
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def _files(photos):
    return [("images", (name, data)) for name, data in photos]


def _check(results, expected):
    for result in results:
        caption, score = expected[result["image"]]
        assert result["caption"] == caption, result["image"]
        np.testing.assert_allclose(result["score"], score, rtol=1e-5, atol=1e-5)
        assert " ".join(result["words"]) == caption


def _send_together(url, sent):
    """One request per photo, all at once: the responses, in the order sent."""
    async def send_all():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/captions", files=_files([p]))
                                          for p in sent))
    responses = asyncio.run(send_all())
    assert [r.status_code for r in responses] == [200] * len(sent)
    return [r.json() for r in responses]


def _timed_as(monkeypatch, bucket_seconds):
    """The server's warm-up compiles and times as usual, then reports ``bucket_seconds``:
    the batches' sizes no longer depend on how loaded the machine is."""
    warm_up = DynamicBatcher.warm_up

    async def timed_as(self):
        buckets = await warm_up(self)
        self.bucket_seconds = dict(bucket_seconds)
        return buckets

    monkeypatch.setattr(DynamicBatcher, "warm_up", timed_as)


def test_requests_sent_together_are_answered_from_one_decode(run, photos, monkeypatch):
    # Eight requests fill the largest bucket (8 with 4 devices), and timings nearly flat
    # in the rows (an accelerator's) keep it whole: one decode. A full batch goes at once,
    # so the long wait costs nothing; it lets the eight arrive on a loaded machine.
    _timed_as(monkeypatch, {4: 0.010, 8: 0.011})
    sent = (photos * 2)[:8]
    with serving(create_app(run, DEFAULTS, max_batch=8, max_wait_ms=20_000)) as url:
        bodies = _send_together(url, sent)
    assert len({body["batch"]["id"] for body in bodies}) == 1  # one decode for all
    assert {body["batch"]["images"] for body in bodies} == {len(sent)}
    expected = _expected(run, photos)
    for body in bodies:
        _check(body["results"], expected)


def test_a_batch_as_large_as_the_timings_favour_goes_without_waiting(run, photos, monkeypatch):
    # A CPU's timings, 4 images decoding 25% faster per image than 8: a full queue is cut
    # to 4, so 4 waiting images are enough. Eight sent together go as 4 and 4, the second
    # as soon as the first is done, well before the wait (60 s) or the deadline (20 s)
    # would end; waiting for 8 had answered the second four 504. (This was CI's failure:
    # a loaded machine's warm-up timed 8 images this slow, the wait was the deadline.)
    _timed_as(monkeypatch, {4: 0.010, 8: 0.025})
    sent = (photos * 2)[:8]
    with serving(create_app(run, DEFAULTS, max_batch=8, max_wait_ms=60_000,
                            limits=Limits(timeout_s=20))) as url:
        bodies = _send_together(url, sent)
    batches = collections.Counter(body["batch"]["id"] for body in bodies)
    assert sorted(batches.values()) == [4, 4]
    assert {body["batch"]["images"] for body in bodies} == {4}
    expected = _expected(run, photos)
    for body in bodies:
        _check(body["results"], expected)


def _batcher(run, bucket_seconds):
    served = Served.of_run(run, DEFAULTS, max_batch=8)
    side = served.image_size
    batcher = DynamicBatcher(served.default_search, (side, side, 3), max_wait_ms=10,
                             queue_images=64, make_search=served.make_search)
    batcher.bucket_seconds = bucket_seconds
    return batcher


def test_a_batch_is_cut_to_the_bucket_its_timings_favour(run):
    # 4 devices: buckets 4 and 8. Time growing with the rows (a CPU): 5 or 7 waiting
    # images decode faster as 4 now and the rest later than padded to 8 (400 images/s
    # against 250 and 350); a full bucket stays whole (400 against 400).
    cpu = _batcher(run, {4: 0.010, 8: 0.020})
    assert cpu.search(DEFAULTS).buckets == [4, 8]
    assert [cpu.batch_images(n) for n in (1, 3, 4, 5, 7, 8)] == [1, 3, 4, 4, 4, 8]
    # Nearly flat (an accelerator): padding is cheaper than a second decode.
    flat = _batcher(run, {4: 0.010, 8: 0.011})
    assert [flat.batch_images(n) for n in (3, 5, 8)] == [3, 5, 8]
    # Within 10% of each other: the larger batch.
    assert _batcher(run, {4: 0.010, 8: 0.0175}).batch_images(8) == 8
    assert _batcher(run, {4: 0.010, 8: 0.0225}).batch_images(8) == 4
    # Not timed yet: everything waiting.
    assert _batcher(run, {}).batch_images(5) == 5
    # A batch stops waiting at what a full queue would be cut to; other options at max_batch.
    assert [_batcher(run, seconds).enough_images(DEFAULTS)
            for seconds in ({4: 0.010, 8: 0.020}, {4: 0.010, 8: 0.025}, {})] == [8, 4, 8]
    assert _batcher(run, {4: 0.010, 8: 0.025}).enough_images(SearchOptions(beam_size=2)) == 8


def test_the_jobs_cut_from_a_batch_lead_the_next_one(run, photos, monkeypatch):
    _timed_as(monkeypatch, {4: 0.010, 8: 0.020})
    sent = (photos * 2)[:6]  # all arrive within the wait (4 s, on a loaded machine too)
    with serving(create_app(run, DEFAULTS, max_batch=8, max_wait_ms=4000)) as url:
        bodies = _send_together(url, sent)
    batches = collections.Counter(body["batch"]["id"] for body in bodies)
    assert sorted(batches.values()) == [2, 4]  # 4 now, the 2 left over lead the next
    assert {body["batch"]["id"]: body["batch"]["images"] for body in bodies} == \
        {batch: count for batch, count in batches.items()}
    expected = _expected(run, photos)
    for body in bodies:
        _check(body["results"], expected)


def test_images_of_one_request_in_order_with_a_bad_file_named(run, photos):
    garbage = ("notes.txt", b"these are not pixels")
    sent = [photos[0], garbage, photos[1], photos[2]]
    expected = _expected(run, photos)
    with serving(create_app(run, DEFAULTS, max_batch=8)) as url:
        response = httpx.post(f"{url}/v1/captions", files=_files(sent), timeout=60)
        assert response.status_code == 200
        results = response.json()["results"]
        assert [r["image"] for r in results] == [name for name, _ in sent]
        assert "notes.txt" in results[1]["error"] and "not a readable image" in results[1]["error"]
        _check([results[0], *results[2:]], expected)

        only_bad = httpx.post(f"{url}/v1/captions", files=_files([garbage]), timeout=60)
        assert only_bad.status_code == 422
        assert "notes.txt" in only_bad.json()["results"][0]["error"]

        # One raw image as the body, options in the query string; attention on request.
        raw = httpx.post(f"{url}/v1/captions?beam=1&attention=true&name=cat.png",
                         content=photos[3][1], headers={"content-type": "image/png"},
                         timeout=60)
        assert raw.status_code == 200
        result = raw.json()["results"][0]
        greedy = _expected(run, [("cat.png", photos[3][1])], SearchOptions(max_length=12))
        _check([result], greedy)
        grid = np.asarray(result["attention"])
        assert grid.shape[0] == len(result["words"]) and grid.shape[1] == grid.shape[2]
        np.testing.assert_allclose(grid.sum(axis=(1, 2)), 1.0, atol=1e-3)

        model = httpx.get(f"{url}/v1/model").json()
        assert model["vocabulary_size"] == len(run.vocabulary)
        assert model["checkpoint_step"] == run.step and len(model["devices"]) == 4
        assert model["search_defaults"]["beam_size"] == 3 and model["decoder_variant"] == "soft"
        assert model["batching"]["queued_images"] == 0  # every request above is answered
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        assert "/v1/captions" in httpx.get(f"{url}/openapi.json").json()["paths"]


def test_limits_are_answered_without_disturbing_the_service(run, photos):
    limits = Limits(max_body_bytes=700_000, max_images=4, queue_images=4, timeout_s=1.5)
    big = max(photos, key=lambda p: len(p[1]))
    small = min(photos, key=lambda p: len(p[1]))
    assert len(big[1]) > limits.max_body_bytes > 4 * len(small[1])
    # Fewer than 4 images wait up to 5 s for company, past their 1.5 s deadline; 4 images
    # fill a batch (4 devices) and go at once.
    with serving(create_app(run, DEFAULTS, max_batch=4, max_wait_ms=5000, limits=limits)) as url:
        post = lambda files, **kw: httpx.post(f"{url}/v1/captions", files=files,  # noqa: E731
                                              timeout=60, **kw)
        assert post(_files([big])).status_code == 413  # body over the limit
        assert post(_files([small] * 5)).status_code == 413  # over max_images
        assert post(_files([small]), data={"beam": "99"}).status_code == 422
        assert post(_files([small]), data={"temperature": "0.5", "beam": "3"}).status_code == 422

        async def crowd():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                waiting = asyncio.create_task(client.post("/v1/captions",
                                                          files=_files([small] * 3)))
                while not waiting.done() and \
                        (await client.get("/v1/model")).json()["batching"]["queued_images"] < 3:
                    await asyncio.sleep(0.02)  # until 3 of the queue's 4 images wait
                full = await client.post("/v1/captions", files=_files([small] * 2))
                return await waiting, full
        timed_out, full = asyncio.run(crowd())
        assert full.status_code == 503 and full.headers["retry-after"] == "1"
        assert timed_out.status_code == 504
        answered = post(_files([small] * 4))  # the worker and the queue carry on
        assert answered.status_code == 200
        _check(answered.json()["results"], _expected(run, [small]))


@pytest.mark.parametrize("flags, message", [
    (["--max-batch", "0"], "--max-batch must be at least 1, got 0"),
    (["--max-images", "0"], "--max-images must be at least 1, got 0"),
    (["--max-wait-ms", "-5"], "--max-wait-ms must be at least 0, got -5"),
    (["--timeout-s", "0"], "--timeout-s must be above 0, got 0"),
    (["--max-body-mb", "-1"], "--max-body-mb must be above 0, got -1"),
    (["--max-wait-ms", "30000", "--timeout-s", "30"],
     "--max-wait-ms (30000) must be below --timeout-s (30 s)"),
    (["--max-images", "64", "--queue-images", "16"],
     "--queue-images (16) must be at least --max-images (64)"),
    (["--max-pixels", "0"], "--max-pixels must be at least 1, got 0"),
    (["--max-decode-mb", "100"],
     "--max-decode-mb (100) must hold one image of --max-pixels (40000000): 916 MB"),
])
def test_limits_out_of_range_are_refused_before_the_run_loads(tmp_path, capsys, flags, message):
    # The run directory is not there either: the flags are checked first.
    assert cli.main(["serve", "--workdir", str(tmp_path / "none"), *flags]) == 2
    assert f"jaxcap serve: error: {message}" in capsys.readouterr().err


def test_ready_only_after_the_default_search_is_compiled_and_defaults_never_compile(
        run, photos, monkeypatch):
    release = threading.Event()
    warm_up = DynamicBatcher.warm_up

    async def held_warm_up(self):
        await asyncio.get_running_loop().run_in_executor(None, release.wait)
        return await warm_up(self)

    monkeypatch.setattr(DynamicBatcher, "warm_up", held_warm_up)
    options = SearchOptions(beam_size=2, max_length=9)  # compiled by nobody before this test
    with serving(create_app(run, options, max_batch=8), wait_ready=False) as url:
        assert httpx.get(f"{url}/readyz").status_code == 503
        release.set()
        deadline = time.time() + 120
        while httpx.get(f"{url}/readyz").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.05)
        compiled = httpx.get(f"{url}/v1/model").json()["batching"]["compiled_programs"]
        assert compiled == 2  # buckets 4 and 8, held by the server, not in jit's caches
        jitted = decode._search._cache_size()
        for count in (1, 3, 4, 5, 8):
            response = httpx.post(f"{url}/v1/captions", files=_files((photos * 2)[:count]),
                                  timeout=60)
            assert response.status_code == 200
        model = httpx.get(f"{url}/v1/model").json()["batching"]
        assert model["compiled_programs"] == compiled  # every bucket was compiled at start
        assert decode._search._cache_size() == jitted


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_200_requests_from_32_clients_each_get_their_own_answer(trained_run, run, photos,
                                                                tmp_path):
    """``jaxcap serve`` itself, in its own process: nothing lost or mixed up, and its
    memory after the storm within 10% of what it was after warm-up traffic."""
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "jaxcap.cli", "serve", "--workdir", str(trained_run),
         "--port", str(port), "--max-batch", "16", "--max-length", "12"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            assert time.time() < deadline
            time.sleep(0.2)
        expected = _expected(run, photos)
        rng = np.random.default_rng(0)
        requests = [[photos[i] for i in rng.choice(len(photos), rng.integers(1, 4))]
                    for _ in range(200)]

        async def storm(requests):
            gate = asyncio.Semaphore(32)
            async with httpx.AsyncClient(base_url=url, timeout=120,
                                         limits=httpx.Limits(max_connections=32)) as client:
                async def one(sent):
                    async with gate:
                        return await client.post("/v1/captions", files=_files(sent))
                return await asyncio.gather(*(one(sent) for sent in requests))

        # Warm-up traffic first: thread pools, connection buffers and allocator arenas are
        # made on first use; what must not grow is what the storm leaves behind after that.
        assert {r.status_code for r in asyncio.run(storm(requests[:64]))} == {200}
        warm_rss = _rss_kib(process.pid)
        responses = asyncio.run(storm(requests))
        assert [r.status_code for r in responses] == [200] * 200
        batches = set()
        for sent, response in zip(requests, responses):
            results = response.json()["results"]
            assert [r["image"] for r in results] == [name for name, _ in sent]
            _check(results, expected)
            batches.add(response.json()["batch"]["id"])
        assert len(batches) < 200  # requests shared decodes
        assert _rss_kib(process.pid) <= 1.10 * warm_rss
    finally:
        process.terminate()
        process.wait(30)
        log.close()
    lines = (tmp_path / "serve.log").read_text()
    assert lines.count("latency_ms=") == 64 + 200  # one log line per request


def _memory_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads peak RSS of /proc")
def test_a_decompression_bomb_gets_its_error_without_being_decoded(run, photos):
    """A PNG of about 100 KB that decodes to 100 Mpx (100 MB as gray, 300 MB as RGB) is
    refused from its header, naming it, while the request's other image is captioned; the
    server's (this process's) resident memory rises by less than 64 MB meanwhile."""
    bomb = bomb_png()
    assert len(bomb) < 500_000
    with serving(create_app(run, DEFAULTS, max_batch=8)) as url:
        assert httpx.post(f"{url}/v1/captions", files=_files(photos[:1]),
                          timeout=60).status_code == 200  # first-use allocations
        Path("/proc/self/clear_refs").write_text("5")  # the peak is now the current size
        before = _memory_kib("VmRSS")
        response = httpx.post(f"{url}/v1/captions", files=_files([("bomb.png", bomb),
                                                                  photos[0]]), timeout=60)
        peak = _memory_kib("VmHWM")
    assert response.status_code == 200
    refused, captioned = response.json()["results"]
    assert refused["error"].startswith("bomb.png: decodes to 10000 x 10000 pixels")
    assert "over the limit of 40.0 Mpx" in refused["error"]
    _check([captioned], _expected(run, photos[:1]))
    assert peak - before < 64 * 1024, (before, peak)


def test_the_decode_budget_bounds_the_bytes_decoded_at_once():
    async def crowd():
        budget, held, most = DecodeBudget(100), [0], [0]

        async def decode(share):
            async with budget.hold(share):
                held[0] += share
                most[0] = max(most[0], held[0])
                await asyncio.sleep(0.01)
                held[0] -= share
        await asyncio.gather(*(decode(share) for share in (40, 40, 40, 30, 70, 10, 100)))
        return most[0], budget.used
    most, left = asyncio.run(crowd())
    assert most <= 100 and left == 0


def test_bad_requests_get_a_status_that_names_what_is_wrong_never_500(run, photos):
    small = min(photos, key=lambda p: len(p[1]))
    limits = Limits(max_body_bytes=200_000)
    with serving(create_app(run, DEFAULTS, max_batch=8, limits=limits)) as url:
        post = lambda **kw: httpx.post(f"{url}/v1/captions", timeout=60, **kw)  # noqa: E731
        # Every option out of its range is named; those that failed while tracing had
        # answered 500 (an n-gram longer than the caption, a top-k over the vocabulary).
        vocabulary = len(run.vocabulary)
        for fields, message in [
                ({"no_repeat_ngram": "30"}, "no_repeat_ngram=30: must be between 0 and 4"),
                ({"max_length": "4", "no_repeat_ngram": "4"},
                 "no_repeat_ngram=4: must be between 0 and 3"),
                ({"top_k": str(vocabulary + 1)},
                 f"top_k={vocabulary + 1}: must be between 0 and {vocabulary}"),
                ({"min_length": "11"}, "min_length=11: must be between 0 and 10"),
                ({"seed": str(2 ** 40)}, f"seed={2 ** 40}: must be between 0 and {2 ** 32 - 1}"),
                ({"seed": "-1"}, "seed=-1: must be between 0"),
                ({"temperature": "nan"}, "temperature=nan: must be between 0.0 and 100.0"),
                ({"length_penalty": "1e400"}, "length_penalty=inf: must be between -10.0"),
                ({"beam": "two"}, "beam='two': must be an integer")]:
            response = post(files=_files([small]), data=fields)
            assert response.status_code == 422, fields
            assert message in response.json()["detail"], (fields, response.json())

        # A body streamed without Content-Length over the limit: 413 (it had been 500).
        def chunks():
            for _ in range(40):
                yield b"\0" * 10_000
        streamed = post(content=chunks(), headers={"content-type": "image/png"})
        assert streamed.status_code == 413 and "over the limit" in streamed.json()["detail"]

        # An empty first file is that file's error, not the request's.
        response = post(files=_files([("empty.png", b""), small]))
        assert response.status_code == 200
        empty, captioned = response.json()["results"]
        assert empty["error"] == "empty.png: empty file (0 bytes)"
        _check([captioned], _expected(run, [small]))
        assert post(content=b"", headers={"content-type": "image/png"}).status_code == 422

        # What is served names the run, not where it lies on the server's disk.
        model = httpx.get(f"{url}/v1/model").json()
        assert model["run"] == run.workdir.name and str(run.workdir.parent) not in str(model)


@pytest.mark.parametrize("part", ["warm_up", "run_forever", "compile_forever"])
def test_a_service_whose_decoding_dies_turns_not_ready_and_stops(run, photos, monkeypatch,
                                                                  part):
    """If the decode loop, the compiling loop or the warm-up ends with an error, requests
    would wait for a worker that is gone: /readyz says so, requests get 503, and the server
    is told to stop (``jaxcap serve`` then exits non-zero, below)."""
    async def dies(self, *args):
        await asyncio.sleep(0.2)
        raise RuntimeError(f"{part} broke")

    monkeypatch.setattr(DynamicBatcher, part, dies)
    stopped = threading.Event()
    with serving(create_app(run, DEFAULTS, max_batch=8, on_failure=stopped.set),
                 wait_ready=False) as url:
        assert stopped.wait(60)
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        assert f"{part} broke" in ready.json()["reason"]
        response = httpx.post(f"{url}/v1/captions", files=_files(photos[:1]), timeout=60)
        assert response.status_code == 503 and "stopped" in response.json()["detail"]


def test_jaxcap_serve_exits_non_zero_when_its_decoding_dies(trained_run, monkeypatch, capsys):
    async def dies(self, *args):
        raise RuntimeError("the decoder broke")

    monkeypatch.setattr(DynamicBatcher, "run_forever", dies)
    assert cli.main(["serve", "--workdir", str(trained_run), "--port", str(_free_port()),
                     "--max-batch", "4"]) == 2
    assert "the decode loop failed: RuntimeError: the decoder broke" in capsys.readouterr().err


def test_a_client_looping_over_option_values_neither_grows_the_programs_nor_slows_defaults(
        run, photos):
    """50 distinct option values, 10 of them needing programs of their own (beam size and
    maximum length set a program's shapes): the server holds at most the stated bound of
    programs throughout (none in jit's caches), every request is answered, and default
    requests sent meanwhile keep their median latency within 2x (programs compile in a
    thread of their own, at a lower priority)."""
    small = min(photos, key=lambda p: len(p[1]))
    varied = ([{"beam": str(beam), "max_length": str(length)}
               for beam, length in itertools.product((2, 4), (6, 8, 10, 14, 16))] +
              [{"min_length": str(n)} for n in range(10)] + [{"top_k": str(k)} for k in range(10)] +
              [{"temperature": str(0.5 + t / 10), "seed": str(t)} for t in range(10)] +
              [{"length_penalty": str(p / 4), "no_repeat_ngram": "0"} for p in range(10)])
    assert len(varied) == 50 and len({str(sorted(v.items())) for v in varied}) == 50
    # A long deadline: on a loaded machine (CI runs two test modules at once) the compiles,
    # at their lower priority, may take a while; what is asserted is that they happen.
    limits = Limits(cached_searches=2, timeout_s=300)
    with serving(create_app(run, DEFAULTS, max_batch=4, limits=limits)) as url:
        def model():
            return httpx.get(f"{url}/v1/model").json()["batching"]

        def default_latency():
            started = time.perf_counter()
            response = httpx.post(f"{url}/v1/captions", files=_files([small]), timeout=60)
            assert response.status_code == 200
            return time.perf_counter() - started

        bound = model()["programs_bound"]
        assert bound == 3 and model()["compiled_programs"] == 1  # 1 bucket: 4 images, 4 devices
        jitted = decode._search._cache_size()
        before = [default_latency() for _ in range(15)]
        held, answers = [], []

        def loop_over_values():
            for fields in varied:
                answers.append(httpx.post(f"{url}/v1/captions", files=_files([small]),
                                          data=fields, timeout=60).status_code)
                held.append(model()["compiled_programs"])

        client = threading.Thread(target=loop_over_values)
        client.start()
        during = []
        while client.is_alive():
            during.append(default_latency())
        client.join()
        assert answers == [200] * 50
        assert max(held) <= bound and decode._search._cache_size() <= jitted
        assert len(during) >= 5 and np.median(during) <= 2 * np.median(before), (before, during)


# The fuzz's size in the suite; JAXCAP_FUZZ_EXAMPLES sets a longer run.
FUZZ_EXAMPLES = int(os.environ.get("JAXCAP_FUZZ_EXAMPLES", "60"))


def test_fuzzing_the_live_api_finds_no_500_and_good_requests_keep_their_captions(run, photos):
    """Hypothesis drives a real HTTP client against uvicorn on loopback with requests
    made of hostile parts: search options of every type and range, files that are photos,
    truncated or bit-flipped photos, garbage, empty, decompression bombs and PNG headers
    claiming billions of pixels, as multipart forms or raw bodies. No answer is a 500,
    /healthz answers throughout (polled from another thread), and a good request after
    each one gets the caption ``CaptionSearch`` gives."""
    hypothesis = pytest.importorskip("hypothesis", reason="the fuzz is written with Hypothesis")
    st = hypothesis.strategies
    from tests.image_fixtures import png_bytes

    small = min(photos, key=lambda p: len(p[1]))
    photo = small[1]
    kinds = [photo, photo[:len(photo) // 3], b"", b"GIF89a" + bytes(20), bomb_png(8000, 6000),
             png_bytes(100_000, 100_000, 8, 0, b""), png_bytes(2, 2, 16, 2, bytes(26))]
    flipped = st.lists(st.tuples(st.integers(0, len(photo) - 1), st.integers(1, 255)),
                       min_size=1, max_size=8).map(lambda flips: bytes(
                           b ^ dict(flips).get(i, 0) for i, b in enumerate(photo)))
    data = st.one_of(st.sampled_from(kinds), flipped, st.binary(max_size=300))
    files = st.lists(st.tuples(st.text(max_size=12), data), max_size=4)
    near = st.integers(-2, 16).map(str)  # mostly in range: the search runs with them
    value = st.one_of(near, near, near, st.integers(-2 ** 64, 2 ** 64).map(str),
                      st.floats().map(repr), st.text(max_size=8),
                      st.sampled_from(["", "nan", "-inf", "1e309", "0x10", "3.0", " 2 "]))
    fields = st.dictionaries(st.sampled_from(["beam", "max_length", "min_length", "top_k",
                                              "no_repeat_ngram", "temperature", "seed",
                                              "length_penalty", "attention", "name", "other"]),
                             value, max_size=5)
    good = _expected(run, [small])
    limits = Limits(max_beam=4, max_length=14, cached_searches=4, timeout_s=60)
    with serving(create_app(run, DEFAULTS, max_batch=4, limits=limits)) as url, \
            httpx.Client(base_url=url, timeout=120) as client:
        unhealthy, done = [], threading.Event()

        def poll_health():
            with httpx.Client(base_url=url, timeout=10) as poller:
                while not done.wait(0.2):
                    try:
                        if poller.get("/healthz").status_code != 200:
                            unhealthy.append("status")
                    except httpx.HTTPError as error:
                        unhealthy.append(repr(error))

        poller = threading.Thread(target=poll_health)
        poller.start()
        statuses = collections.Counter()

        @hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                             derandomize=True, suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(files=files, fields=fields, raw=st.booleans())
        def hostile(files, fields, raw):
            if raw:
                response = client.post("/v1/captions", params=fields,
                                       content=files[0][1] if files else b"",
                                       headers={"content-type": "image/png"})
            else:
                response = client.post("/v1/captions", data=fields,
                                       files=[("images", f) for f in files] or None)
            statuses[response.status_code] += 1
            assert response.status_code in (200, 413, 422, 503, 504), response.text
            assert isinstance(response.json(), dict)
            answer = client.post("/v1/captions", files=_files([small]))
            assert answer.status_code == 200
            _check(answer.json()["results"], good)

        try:
            hostile()
        finally:
            done.set()
            poller.join()
        assert not unhealthy, unhealthy
        assert statuses[200] and statuses[422], statuses  # both kinds of answer were reached
        print(f"fuzz: {FUZZ_EXAMPLES} examples, statuses {dict(statuses)}")


@contextlib.contextmanager
def _browser():
    """Headless Chromium, and afterwards no trace of it in ``/tmp``: it left an empty
    ``org.chromium.Chromium.*`` folder there (its profile's singleton socket) on
    every run. Its ``TMPDIR`` is a folder of its own, removed after it quits, with a
    short path: a socket's path must fit in 108 bytes, and under ``tmp_path`` it did
    not (the browser exited at start)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver "
                    "(.ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium drives the browser")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1200,900"):
        options.add_argument(flag)
    with tempfile.TemporaryDirectory(prefix="jaxcap-chromium-") as scratch:
        service = webdriver.ChromeService(executable_path=driver,
                                          env={**os.environ, "TMPDIR": scratch})
        browser = webdriver.Chrome(service=service, options=options)
        try:
            yield browser
        finally:
            browser.quit()


def test_the_page_captions_an_upload_and_shows_a_words_attention(run, sample_photos, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with _browser() as browser, serving(create_app(run, DEFAULTS, max_batch=8)) as url:
        browser.get(url)
        chooser = browser.find_element(By.ID, "files")
        browser.execute_script("arguments[0].hidden = false", chooser)
        chooser.send_keys(dict(sample_photos)["chelsea.png"])
        WebDriverWait(browser, 60).until(
            lambda b: b.find_elements(By.CSS_SELECTOR, "figure .word"))
        words = browser.find_elements(By.CSS_SELECTOR, "figure .word")
        expected = _expected(run, [("chelsea.png",
                                    Path(dict(sample_photos)["chelsea.png"]).read_bytes())])
        assert " ".join(w.text for w in words) == expected["chelsea.png"][0]
        overlay = browser.find_element(By.CSS_SELECTOR, "figure canvas.overlay")
        shaded = ("const c = arguments[0].getContext('2d').getImageData(0, 0, "
                  "arguments[0].width, arguments[0].height).data; let n = 0; "
                  "for (let i = 3; i < c.length; i += 4) n += c[i] > 0; return n;")
        assert browser.execute_script(shaded, overlay) == 0
        ActionChains(browser).move_to_element(words[0]).perform()
        WebDriverWait(browser, 10).until(lambda b: b.execute_script(shaded, overlay) > 0)
        screenshot = tmp_path / "serve_page.png"
        browser.save_screenshot(str(screenshot))
        assert Image.open(screenshot).size[0] > 0
        print(f"screenshot: {screenshot}")
