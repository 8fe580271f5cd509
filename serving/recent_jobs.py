"""Remembers, for a bounded time, the jobs already reported to AiCSD.

The bridge may re-send a job it had forwarded just before it was killed. A repeat of a
(job id, task id) pair seen within the window gets the stored answer, without running the
pipeline or calling AiCSD again; a repeat that arrives while the first run is still going waits
for that run instead of starting a second one.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["RecentJobs"]

T = TypeVar("T")
Key = tuple[str, str]


# Every finished entry shares this set Event: a threading.Event costs about 1 KB, and up to
# `max_entries` finished jobs are remembered. Waiters that took the entry's own Event before the
# swap are woken when it is set.
_FINISHED = threading.Event()
_FINISHED.set()


@dataclass
class _Entry(Generic[T]):
    done: threading.Event
    value: T | None = None
    stored_at: float = 0.0


class RecentJobs(Generic[T]):
    """Runs each key once per `window` seconds; `window` 0 disables the memory."""

    def __init__(
        self, window: float, *, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window = window
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[Key, _Entry[T]] = OrderedDict()
        self._lock = threading.Lock()

    def run_once(self, key: Key, work: Callable[[], T], keep: Callable[[T], bool]) -> tuple[T, bool]:
        """The result of `work` and False, or a stored result and True for a repeat.

        A result is stored only when `keep(result)` is true (AiCSD heard about the job);
        otherwise the next repeat runs the work again.
        """
        if self.window <= 0:
            return work(), False
        while True:
            with self._lock:
                self._expire()
                entry = self._entries.get(key)
                if entry is None:
                    entry = _Entry(threading.Event())
                    self._entries[key] = entry
                    owner = True
                else:
                    owner = False
            if owner:
                return self._run(key, entry, work, keep), False
            entry.done.wait()
            if entry.value is not None:
                return entry.value, True

    def _run(self, key: Key, entry: _Entry[T], work: Callable[[], T], keep: Callable[[T], bool]) -> T:
        value: T | None = None
        try:
            value = work()
            return value
        finally:
            with self._lock:
                if value is not None and keep(value):
                    entry.value = value
                    entry.stored_at = self._clock()
                    self._entries.move_to_end(key)
                else:
                    del self._entries[key]
                running, entry.done = entry.done, _FINISHED
                running.set()

    def _expire(self) -> None:
        now = self._clock()
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            expired = entry.done.is_set() and now - entry.stored_at > self.window
            if not expired and len(self._entries) <= self.max_entries:
                break
            if not entry.done.is_set():
                break
            del self._entries[key]
