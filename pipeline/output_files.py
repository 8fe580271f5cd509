"""Writing output files the way AiCSD needs them: complete before the callbacks, never overwriting.

Each file is written under a temporary name in the output folder, then linked into place with a
call that fails when the name is taken, so an existing file is never replaced: the next free
numbered suffix (`-1`, `-2`, ...) keeps both. Files written together share one suffix.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from aicsd.errors import InputFileError

__all__ = ["FilesRecorder", "WrittenFile", "numbered_names", "publish_together"]

Writer = Callable[[Path], None]


@dataclass(frozen=True)
class WrittenFile:
    """A file written under `temporary` in `folder`, to be linked to `final` or a numbered variant;
    device and inode tell it from any other job's file of the same name."""

    folder: str
    temporary: str
    final: str
    device: int
    inode: int


FilesRecorder = Callable[[Sequence[WrittenFile]], None]
"""Told of the temporaries before they get final names, so a crash in between orphans nothing."""


def _numbered(name: str, number: int) -> str:
    if number == 0:
        return name
    stem, dot, ext = name.partition(".")
    return f"{stem}-{number}{dot}{ext}"


def numbered_names(name: str, among: Iterable[str]) -> list[str]:
    """The names in `among` that `publish_together` may have given a file meant to be `name`."""
    stem, dot, ext = name.partition(".")
    pattern = re.compile(rf"{re.escape(stem)}(-[1-9][0-9]*)?{re.escape(dot + ext)}")
    return [candidate for candidate in among if pattern.fullmatch(candidate)]


def publish_together(
    folder: Path,
    files: Sequence[tuple[str, Writer]],
    max_tries: int = 1000,
    record: FilesRecorder | None = None,
) -> list[Path]:
    """Write each (name, writer) to a temporary file, then give all of them their final names."""
    temporaries: list[Path] = []
    try:
        for name, write in files:
            temporary = folder / f".{name}.{uuid.uuid4().hex}.partial"
            temporaries.append(temporary)
            write(temporary)
        if record is not None:
            record([_written(folder, temporary, name) for temporary, (name, _) in zip(temporaries, files)])
        for number in range(max_tries):
            finals = [folder / _numbered(name, number) for name, _ in files]
            linked: list[Path] = []
            try:
                for temporary, final in zip(temporaries, finals):
                    os.link(temporary, final)  # fails if `final` exists: nothing is overwritten
                    linked.append(final)
            except FileExistsError:
                for path in linked:
                    path.unlink()
                continue
            return finals
        raise InputFileError(f"OutputFileFolder '{folder}' already holds {max_tries} numbered copies of {files[0][0]}")
    except OSError as exc:
        raise InputFileError(f"cannot write output files into '{folder}': {exc.strerror or exc}") from None
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)


def _written(folder: Path, temporary: Path, final: str) -> WrittenFile:
    info = temporary.stat()
    return WrittenFile(str(folder), temporary.name, final, info.st_dev, info.st_ino)
