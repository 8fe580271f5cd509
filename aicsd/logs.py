"""Logging set-up shared by the service, the bridge and the command line.

BentoML configures only its own loggers, so ours get a handler of their own on stderr: their
lines then show in `bentoml serve` output and in container logs. `PIPELINE_LOG_LEVEL` sets
the level (default INFO).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

__all__ = ["JobLog", "configure_logging"]

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


class JobLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger that puts `job=<id> task=<id>` on every line about a job."""

    def __init__(self, logger: logging.Logger, job_id: str, task_id: str) -> None:
        super().__init__(logger, {"job_id": job_id, "task_id": task_id})

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = self.extra or {}
        return f"job={extra['job_id']} task={extra['task_id']} {msg}", kwargs
