"""Logging set-up shared by the service, the bridge and the command line.

BentoML configures only its own loggers, so ours get a handler of their own on stderr: their
lines then show in `bentoml serve` output and in container logs. `PIPELINE_LOG_LEVEL` sets
the level (default INFO).

Text a job controls (paths, ids, GatewayIP, what AiCSD answered) goes into a log line only
through `shown`: escaped, so a newline in it cannot start a forged line, and cut, so a 10 MB
field does not become a 10 MB line. A request the service refuses is one WARNING line
(`quiet_refused_requests`), not BentoML's traceback at ERROR.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from pydantic import ValidationError

__all__ = ["SHOWN_LIMIT", "JobLog", "configure_logging", "quiet_refused_requests", "shown", "validation_problems"]

SHOWN_LIMIT = 200
"""Characters of one piece of job text `shown` keeps in a log line."""

_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}

FORMAT = "%(asctime)s [%(levelname)s] [%(name)s] %(message)s"


def configure_logging(*names: str, level: str | None = None) -> None:
    """Give each named logger one stderr handler (idempotent) at `level` or `PIPELINE_LOG_LEVEL`."""
    chosen = (level or os.environ.get("PIPELINE_LOG_LEVEL") or "INFO").upper()
    numeric = logging.getLevelName(chosen)
    if not isinstance(numeric, int):
        numeric = logging.INFO
    for name in names or ("aicsd", "pipeline", "serving", "helper", "service"):
        logger = logging.getLogger(name)
        logger.setLevel(numeric)
        if not any(getattr(h, "_aicsd", False) for h in logger.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(FORMAT))
            handler._aicsd = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
        logger.propagate = False


def shown(text: object, limit: int = SHOWN_LIMIT) -> str:
    """`text` fit for one log line: control and other unprintable characters escaped (`\\n`,
    `\\x1b`, `\\u2028`; a backslash as `\\\\`), cut to `limit` characters with the original
    length shown."""
    text = str(text)
    if len(text) <= limit and text.isprintable() and "\\" not in text:
        return text
    escaped = "".join(_escape(c) for c in text[: limit + 1])
    if len(text) <= limit and len(escaped) <= limit:
        return escaped
    return f"{escaped[:limit]}... ({len(text)} characters)"


def _escape(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    if char.isprintable():
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class JobLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger that puts `job=<id> task=<id>` on every line about a job (the ids `shown`)."""

    def __init__(self, logger: logging.Logger, job_id: str, task_id: str) -> None:
        super().__init__(logger, {"job_id": shown(job_id), "task_id": shown(task_id)})

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = self.extra or {}
        return f"job={extra['job_id']} task={extra['task_id']} {msg}", kwargs


def validation_problems(error: ValidationError, whole: str = "body") -> str:
    """Each problem pydantic found, as `field: problem`, joined by '; ' (`whole` names the
    object itself when the problem is not one field's)."""
    return "; ".join(
        f"{'.'.join(str(part) for part in e['loc']) or whole}: {e['msg'].removeprefix('Value error, ')}"
        for e in error.errors(include_url=False, include_context=False, include_input=False)
    )


class _RefusedRequest(logging.Filter):
    """Turns BentoML's ERROR line with a traceback for a request it refuses (a body that failed
    validation: 400; or one of its own exceptions with a 4xx `error_code`, such as 415) into one
    WARNING line naming the status and the problems. Errors of the service itself keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ValidationError):
            status, problems = 400, validation_problems(error)
        elif isinstance(getattr(error, "error_code", None), int) and 400 <= error.error_code < 500:  # type: ignore[union-attr]
            status, problems = int(error.error_code), str(error)  # type: ignore[union-attr]
        else:
            return True
        path = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.msg = "refused request to %s (HTTP %d): %s"
        record.args = (shown(path), status, shown(problems, 1000))
        record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        record.exc_info = record.exc_text = None
        return True


REFUSING_LOGGERS = ("bentoml._internal.server.http_app",)
"""BentoML's logger that reports every failed request, with its traceback (`log_exception`)."""


def quiet_refused_requests() -> None:
    """Log a request that BentoML refuses for its body as one WARNING line (idempotent)."""
    for name in REFUSING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RefusedRequest) for f in logger.filters):
            logger.addFilter(_RefusedRequest())
