"""What every pipeline kind shares: the task it is handed and the interface it implements."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from aicsd.job import ModelParams
from aicsd.outcome import PipelineOutcome

from .output_files import FilesRecorder

__all__ = ["Pipeline", "PipelineTask"]


@dataclass(frozen=True)
class PipelineTask:
    """One run of a pipeline: resolved input file and output folder, parameters, job logger."""

    input_file: Path
    output_folder: Path
    params: ModelParams
    log: logging.LoggerAdapter  # type: ignore[type-arg]
    record_files: FilesRecorder | None = None


class Pipeline(Protocol):
    """A pipeline kind bound to one compiled model; `run` raises `PipelineError` on failure."""

    def run(self, task: PipelineTask) -> PipelineOutcome: ...

    def warm_up(self) -> None: ...

    def describe(self) -> dict[str, object]:
        """model_type, kind and declared parameters (`ParameterSchema.describe`), for listings."""
        ...
