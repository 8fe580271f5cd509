"""A memory budget for images in flight, so concurrent large jobs cannot exhaust the machine.

Each job reserves what its image will take (decoded pixels plus working space) before decoding
it and gives it back when the job ends. A job that does not fit waits for others to finish, in
arrival order so a large job is not starved by a stream of small ones; an image larger than the
whole budget can never fit and fails at once with a clear reason.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from aicsd.errors import ImageError

__all__ = ["MemoryBudget", "MemoryClaim"]

MIB = 1 << 20


class MemoryBudget:
    """`total_bytes` shared by every job of the process; None means no limit."""

    def __init__(self, total_bytes: int | None) -> None:
        if total_bytes is not None and total_bytes <= 0:
            raise ValueError("the memory budget must be positive")
        self.total_bytes = total_bytes
        self._used = 0
        self._queue: deque[object] = deque()
        self._changed = threading.Condition()

    @property
    def used_bytes(self) -> int:
        with self._changed:
            return self._used

    def claim(self, log: logging.Logger | logging.LoggerAdapter | None = None) -> MemoryClaim:  # type: ignore[type-arg]
        """A claim for one job; use it as a context manager so it is always given back."""
        return MemoryClaim(self, log or logging.getLogger(__name__))

    def _take(self, nbytes: int, what: str, log: logging.Logger | logging.LoggerAdapter) -> None:  # type: ignore[type-arg]
        total = self.total_bytes
        if total is None:
            with self._changed:
                self._used += nbytes
            return
        if nbytes > total:
            raise ImageError(
                f"{what} needs about {_mib(nbytes)} MB to process, more than the whole image memory budget "
                f"of {_mib(total)} MB (PIPELINE_IMAGE_MEMORY_MB)"
            )
        ticket = object()
        with self._changed:
            self._queue.append(ticket)
            try:
                if self._queue[0] is not ticket or self._used + nbytes > total:
                    log.info("%s needs %d MB; waiting for image memory (%d of %d MB in use)",
                             what, _mib(nbytes), _mib(self._used), _mib(total))
                while self._queue[0] is not ticket or self._used + nbytes > total:
                    self._changed.wait()
                self._used += nbytes
            finally:
                self._queue.remove(ticket)
                self._changed.notify_all()

    def _give_back(self, nbytes: int) -> None:
        with self._changed:
            self._used -= nbytes
            self._changed.notify_all()


class MemoryClaim:
    """What one job holds of a `MemoryBudget`; released when the job ends.

    Reserve once per job, for everything the job will decode: a job that reserves again while
    holding memory could wait forever for another that does the same.
    """

    def __init__(self, budget: MemoryBudget, log: logging.Logger | logging.LoggerAdapter) -> None:  # type: ignore[type-arg]
        self.budget = budget
        self.log = log
        self.held = 0

    def reserve(self, nbytes: int, what: str) -> None:
        """Wait until `nbytes` fit in the budget and hold them; `ImageError` if they never can."""
        self.budget._take(nbytes, what, self.log)
        self.held += nbytes

    def release(self) -> None:
        if self.held:
            self.budget._give_back(self.held)
            self.held = 0

    def __enter__(self) -> MemoryClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _mib(nbytes: int) -> int:
    return -(-nbytes // MIB)
