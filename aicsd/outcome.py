"""What a pipeline run produced, independent of how it is reported to AiCSD."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = ["COMPLETE", "FAILED", "OutputFile", "PipelineOutcome", "Status"]

Status = Literal["PipelineComplete", "PipelineFailed"]
COMPLETE: Status = "PipelineComplete"
FAILED: Status = "PipelineFailed"


@dataclass(frozen=True)
class OutputFile:
    """A file the pipeline wrote, complete on disk, to be shipped back by AiCSD."""

    path: Path

    @property
    def dir_name(self) -> str:
        return str(self.path.parent)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def extension(self) -> str:
        return self.path.suffix.lstrip(".")


@dataclass(frozen=True)
class PipelineOutcome:
    """Status, quality-control flags, output files and the results text of one job."""

    status: Status
    qc_flags: str = ""
    output_files: tuple[OutputFile, ...] = ()
    results: str = ""
    error: str | None = field(default=None)

    @classmethod
    def complete(
        cls, results: str, qc_flags: str = "", output_files: tuple[OutputFile, ...] = ()
    ) -> PipelineOutcome:
        return cls(COMPLETE, qc_flags=qc_flags, output_files=output_files, results=results)

    @classmethod
    def failed(cls, reason: str) -> PipelineOutcome:
        """A failed job: no flags, no files; the reason is the text AiCSD shows."""
        return cls(FAILED, results=reason, error=reason)
