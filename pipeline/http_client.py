"""A small HTTP/1.1 client for the service's AiCSD callbacks and the bridge's service requests.

Why not httpx: on a 2-core gateway the service is bound by Python's interpreter lock, and
httpx spent 1.3 ms of CPU per callback against 0.5 ms for the standard library's http.client
(measured against the AiCSD stand-in on loopback). Each job makes two callbacks, and the bridge
makes one request per job, so this is the cheap client both use: kept-alive connections per
origin, safe to share between threads, no proxies from the environment, no redirects followed.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

__all__ = ["HttpClient", "HttpFailure", "HttpResponse"]

# A kept-alive connection the server has closed meanwhile fails with one of these before any
# answer arrives; the request is then sent once more on a new connection.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


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


class HttpClient:
    """Sends one request at a time per connection, keeping up to `max_idle` idle connections per
    origin for reuse. `timeout` bounds each read and write; `connect_timeout` the connection."""

    def __init__(self, timeout: float, *, connect_timeout: float | None = None, max_idle: int = 8) -> None:
        self.timeout = timeout
        self.connect_timeout = timeout if connect_timeout is None else connect_timeout
        self.max_idle = max_idle
        self._idle: dict[_Origin, list[http.client.HTTPConnection]] = defaultdict(list)
        self._lock = threading.Lock()
        self._closed = False

    def request(self, method: str, url: str, body: bytes = b"", headers: Mapping[str, str] | None = None) -> HttpResponse:
        """Send `body` (always with a Content-Length) and read the whole answer."""
        origin, target = _split(url)
        all_headers = {"Content-Length": str(len(body)), **(headers or {})}
        connection, reused = self._take(origin)
        try:
            try:
                return self._exchange(connection, origin, method, target, body, all_headers)
            except _STALE:
                if not reused:
                    raise
                connection.close()
                connection = self._connect(origin)
                return self._exchange(connection, origin, method, target, body, all_headers)
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise HttpFailure(_describe(exc)) from exc

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

    def _take(self, origin: _Origin) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            idle = self._idle.get(origin)
            if idle:
                return idle.pop(), True
        return self._connect(origin), False

    def _connect(self, origin: _Origin) -> http.client.HTTPConnection:
        scheme, host, port = origin
        kind = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        connection = kind(host, port, timeout=self.connect_timeout)
        try:
            connection.connect()  # sets TCP_NODELAY: a small request is not held back
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise HttpFailure(_describe(exc)) from exc
        if connection.sock is not None:
            connection.sock.settimeout(self.timeout)
        return connection

    def _exchange(self, connection: http.client.HTTPConnection, origin: _Origin, method: str, target: str,
                  body: bytes, headers: Mapping[str, str]) -> HttpResponse:
        connection.request(method, target, body=body, headers=dict(headers))
        answer = connection.getresponse()
        data = answer.read()
        response = HttpResponse(answer.status, answer.reason, data, {k.lower(): v for k, v in answer.getheaders()})
        if answer.will_close:
            connection.close()
        else:
            self._give_back(origin, connection)
        return response

    def _give_back(self, origin: _Origin, connection: http.client.HTTPConnection) -> None:
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
    return (parts.scheme, parts.hostname, port), target


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"Timeout: no answer within the time limit ({exc or 'timed out'})"
    if isinstance(exc, ConnectionRefusedError):
        return f"ConnectionRefused: {exc}"
    return f"{type(exc).__name__}: {exc}"
