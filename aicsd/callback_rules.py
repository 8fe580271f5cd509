"""Where a job may send its callbacks: AiCSD's callback URL shapes and the allowed hosts.

A job names its own callback URLs, so they are checked before anything is sent: the scheme,
the path AiCSD's handlers serve, the job and task ids in it, and the deployment's allow list of
hosts (`PIPELINE_CALLBACK_HOSTS` for the service, `bridge.callback_hosts` for the bridge).
"""

from __future__ import annotations

import re
from urllib.parse import SplitResult, urlsplit

__all__ = [
    "CALLBACK_PATHS",
    "JOB_UPDATE_PATH",
    "STATUS_PATH",
    "host_allowed",
    "parse_callback_hosts",
    "split_callback",
]

JOB_UPDATE_PATH = re.compile(r"/api/v1/job/pipeline/(?P<job>[^/]+)/(?P<task>[^/]+)/?$")
STATUS_PATH = re.compile(r"/api/v1/pipelineStatus/(?P<job>[^/]+)/(?P<task>[^/]+)/?$")
CALLBACK_PATHS = {
    "JobUpdateUrl": (JOB_UPDATE_PATH, "/api/v1/job/pipeline"),
    "PipelineStatusUrl": (STATUS_PATH, "/api/v1/pipelineStatus"),
}


def split_callback(url: str, pattern: re.Pattern[str], what: str) -> tuple[SplitResult, str, str]:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"must be an http or https URL, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"has no host: {url!r}")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"has an invalid port: {url!r}") from None
    if parts.username or parts.password:
        raise ValueError("must not carry credentials")
    match = pattern.search(parts.path)
    if not match:
        raise ValueError(f"must end with {what}/<jobid>/<taskid>, got path {parts.path!r}")
    return parts, match["job"], match["task"]


def host_allowed(parts: SplitResult, allowed: frozenset[str]) -> bool:
    """True when the URL's host, or host:port, is in the allow list (or the list has `*`)."""
    if "*" in allowed:
        return True
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    shown = f"[{host}]" if ":" in host else host
    return host in allowed or shown in allowed or f"{shown}:{port}" in allowed


def parse_callback_hosts(raw: str) -> frozenset[str]:
    """`host` or `host:port` entries separated by commas (IPv6 in brackets), or `*`; lower-cased."""
    entries = {e.strip().lower() for e in raw.split(",") if e.strip()}
    if not entries:
        raise ValueError("no host given")
    for entry in entries - {"*"}:
        host, sep, port = entry.rpartition(":")
        if not sep or (":" in host and not host.startswith("[")):
            host, port = entry, ""
        if port and not port.isdigit():
            raise ValueError(f"{entry!r} has a port that is not a number")
        if not host:
            raise ValueError(f"{entry!r} has no host")
    return frozenset(entries)


def task_url(pipeline_status_url: str) -> str:
    """The task launcher's `GET /api/v1/task/<taskid>` for a job: same scheme, host and port as its
    PipelineStatusUrl (AICSD_CONTRACT.md section 1)."""
    parts, _, task_id = split_callback(pipeline_status_url, STATUS_PATH, "/api/v1/pipelineStatus")
    return f"{parts.scheme}://{parts.netloc}/api/v1/task/{task_id}"
