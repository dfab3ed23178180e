"""``jaxcap serve`` under load: images/s and latency at 1, 8 and 64 concurrent clients.

Three ways to caption the same shapes test images with the same run and search
(beam 3): ``CaptionSearch`` on all of them in one batch (offline, the reference;
also in calls of every bucket size: one image per call is the ceiling of a
service without batching and the best size that of a batching one, so that
``offline_batching_gain`` bounds what batching can gain over one),
``jaxcap serve`` with dynamic batching (``--max-batch 64 --max-wait-ms 10``),
and ``jaxcap serve --max-batch 1`` (every request decoded alone, as a service
without batching would). Each server runs in its own process on loopback; the
clients (keep-alive connections sending prepared requests, in the manner of
wrk) send one image per request and run in this process, so on a small machine
they take some CPU from the server: the figures include that.
Latency is from sending a request to reading its answer.

    python benchmarks/serve_bench.py [--workdir runs/shapes] [--requests 256] [--repetitions 3]

The run is the README's main job (``jaxcap train --config shapes --workdir
runs/shapes``). The last line printed is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import best_seconds, machine  # noqa: E402
from jaxcap.data import shapes  # noqa: E402
from jaxcap.data.images import load_image  # noqa: E402
from jaxcap.decode import CaptionSearch, SearchOptions  # noqa: E402
from jaxcap.runs import load_run  # noqa: E402

BEAM = 3
CONCURRENCY = (1, 8, 64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(workdir: str, max_batch: int):
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "jaxcap.cli", "serve", "--workdir", workdir, "--port", str(port),
         "--beam", str(BEAM), "--max-batch", str(max_batch), "--max-wait-ms", "10",
         "--queue-images", "100000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"jaxcap serve exited with {process.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            if time.time() > deadline:
                raise RuntimeError("jaxcap serve was not ready within 10 minutes")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(60)


def _request(host: str, port: int, image: bytes) -> bytes:
    """A whole ``POST /v1/captions`` with one image, as bytes on the wire (multipart)."""
    boundary = "jaxcapbench"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; "
            f"filename=\"scene.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").encode() + image + \
        f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/captions HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _load(url: str, images: list[bytes], clients: int, requests: int):
    """``requests`` one-image requests from ``clients`` concurrent keep-alive connections:
    (seconds, latencies in ms). A load generator in the manner of wrk: requests are
    prepared bytes and answers are read by their Content-Length, so that on a small
    machine the clients take as little CPU from the server as they can (an httpx client
    at 64 connections took most of a core here)."""
    host, port = url.split("//")[1].split(":")
    wire = [_request(host, int(port), image) for image in images]
    latencies = []
    queue = list(range(requests))

    async def client():
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while queue:
                index = queue.pop()
                start = time.perf_counter()
                writer.write(wire[index % len(wire)])
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                if status != 200:
                    raise RuntimeError(f"status {status}")
                latencies.append(1000 * (time.perf_counter() - start))
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - start, latencies


def measure(url: str, images, clients: int, requests: int, repetitions: int) -> dict:
    asyncio.run(_load(url, images, clients, min(requests, 4 * clients)))  # connections, caches
    best = None
    for _ in range(repetitions):
        seconds, latencies = asyncio.run(_load(url, images, clients, requests))
        if best is None or seconds < best[0]:
            best = (seconds, latencies)
    seconds, latencies = best
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    return dict(images_per_s=requests / seconds, p50_ms=p50, p95_ms=p95, p99_ms=p99)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/shapes")
    parser.add_argument("--requests", type=int, default=256, help="per measurement (at 64 "
                                                                  "clients; fewer below)")
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args()
    if not os.path.isdir(os.path.join(args.workdir, "best")):
        sys.exit(f"{args.workdir} has no trained run: make it with the README's main command "
                 "(jaxcap train --config shapes --workdir runs/shapes) or pass --workdir")
    info = machine()
    print(f"machine: {info}")
    run = load_run(args.workdir)
    spec = shapes.ShapesSpec(**run.config.dataset.shapes.to_dict())
    files = [shapes.encode_jpeg(shapes.scene(spec, "test", i).image) for i in range(64)]

    side, resize = run.config.encoder.image_size, run.config.encoder.resize
    pixels = np.stack([load_image(data, side, resize) for data in files])
    options = SearchOptions(beam_size=BEAM, max_length=run.config.eval.max_length)
    search = CaptionSearch(run.image_model, run.image_variables, run.vocabulary, options,
                           max_batch=len(pixels))
    # The same 64 images offline in calls of each bucket size: one call of 64 is the
    # reference (``share_of_offline``); one image per call is what a service without
    # batching could reach at best, and the best chunk size what a batching one could.
    # A service pays the same per-request costs on top of the decoding either way, so
    # batching gains over one image per call at most what the best chunk size gains
    # offline (``offline_batching_gain``).
    per_chunk = {}
    for size in search.buckets:
        per_chunk[size] = len(pixels) / best_seconds(
            lambda size=size: [search(pixels[i:i + size]) for i in range(0, len(pixels), size)],
            args.repetitions)
        print(f"offline CaptionSearch, {size} images per call: {per_chunk[size]:.1f} images/s")
    offline, offline_single = per_chunk[len(pixels)], per_chunk[1]
    best_size = max(per_chunk, key=per_chunk.get)
    print(f"batching gains at most {per_chunk[best_size] / offline_single:.2f}x offline "
          f"({best_size} images per call)")

    figures = {"offline_images_per_s": offline, "offline_single_images_per_s": offline_single,
               "offline_best_images_per_s": per_chunk[best_size],
               "offline_best_images_per_call": best_size,
               "offline_batching_gain": per_chunk[best_size] / offline_single}
    with server(args.workdir, max_batch=64) as url:
        for clients in CONCURRENCY:
            requests = args.requests if clients == 64 else max(32, args.requests * clients // 64)
            found = measure(url, files, clients, requests, args.repetitions)
            print(f"jaxcap serve, {clients} clients: {found['images_per_s']:.1f} images/s, "
                  f"p50 {found['p50_ms']:.1f} ms, p95 {found['p95_ms']:.1f}, "
                  f"p99 {found['p99_ms']:.1f}")
            figures.update({f"serve_images_per_s_{clients}": found["images_per_s"],
                            **{f"{key[:-3]}_ms_{clients}": value for key, value in found.items()
                               if key.endswith("_ms")}})
    with server(args.workdir, max_batch=1) as url:
        found = measure(url, files, 64, args.requests, args.repetitions)
        print(f"jaxcap serve --max-batch 1, 64 clients: {found['images_per_s']:.1f} images/s, "
              f"p99 {found['p99_ms']:.1f} ms")
        figures.update(unbatched_images_per_s_64=found["images_per_s"],
                       unbatched_p99_ms_64=found["p99_ms"])
    figures["ratio_vs_unbatched"] = figures["serve_images_per_s_64"] / \
        figures["unbatched_images_per_s_64"]
    figures["share_of_offline"] = figures["serve_images_per_s_64"] / offline
    figures["share_of_offline_best"] = figures["serve_images_per_s_64"] / per_chunk[best_size]
    print(json.dumps({"machine": info, **{k: round(v, 3) for k, v in figures.items()}}))


if __name__ == "__main__":
    main()
