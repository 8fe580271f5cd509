"""What every pipeline kind shares: the task it is handed and the interface it implements."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .job import ModelParams
from .outcome import PipelineOutcome

__all__ = ["JobLog", "Pipeline", "PipelineTask"]


class JobLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger that puts `job=<id> task=<id>` on every line about a job."""

    def __init__(self, logger: logging.Logger, job_id: str, task_id: str) -> None:
        super().__init__(logger, {"job_id": job_id, "task_id": task_id})

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = self.extra or {}
        return f"job={extra['job_id']} task={extra['task_id']} {msg}", kwargs


@dataclass(frozen=True)
class PipelineTask:
    """One run of a pipeline: resolved input file and output folder, parameters, job logger."""

    input_file: Path
    output_folder: Path
    params: ModelParams
    log: logging.LoggerAdapter  # type: ignore[type-arg]


class Pipeline(Protocol):
    """A pipeline kind bound to one compiled model; `run` raises `PipelineError` on failure."""

    def run(self, task: PipelineTask) -> PipelineOutcome: ...

    def warm_up(self) -> None: ...
