"""Writing output files the way AiCSD needs them: complete before the callbacks, never overwriting.

Each file is written under a temporary name in the output folder, then linked into place with a
call that fails when the name is taken, so an existing file is never replaced: the next free
numbered suffix (`-1`, `-2`, ...) keeps both. Files written together share one suffix.

Every create, link and unlink is relative to the folder's open descriptor (`dir_fd`), never to
its path, so the folder being swapped for a symbolic link mid-job cannot send a file elsewhere.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import BinaryIO

from aicsd.errors import InputFileError

from .base import FilesRecorder, OutputFolder, WrittenFile

__all__ = ["numbered_names", "publish_together"]

Writer = Callable[[BinaryIO], None]
"""Writes a file's whole content to a binary handle (seekable, opened for writing)."""


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


def _write_temporary(folder: OutputFolder, name: str, write: Writer) -> None:
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

    def opener(path: str, _: int) -> int:
        return os.open(path, flags, 0o644, dir_fd=folder.fd)

    # Opened through `open` so the handle has a name (tifffile wants one), created in the folder.
    with open(name, "w+b", opener=opener) as handle:
        write(handle)


def publish_together(
    folder: OutputFolder,
    files: Sequence[tuple[str, Writer]],
    max_tries: int = 1000,
    record: FilesRecorder | None = None,
) -> list[str]:
    """Write each (name, writer) to a temporary file, then give all of them their final names.

    `record` is told of the temporaries before any gets a final name. Returns the final names,
    in the order given.
    """
    temporaries: list[str] = []
    try:
        for name, write in files:
            temporary = f".{name}.{uuid.uuid4().hex}.partial"
            temporaries.append(temporary)
            _write_temporary(folder, temporary, write)
        if record is not None:
            record([_written(folder, temporary, name) for temporary, (name, _) in zip(temporaries, files, strict=True)])
        for number in range(max_tries):
            finals = [_numbered(name, number) for name, _ in files]
            linked: list[str] = []
            try:
                for temporary, final in zip(temporaries, finals, strict=False):
                    # Fails if `final` exists: nothing is overwritten.
                    os.link(temporary, final, src_dir_fd=folder.fd, dst_dir_fd=folder.fd, follow_symlinks=False)
                    linked.append(final)
            except FileExistsError:
                for name in linked:
                    os.unlink(name, dir_fd=folder.fd)
                continue
            return finals
        raise InputFileError(
            f"OutputFileFolder '{folder.dir_name}' already holds {max_tries} numbered copies of {files[0][0]}"
        )
    except OSError as exc:
        raise InputFileError(
            f"cannot write output files into '{folder.dir_name}': {exc.strerror or exc}"
        ) from None
    finally:
        for temporary in temporaries:
            try:
                os.unlink(temporary, dir_fd=folder.fd)
            except FileNotFoundError:
                pass


def _written(folder: OutputFolder, temporary: str, final: str) -> WrittenFile:
    info = os.stat(temporary, dir_fd=folder.fd, follow_symlinks=False)
    return WrittenFile(folder.real_path, temporary, final, info.st_dev, info.st_ino)
