"""What every pipeline kind shares: the task it is handed and the interface it implements.

A task's input file and output folder are opened once, when the task is built, and used only
through their descriptors afterwards: a path swapped for a symbolic link in the middle of a job
cannot redirect a read or a write (`serving.files` checks the opened objects against the file
roots; `PipelineTask.local` opens them with no rule, for pipeline authors' own runs).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from aicsd.errors import InputFileError
from aicsd.job import ModelParams
from aicsd.outcome import PipelineOutcome

from .memory import MemoryBudget, MemoryClaim

__all__ = [
    "DEFAULT_MAX_PAGES",
    "FilesRecorder",
    "InputFile",
    "OutputFolder",
    "Pipeline",
    "PipelineTask",
    "WrittenFile",
]

DEFAULT_MAX_PAGES = 1000


@dataclass(frozen=True)
class InputFile:
    """The job's input file, open: `path` is the name the job gave (for messages and output names)."""

    path: Path
    fd: int

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def stem(self) -> str:
        return self.path.stem

    def reader(self) -> BinaryIO:
        """A new binary handle on the opened file, at its start; close it after use."""
        # A duplicate of the descriptor under the file's name (decoders like a name), never the path.
        handle = open(self.name, "rb", opener=lambda _path, _flags: os.dup(self.fd))  # noqa: SIM115
        handle.seek(0)
        return handle

    def close(self) -> None:
        os.close(self.fd)

    @classmethod
    def open(cls, path: Path) -> InputFile:
        """Open `path` for reading, symbolic links followed, with no file-root rule."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise InputFileError(f"input file '{path}' cannot be opened: {exc.strerror or exc}") from None
        return cls(path, fd)


@dataclass(frozen=True)
class OutputFolder:
    """The job's output folder, open: every file is created, linked and removed relative to `fd`.

    `dir_name` is the folder exactly as the job named it, which is what AiCSD wants back as each
    output file's `DirName` (its own containers see that path, not the one with links resolved).
    """

    dir_name: str
    fd: int

    @property
    def path(self) -> Path:
        return Path(self.dir_name)

    @property
    def real_path(self) -> str:
        """Where the opened folder really is, links resolved (for cleaning up after a crash)."""
        try:
            return os.readlink(f"/proc/self/fd/{self.fd}")
        except OSError:
            return os.path.realpath(self.dir_name)

    def close(self) -> None:
        os.close(self.fd)

    @classmethod
    def open(cls, path: Path) -> OutputFolder:
        """Open the folder `path`, symbolic links followed, with no file-root rule."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise InputFileError(f"output folder '{path}' cannot be opened: {exc.strerror or exc}") from None
        return cls(str(path), fd)


@dataclass(frozen=True)
class WrittenFile:
    """A file written under `temporary` in `folder` (its real path when written), to be linked to
    `final` or a numbered variant; device and inode tell it from any other job's file."""

    folder: str
    temporary: str
    final: str
    device: int
    inode: int


FilesRecorder = Callable[[Sequence[WrittenFile]], None]
"""Told of the temporaries before they get final names, so a crash in between orphans nothing."""


def _no_budget() -> MemoryClaim:
    return MemoryBudget(None).claim()


@dataclass(frozen=True)
class PipelineTask:
    """One run of a pipeline: the opened input file and output folder, parameters, job logger,
    and the limits its image is read under (pages, and the claim on the image memory budget).

    Use it as a context manager: leaving it closes both descriptors and gives the memory back.
    """

    input_file: InputFile
    output_folder: OutputFolder
    params: ModelParams
    log: logging.LoggerAdapter  # type: ignore[type-arg]
    max_pages: int = DEFAULT_MAX_PAGES
    memory: MemoryClaim = field(default_factory=_no_budget)
    record_files: FilesRecorder | None = None

    def __enter__(self) -> PipelineTask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.memory.release()
        self.input_file.close()
        self.output_folder.close()

    @classmethod
    def local(
        cls, input_file: Path, output_folder: Path, params: ModelParams, log: logging.LoggerAdapter,  # type: ignore[type-arg]
        **limits: object,
    ) -> PipelineTask:
        """A task on local paths, no file-root rule: for the command line, benchmarks and tests."""
        opened = InputFile.open(input_file)
        try:
            folder = OutputFolder.open(output_folder)
        except BaseException:
            opened.close()
            raise
        return cls(opened, folder, params, log, **limits)  # type: ignore[arg-type]


class Pipeline(Protocol):
    """A pipeline kind bound to one compiled model; `run` raises `PipelineError` on failure."""

    def run(self, task: PipelineTask) -> PipelineOutcome: ...

    def warm_up(self) -> None: ...

    def describe(self) -> dict[str, object]:
        """model_type, kind and declared parameters (`ParameterSchema.describe`), for listings."""
        ...
