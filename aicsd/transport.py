"""A small HTTP/1.1 client for the service's AiCSD callbacks and the bridge's service requests.

Why not httpx, nor http.client: on a 2-core gateway the service is bound by Python's interpreter
lock, and each job makes two callbacks (the bridge one request). Against the AiCSD stand-in on
loopback, a request cost 1.3 ms of CPU with httpx, 0.47 ms with http.client (most of it parsing
the answer's headers with the email package) and 0.28 ms with this client. It speaks only what
those requests need: one request at a time per connection, Content-Length or chunked answers,
kept-alive connections per origin shared safely between threads, TLS for https URLs, no proxies
from the environment and no redirects followed.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import threading
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO
from urllib.parse import urlsplit

__all__ = ["HttpClient", "HttpFailure", "HttpResponse"]

_MAX_LINE = 65536
_MAX_HEADERS = 200
_UNSAFE_IN_TARGET = re.compile(r"[\x00-\x20\x7f]")


class _Stale(Exception):
    """A kept-alive connection was closed by the server before it answered: send again."""


class _BadAnswer(Exception):
    """The answer is not HTTP/1.x as expected."""


class HttpFailure(Exception):
    """No answer: the connection failed or timed out. The message names the cause."""


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


class _Connection:
    """One socket to one origin, with a buffered reader for answers."""

    def __init__(self, origin: _Origin, connect_timeout: float, timeout: float) -> None:
        scheme, host, port = origin
        sock = socket.create_connection((host, port), timeout=connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a small request is not held back
            if scheme == "https":
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            sock.settimeout(timeout)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.reader: BinaryIO = sock.makefile("rb")
        self.host_header = (f"[{host}]" if ":" in host else host) + ("" if port == (443 if scheme == "https" else 80)
                                                                      else f":{port}")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def exchange(self, method: str, target: str, body: bytes, headers: Mapping[str, str],
                 reused: bool) -> tuple[HttpResponse, bool]:
        """Send one request and read its answer; also says whether the connection can be kept."""
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host_header}",
                 *(f"{name}: {value}" for name, value in headers.items()), "", ""]
        try:
            self.sock.sendall("\r\n".join(lines).encode("latin-1") + body)
            status_line = self.reader.readline(_MAX_LINE + 1)
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            if reused:
                raise _Stale() from None
            raise
        if not status_line and reused:
            raise _Stale()
        while True:
            version, status, reason = _status(status_line)
            fields = self._headers()
            if not 100 <= status < 200:
                break
            status_line = self.reader.readline(_MAX_LINE + 1)  # an interim answer: the real one follows
        connection = fields.get("connection", "").lower()
        keep = "close" not in connection and (version == "HTTP/1.1" or "keep-alive" in connection)
        if method == "HEAD" or status in (204, 304):
            data = b""
        elif "chunked" in fields.get("transfer-encoding", "").lower():
            data = self._chunked()
        elif "content-length" in fields:
            data = self._exactly(_length(fields["content-length"]))
        else:
            data, keep = self.reader.read(), False  # the body ends when the server closes
        return HttpResponse(status, reason, data, fields), keep

    def _headers(self) -> dict[str, str]:
        fields: dict[str, str] = {}
        for _ in range(_MAX_HEADERS):
            line = self.reader.readline(_MAX_LINE + 1)
            if line in (b"\r\n", b"\n"):
                return fields
            if not line or len(line) > _MAX_LINE:
                raise _BadAnswer("the answer's headers are cut short or too long")
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon:
                raise _BadAnswer(f"malformed header line {line[:80]!r}")
            key = name.strip().lower()
            fields[key] = f"{fields[key]}, {value.strip()}" if key in fields else value.strip()
        raise _BadAnswer(f"more than {_MAX_HEADERS} header lines")

    def _exactly(self, length: int) -> bytes:
        data = self.reader.read(length)
        if len(data) != length:
            raise _BadAnswer(f"the connection closed after {len(data)} of {length} body bytes")
        return data

    def _chunked(self) -> bytes:
        parts = []
        while True:
            size_line = self.reader.readline(_MAX_LINE + 1)
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BadAnswer(f"bad chunk size line {size_line[:80]!r}") from None
            if size == 0:
                self._headers()  # trailers, up to the empty line
                return b"".join(parts)
            parts.append(self._exactly(size))
            self._exactly(2)  # the CRLF after each chunk


def _status(line: bytes) -> tuple[str, int, str]:
    if not line:
        raise _BadAnswer("the server closed the connection without answering")
    version, _, rest = line.decode("latin-1").rstrip("\r\n").partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise _BadAnswer(f"not an HTTP/1.x status line: {line[:80]!r}")
    return version, int(code), reason


def _length(value: str) -> int:
    if not value.strip().isdigit():
        raise _BadAnswer(f"bad Content-Length {value!r}")
    return int(value)


class HttpClient:
    """Sends one request at a time per connection, keeping up to `max_idle` idle connections per
    origin for reuse. `timeout` bounds each read and write; `connect_timeout` the connection."""

    def __init__(self, timeout: float, *, connect_timeout: float | None = None, max_idle: int = 8) -> None:
        self.timeout = timeout
        self.connect_timeout = timeout if connect_timeout is None else connect_timeout
        self.max_idle = max_idle
        self._idle: dict[_Origin, list[_Connection]] = defaultdict(list)
        self._lock = threading.Lock()
        self._closed = False

    def request(self, method: str, url: str, body: bytes = b"", headers: Mapping[str, str] | None = None) -> HttpResponse:
        """Send `body` (always with a Content-Length) and read the whole answer."""
        origin, target = _split(url)
        all_headers = {"Content-Length": str(len(body)), **(headers or {})}
        connection, reused = self._take(origin)
        try:
            try:
                response, keep = connection.exchange(method, target, body, all_headers, reused)
            except _Stale:
                connection.close()
                connection = self._connect(origin)
                response, keep = connection.exchange(method, target, body, all_headers, False)
        except (OSError, _BadAnswer) as exc:
            connection.close()
            raise HttpFailure(_describe(exc)) from exc
        if keep:
            self._give_back(origin, connection)
        else:
            connection.close()
        return response

    def post_json(self, url: str, payload: Any) -> HttpResponse:
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return self.request("POST", url, body, {"Content-Type": "application/json"})

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

    def _take(self, origin: _Origin) -> tuple[_Connection, bool]:
        with self._lock:
            idle = self._idle.get(origin)
            if idle:
                return idle.pop(), True
        return self._connect(origin), False

    def _connect(self, origin: _Origin) -> _Connection:
        try:
            return _Connection(origin, self.connect_timeout, self.timeout)
        except OSError as exc:
            raise HttpFailure(_describe(exc)) from exc

    def _give_back(self, origin: _Origin, connection: _Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle[origin]) < self.max_idle:
                self._idle[origin].append(connection)
                return
        connection.close()


def _split(url: str) -> tuple[_Origin, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpFailure(f"not an http(s) URL: {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise HttpFailure(f"bad port in URL {url!r}: {exc}") from exc
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if _UNSAFE_IN_TARGET.search(target):
        raise HttpFailure(f"URL {url!r} has spaces or control characters in its path")
    return (parts.scheme, parts.hostname, port), target


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"Timeout: no answer within the time limit ({exc or 'timed out'})"
    if isinstance(exc, ConnectionRefusedError):
        return f"ConnectionRefused: {exc}"
    if isinstance(exc, _BadAnswer):
        return f"BadAnswer: {exc}"
    return f"{type(exc).__name__}: {exc}"
