"""Where a job may send its callbacks: AiCSD's callback URLs, exactly, and the allowed hosts.

A job names its own callback URLs, so each is parsed before anything is sent, and only what
AiCSD itself publishes is accepted (AICSD_CONTRACT.md sections 1-3):

    JobUpdateUrl       http(s)://<host>[:<port>]/api/v1/job/pipeline/<jobid>/<taskid>
    PipelineStatusUrl  http(s)://<host>[:<port>]/api/v1/pipelineStatus/<jobid>/<taskid>

The path is exactly that: no prefix before it, nothing after it, not even one trailing slash
(AiCSD never builds one, and its handlers' routes do not match one), no query, no fragment, no
user info; the port, when given, is 1-65535. Job and task ids are ASCII letters, digits, `-`
and `_` (AiCSD issues UUIDs), at most 128 characters. The whole URL is printable ASCII, so it
can be sent as it is and shown in a log line as it is.

The deployment's allow list (`PIPELINE_CALLBACK_HOSTS` for the service, `bridge.callback_hosts`
for the bridge) holds `host` (any port) or `host:port` entries, IPv6 addresses in brackets with
or without a port (`[::1]`, `[::1]:8080`; a bare `::1` is read as a host with no port), or `*`
for any host.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from .logs import shown

__all__ = [
    "CALLBACK_PATHS",
    "CallbackUrl",
    "host_allowed",
    "parse_callback_hosts",
    "parse_callback_url",
    "task_url",
]

CALLBACK_PATHS = {
    "JobUpdateUrl": "/api/v1/job/pipeline",
    "PipelineStatusUrl": "/api/v1/pipelineStatus",
}
"""Callback field -> the path AiCSD's handler serves, before /<jobid>/<taskid>."""

TASK_PATH = "/api/v1/task"
MAX_ID = 128

_ID = rf"[A-Za-z0-9_-]{{1,{MAX_ID}}}"
_PATHS = {field: re.compile(rf"{re.escape(prefix)}/(?P<job>{_ID})/(?P<task>{_ID})") for field, prefix in
          CALLBACK_PATHS.items()}
_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]+")
_AUTHORITY = re.compile(r"(?P<host>\[[^\[\]]*\]|[^\[\]:]*)(?::(?P<port>[^:]*))?")
_IPV6_TEXT = re.compile(r"[0-9a-f:.]+")
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?")


@dataclass(frozen=True)
class CallbackUrl:
    """One callback URL as AiCSD publishes it, parsed: where it goes and which job it names."""

    url: str
    scheme: str
    netloc: str
    host: str
    """The host as the allow list spells it: lower case, an IPv6 address compressed and in brackets."""
    port: int
    """The port given, or the scheme's default."""
    job_id: str
    task_id: str

    @property
    def task_url(self) -> str:
        """The task launcher's `GET /api/v1/task/<taskid>` on this URL's scheme, host and port."""
        return f"{self.scheme}://{self.netloc}{TASK_PATH}/{self.task_id}"


# Cached: a job's URLs are checked where it arrives, where it is validated, and where its
# callbacks are built, 4 to 6 times in one process (7 us each, 0.2 us cached); a refused URL is
# not cached.
@functools.lru_cache(maxsize=256)
def parse_callback_url(url: str, field: str) -> CallbackUrl:
    """Parse `url` as the callback `field` (`JobUpdateUrl` or `PipelineStatusUrl`); a URL AiCSD
    would not have sent raises ValueError with a message that names the field."""
    prefix = CALLBACK_PATHS[field]
    shape = f"http(s)://<host>[:<port>]{prefix}/<jobid>/<taskid>"
    if not url.isascii():
        position, char = next((i, c) for i, c in enumerate(url) if not c.isascii())
        raise ValueError(f"{field} has a character that is not ASCII ({char!r} at position {position}); "
                         f"AiCSD's callback URLs are {shape}")
    if not _PRINTABLE_ASCII.fullmatch(url):
        raise ValueError(f"{field} has spaces or control characters (or is empty); it must be {shape}")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. brackets around something that is not an IPv6 address
        raise ValueError(f"{field} is not a valid URL ({exc}); it must be {shape}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{field} must be an http or https URL, {shape}; got '{shown(url, 120)}'")
    if "@" in parts.netloc:
        raise ValueError(f"{field} must not carry user info or credentials (user@host)")
    if "?" in url or "#" in url:
        raise ValueError(f"{field} must have no query (?...) and no fragment (#...): it must be {shape}")
    host, port = _authority(parts.netloc, f"{field} has ")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    match = _PATHS[field].fullmatch(parts.path)
    if not match:
        raise ValueError(
            f"{field} must have exactly the path {prefix}/<jobid>/<taskid>, nothing before or after it, "
            f"ids of letters, digits, '-' and '_' (at most {MAX_ID}); got path '{shown(parts.path, 120)}'"
        )
    return CallbackUrl(url, parts.scheme, parts.netloc, host, port, match["job"], match["task"])


def task_url(pipeline_status_url: str) -> str:
    """The task launcher's `GET /api/v1/task/<taskid>` URL on the same scheme, host and port as
    `pipeline_status_url` (AICSD_CONTRACT.md section 1); ValueError if that is not a status URL."""
    return parse_callback_url(pipeline_status_url, "PipelineStatusUrl").task_url


def host_allowed(url: CallbackUrl, allowed: frozenset[str]) -> bool:
    """True when the URL's host, or host:port, is in the allow list (or the list has `*`)."""
    return "*" in allowed or url.host in allowed or f"{url.host}:{url.port}" in allowed


def parse_callback_hosts(raw: str) -> frozenset[str]:
    """`host` or `host:port` entries separated by commas (IPv6 in brackets), or `*`; returned in
    the spelling `host_allowed` compares (lower case, IPv6 compressed, port without zeros)."""
    entries = {e.strip() for e in raw.split(",") if e.strip()}
    if not entries:
        raise ValueError("no host given")
    out = set()
    for entry in sorted(entries):
        if entry == "*":
            out.add(entry)
            continue
        host, port = _authority(entry, f"entry '{shown(entry, 120)}' has ", bare_ipv6=True)
        out.add(host if port is None else f"{host}:{port}")
    return frozenset(out)


def _authority(text: str, problem: str, *, bare_ipv6: bool = False) -> tuple[str, int | None]:
    """(host as the allow list spells it, port or None) of `host[:port]`; ValueError starting
    with `problem` otherwise."""
    if bare_ipv6 and ":" in text and not text.startswith("["):
        try:  # a whole IPv6 address without brackets: a host with no port
            return f"[{ipaddress.IPv6Address(text).compressed}]", None
        except ValueError:
            pass
    match = _AUTHORITY.fullmatch(text)
    if not match or not match["host"]:
        raise ValueError(f"{problem}no host, or a host and port that are not host[:port] ('{shown(text, 120)}'); "
                         "IPv6 addresses go in brackets, as in [::1]:8080")
    host = match["host"].lower()
    if host.startswith("["):
        try:
            if not _IPV6_TEXT.fullmatch(host[1:-1]):  # no zone id (%eth0): it names no host by itself
                raise ValueError(host)
            address = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{problem}an invalid IPv6 address {shown(host, 120)}") from None
        host = f"[{address.compressed}]"
    elif not _HOST_NAME.fullmatch(host):
        raise ValueError(f"{problem}an invalid host name '{shown(host, 120)}'")
    raw_port = match["port"]
    if raw_port is None:
        return host, None
    if not raw_port.isdigit() or not 0 < int(raw_port) < 65536:
        raise ValueError(f"{problem}an invalid port '{shown(raw_port, 120)}': it must be a number from 1 to 65535")
    return host, int(raw_port)
