"""A closed-loop HTTP/1.1 load generator that costs the machine as little as possible.

On a 2-core machine the load generator competes with the service for the same cores: a client
built on httpx and threads spent more CPU per job than the service itself (9.6 ms against 8.4 ms
measured with /proc/<pid>/stat), so the service was measured at a fraction of what it can do.
This one runs `concurrency` keep-alive connections on one asyncio loop, writes each request as
ready bytes and reads the answer by its Content-Length: a fraction of a millisecond per job.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from urllib.parse import urlsplit

__all__ = ["HttpLoadError", "post_closed_loop"]


class HttpLoadError(RuntimeError):
    """The service answered something other than a completed job."""


def _request(host: str, path: str, body: bytes) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("ascii") + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *headers = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    length = None
    for header in headers:
        name, _, value = header.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    if length is None:
        raise HttpLoadError(f"answer {status} without Content-Length (chunked answers are not expected)")
    return status, await reader.readexactly(length)


async def _run(url: str, make_body: Callable[[int], object], check: Callable[[int, bytes], None],
               concurrency: int, duration_s: float) -> tuple[list[float], float]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    latencies: list[float] = []
    counter = iter(range(10**9))
    start = time.perf_counter()
    deadline = start + duration_s

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < deadline:
                request = _request(parts.netloc, parts.path, json.dumps(make_body(next(counter))).encode())
                sent = time.perf_counter()
                writer.write(request)
                status, body = await _read_response(reader)
                latencies.append(time.perf_counter() - sent)
                check(status, body)
        finally:
            writer.close()
            await writer.wait_closed()

    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return latencies, time.perf_counter() - start


def post_closed_loop(url: str, make_body: Callable[[int], object], check: Callable[[int, bytes], None],
                     concurrency: int, duration_s: float) -> tuple[list[float], float]:
    """POST `make_body(n)` as JSON to `url` on `concurrency` connections, each waiting for its
    answer before the next request, for `duration_s`; returns the latencies and the elapsed time.
    `check(status, body)` raises on an answer that is not a success."""
    return asyncio.run(_run(url, make_body, check, concurrency, duration_s))
