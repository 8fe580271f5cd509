"""A small HTTP/1.1 client for the service's AiCSD callbacks and the bridge's service requests.

Why not httpx, nor http.client: on a 2-core gateway the service is bound by Python's interpreter
lock, and each job makes two callbacks (the bridge one request). This client writes requests
itself and reads answers with httptools (llhttp, the parser Node.js and uvicorn use), so no
hand-written parsing decides what an answer means. It speaks only what those requests need: one
request at a time per connection, kept-alive connections per origin shared safely between
threads, TLS for https URLs, no proxies from the environment and no redirects followed.

Its edges are hard: whatever goes wrong inside (a socket error, a malformed answer, a TLS
failure, a URL it cannot send, even a MemoryError) comes out as one `HttpFailure` naming the
cause; `timeout` bounds the whole request, not each read, so a server trickling bytes cannot
hold a job; and an answer larger than `max_answer` bytes fails as soon as that is known, from
its Content-Length before any of the body is read.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httptools

__all__ = ["DEFAULT_MAX_ANSWER", "HttpClient", "HttpFailure", "HttpResponse"]

DEFAULT_MAX_ANSWER = 1 << 20
"""Largest answer body read by default (1 MiB): AiCSD's and the service's answers are small."""

_MAX_HEAD = 64 * 1024  # status line and headers of one answer
_READ_SIZE = 64 * 1024
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_UNSAFE_IN_URL = re.compile(r"[\x00-\x20\x7f]")
_UNSAFE_IN_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class HttpFailure(Exception):
    """No usable answer: the request could not be sent, or the answer was missing, malformed,
    too large or too late. The message names the cause; it is the only error the client raises."""


class _Stale(Exception):
    """A kept-alive connection was closed by the server before it answered: send again."""


class _BadAnswer(Exception):
    """The answer is not HTTP/1.x as expected, or breaks one of the client's limits."""


@dataclass(frozen=True)
class HttpResponse:
    """A complete answer: status, reason phrase, headers (lower-case names) and body."""

    status_code: int
    reason_phrase: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


_Origin = tuple[str, str, int]


class _Answer:
    """httptools callbacks for one answer: collects it and enforces the size limit on the way."""

    __slots__ = (
        "complete",
        "extra",
        "head_done",
        "head_only",
        "headers",
        "keep_alive",
        "max_body",
        "parser",
        "parts",
        "reason",
        "size",
        "until_close",
    )

    def __init__(self, max_body: int, head_only: bool) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.max_body = max_body
        self.head_only = head_only
        self.extra = False
        self._reset()

    def _reset(self) -> None:
        self.reason = b""
        self.headers: dict[str, str] = {}
        self.parts: list[bytes] = []
        self.size = 0
        self.head_done = self.until_close = self.complete = self.keep_alive = False

    def on_message_begin(self) -> None:
        if self.complete:  # bytes after the answer: the connection cannot be trusted again
            self.extra = True

    def on_status(self, data: bytes) -> None:
        self.reason += data

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            return
        self.head_done = True
        self.keep_alive = self.parser.should_keep_alive()  # llhttp forgets it once the message is complete
        length = self.headers.get("content-length")
        if length is not None and int(length) > self.max_body:  # llhttp has checked it is digits
            raise _BadAnswer(f"the answer announces {int(length)} bytes, more than the limit of {self.max_body}")
        no_body = self.head_only or status in (204, 304)
        self.until_close = not no_body and length is None and "transfer-encoding" not in self.headers
        if self.head_only:
            self.complete = True

    def on_body(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_body:
            raise _BadAnswer(f"the answer is longer than the limit of {self.max_body} bytes")
        self.parts.append(data)

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True
        elif not self.extra:
            self._reset()  # an interim 1xx answer: the real one follows


class _Connection:
    """One socket to one origin."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray(_READ_SIZE)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def exchange(self, head: bytes, body: bytes, head_only: bool, max_answer: int, deadline: float,
                 reused: bool) -> tuple[HttpResponse, bool]:
        """Send one request and read its answer; also says whether the connection can be kept."""
        try:
            self.sock.settimeout(_remaining(deadline))
            self.sock.sendall(head + body)  # one write: our largest body, a batch of 64 jobs, is about 40 KB
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            if reused:
                raise _Stale() from None
            raise
        answer = _Answer(max_answer, head_only)
        received = 0
        view = memoryview(self.buffer)
        while not answer.complete:
            self.sock.settimeout(_remaining(deadline))
            try:
                count = self.sock.recv_into(self.buffer)
            except (ConnectionResetError, ConnectionAbortedError):
                if reused and not received:
                    raise _Stale() from None
                raise
            if not count:
                if reused and not received:
                    raise _Stale()
                if answer.until_close:
                    break  # the body ends when the server closes
                raise _BadAnswer(_cut_short(answer, received))
            received += count
            if not answer.head_done and received > _MAX_HEAD:
                raise _BadAnswer(f"the answer's status line and headers are longer than {_MAX_HEAD} bytes")
            answer.parser.feed_data(view[:count])
        keep = not (answer.until_close or answer.extra or head_only) and answer.keep_alive
        status = answer.parser.get_status_code()
        reason = answer.reason.decode("latin-1")
        return HttpResponse(status, reason, b"".join(answer.parts), answer.headers), keep


def _cut_short(answer: _Answer, received: int) -> str:
    if not received:
        return "the server closed the connection without answering"
    if not answer.head_done:
        return "the server closed the connection in the middle of the answer's headers"
    length = answer.headers.get("content-length")
    if length is not None:
        return f"the connection closed after {answer.size} of {length} body bytes"
    return f"the connection closed after {answer.size} body bytes, before the answer's end"


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the request's time limit ran out")
    return left


class HttpClient:
    """Sends one request at a time per connection, keeping up to `max_idle` idle connections per
    origin for reuse; safe to share between threads.

    `timeout` bounds each whole request (connecting, sending, reading the answer);
    `connect_timeout` bounds connecting (and the TLS handshake) within it. Answers longer than
    `max_answer` bytes are refused. `ssl_context` verifies https servers (default: the system's
    CAs, hostname checked).
    """

    # CPU per request, a small PUT answered 200 on one kept-alive loopback connection
    # (time.process_time over 12 rounds of 2000 requests, server in another process, 2-core
    # machine shared with other work, 2026-11-26; best / median round, two runs): this client on
    # httptools 20-24 / 29-34 us, the hand parser it replaced 20-21 / 27 us, http.client
    # 79-80 / 96-120 us. llhttp costs about 10% more than the hand parser (Python callbacks per
    # header) and a third of http.client; what it buys is a parser that refuses what HTTP forbids.

    def __init__(
        self,
        timeout: float,
        *,
        connect_timeout: float | None = None,
        max_idle: int = 8,
        max_answer: int = DEFAULT_MAX_ANSWER,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.timeout = timeout
        self.connect_timeout = timeout if connect_timeout is None else min(connect_timeout, timeout)
        self.max_idle = max_idle
        self.max_answer = max_answer
        self._ssl_context = ssl_context
        self._idle: dict[_Origin, list[_Connection]] = defaultdict(list)
        self._lock = threading.Lock()
        self._closed = False

    def request(
        self, method: str, url: str, body: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> HttpResponse:
        """Send `body` (always with a Content-Length) and read the whole answer, or raise HttpFailure."""
        deadline = time.monotonic() + self.timeout
        try:
            origin, target = _split(url)
            head = _request_head(method, target, _host_header(origin), len(body), headers or {})
            head_only = method.upper() == "HEAD"
            connection, reused = self._take(origin, deadline)
        except HttpFailure:
            raise
        except Exception as exc:
            raise HttpFailure(_describe(exc)) from exc
        try:
            try:
                response, keep = connection.exchange(head, body, head_only, self.max_answer, deadline, reused)
            except _Stale:
                connection.close()
                connection = self._connect(origin, deadline)
                response, keep = connection.exchange(head, body, head_only, self.max_answer, deadline, False)
        except HttpFailure:  # a fresh connection for a stale one could not be made
            raise
        except Exception as exc:
            connection.close()
            raise HttpFailure(_describe(exc)) from exc
        if keep:
            self._give_back(origin, connection)
        else:
            connection.close()
        return response

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle = [c for connections in self._idle.values() for c in connections]
            self._idle.clear()
        for connection in idle:
            connection.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take(self, origin: _Origin, deadline: float) -> tuple[_Connection, bool]:
        with self._lock:
            idle = self._idle.get(origin)
            if idle:
                return idle.pop(), True
        return self._connect(origin, deadline), False

    def _connect(self, origin: _Origin, deadline: float) -> _Connection:
        scheme, host, port = origin
        try:
            sock = socket.create_connection((host, port), timeout=min(self.connect_timeout, _remaining(deadline)))
        except Exception as exc:
            raise HttpFailure(_describe(exc)) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a small request is not held back
            if scheme == "https":
                sock.settimeout(min(self.connect_timeout, _remaining(deadline)))
                sock = self._tls().wrap_socket(sock, server_hostname=host)
        except Exception as exc:
            sock.close()
            raise HttpFailure(_describe(exc)) from exc
        return _Connection(sock)

    def _tls(self) -> ssl.SSLContext:
        with self._lock:
            if self._ssl_context is None:
                self._ssl_context = ssl.create_default_context()
            return self._ssl_context

    def _give_back(self, origin: _Origin, connection: _Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle[origin]) < self.max_idle:
                self._idle[origin].append(connection)
                return
        connection.close()


def _split(url: str) -> tuple[_Origin, str]:
    """The origin and the request target of an http(s) URL; anything else is an HttpFailure."""
    if not url.isascii():
        position, char = next((i, c) for i, c in enumerate(url) if not c.isascii())
        raise HttpFailure(
            f"URL has a character that is not ASCII ({char!r} at position {position}); percent-encode it"
        )
    if _UNSAFE_IN_URL.search(url):  # checked before urlsplit, which silently drops tabs and line breaks
        raise HttpFailure(f"URL {url[:200]!r} has spaces or control characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpFailure(f"not an http(s) URL: {url[:200]!r}")
    if "@" in parts.netloc:
        raise HttpFailure("URL carries credentials (user@host), which this client never sends")
    try:
        port = parts.port
    except ValueError as exc:
        raise HttpFailure(f"bad port in URL {url[:200]!r}: {exc}") from None
    if port == 0:
        raise HttpFailure(f"URL {url[:200]!r} has port 0")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return (parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)), target


def _host_header(origin: _Origin) -> str:
    scheme, host, port = origin
    default = 443 if scheme == "https" else 80
    return (f"[{host}]" if ":" in host else host) + ("" if port == default else f":{port}")


def _request_head(method: str, target: str, host: str, length: int, headers: Mapping[str, str]) -> bytes:
    if not _TOKEN.fullmatch(method):
        raise HttpFailure(f"not an HTTP method: {method[:50]!r}")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", f"Content-Length: {length}"]
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name) or _UNSAFE_IN_VALUE.search(value):
            raise HttpFailure(f"header {name[:50]!r} has a name or value that cannot be sent")
        if name.lower() not in ("host", "content-length"):
            lines.append(f"{name}: {value}")
    lines += ["", ""]
    try:
        return "\r\n".join(lines).encode("latin-1")
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start:exc.end]
        raise HttpFailure(f"a header value has a character HTTP cannot carry: {bad!r}") from None


def _describe(exc: BaseException) -> str:
    """One line naming the cause, fit for a callback answer shown in the AiCSD UI."""
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"Timeout: the request did not complete within its time limit ({exc or 'timed out'})"
    if isinstance(exc, ConnectionRefusedError):
        return f"ConnectionRefused: {exc}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: the server's certificate was not accepted: {exc.verify_message or exc}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, _BadAnswer):
        return f"BadAnswer: {exc}"
    if isinstance(exc, httptools.HttpParserCallbackError) and exc.__context__ is not None:
        return _describe(exc.__context__)  # raised by one of our callbacks: that is the cause
    if isinstance(exc, httptools.HttpParserError):
        return f"BadAnswer: not a valid HTTP/1.x answer: {exc}"
    if isinstance(exc, httptools.HttpParserUpgrade):
        return "BadAnswer: the server switched protocols, which this client never asks for"
    if isinstance(exc, MemoryError):
        return "MemoryError: not enough memory to read the answer"
    return f"{type(exc).__name__}: {exc}"
