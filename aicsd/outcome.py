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
    """A file the pipeline wrote, complete on disk, to be shipped back by AiCSD.

    AiCSD's file sender turns every listed file into a JPEG for its web UI, so list only images
    (JPEG, PNG, GIF, TIFF, BMP). `folder` is the `OutputFileFolder` exactly as AiCSD sent it
    (its containers know that path, not one with links resolved); without it, the path's parent.
    """

    path: Path
    folder: str | None = None

    @classmethod
    def in_folder(cls, folder: str, name: str) -> OutputFile:
        """The file `name` in the output folder `folder`, as the job named the folder."""
        return cls(Path(folder) / name, folder)

    @property
    def dir_name(self) -> str:
        return self.folder if self.folder is not None else str(self.path.parent)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def extension(self) -> str:
        """The name's extension with its dot (".tiff"), as AiCSD's own pipelines send it."""
        return self.path.suffix


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
