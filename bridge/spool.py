"""The bridge's durable store of jobs (SQLite, WAL, one transaction per message).

A job's key is (job id, task id) from its callback URLs, so a redelivered or republished job is
stored once. A job moves queued -> inflight -> done, or to failed with its reason in the
dead-letter table. Jobs left inflight by a bridge that stopped are queued again at start-up.
Payloads that are not jobs at all are kept in the dead-letter table too, so nothing that reached
the bridge is lost without a trace.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SpooledJob", "Spool", "SpoolCounts"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT NOT NULL,
    task_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    received_at REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'inflight', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    reject_reason TEXT,
    last_error TEXT,
    finished_at REAL,
    PRIMARY KEY (job_id, task_id)
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (state, next_attempt_at, received_at);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    topic TEXT,
    job_id TEXT,
    task_id TEXT,
    payload BLOB,
    reason TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class SpooledJob:
    job_id: str
    task_id: str
    payload: str
    received_at: float
    attempts: int
    reject_reason: str | None
    last_error: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.job_id, self.task_id)


@dataclass(frozen=True)
class SpoolCounts:
    queued: int
    inflight: int
    done: int
    failed: int
    dead_letters: int

    def line(self) -> str:
        return (
            f"queued={self.queued} in_flight={self.inflight} done={self.done} "
            f"failed={self.failed} dead_lettered={self.dead_letters}"
        )


class Spool:
    """Thread-safe access to the spool database; every change is committed before it returns."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One committed transaction under the lock; rolled back if anything raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _write(self, sql: str, args: tuple[object, ...]) -> int:
        with self._transaction() as db:
            return db.execute(sql, args).rowcount

    def add(self, job_id: str, task_id: str, payload: str, reject_reason: str | None = None) -> bool:
        """Store a job unless its (job id, task id) is already known; True when it is new."""
        now = self._clock()
        return (
            self._write(
                "INSERT OR IGNORE INTO jobs (job_id, task_id, payload, received_at, state, next_attempt_at,"
                " reject_reason) VALUES (?, ?, ?, ?, 'queued', ?, ?)",
                (job_id, task_id, payload, now, now, reject_reason),
            )
            == 1
        )

    def dead_letter(
        self, reason: str, payload: bytes | str, *, topic: str | None = None, key: tuple[str, str] | None = None
    ) -> None:
        """Keep a payload that cannot be processed, with the reason, for an operator to look at."""
        job_id, task_id = key or (None, None)
        self._write(
            "INSERT INTO dead_letters (at, topic, job_id, task_id, payload, reason) VALUES (?, ?, ?, ?, ?, ?)",
            (self._clock(), topic, job_id, task_id, payload, reason),
        )

    def requeue_inflight(self) -> int:
        """Return jobs a stopped bridge left in flight to the queue; the count of them."""
        return self._write("UPDATE jobs SET state = 'queued' WHERE state = 'inflight'", ())

    def claim(self) -> SpooledJob | None:
        """The oldest queued job that is due, marked in flight; None when there is none."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT job_id, task_id, payload, received_at, attempts, reject_reason, last_error FROM jobs"
                " WHERE state = 'queued' AND next_attempt_at <= ? ORDER BY received_at, rowid LIMIT 1",
                (self._clock(),),
            ).fetchone()
            if row is not None:
                db.execute(
                    "UPDATE jobs SET state = 'inflight', attempts = attempts + 1 WHERE job_id = ? AND task_id = ?",
                    (row[0], row[1]),
                )
        if row is None:
            return None
        return SpooledJob(row[0], row[1], row[2], row[3], row[4] + 1, row[5], row[6])

    def next_due(self) -> float | None:
        """When the next queued job becomes due (a clock time), or None when nothing is queued."""
        with self._lock:
            row = self._db.execute("SELECT MIN(next_attempt_at) FROM jobs WHERE state = 'queued'").fetchone()
        return row[0]

    def complete(self, key: tuple[str, str]) -> None:
        self._write(
            "UPDATE jobs SET state = 'done', finished_at = ?, last_error = NULL WHERE job_id = ? AND task_id = ?",
            (self._clock(), *key),
        )

    def retry_later(self, key: tuple[str, str], delay: float, error: str) -> None:
        self._write(
            "UPDATE jobs SET state = 'queued', next_attempt_at = ?, last_error = ? WHERE job_id = ? AND task_id = ?",
            (self._clock() + delay, error, *key),
        )

    def release(self, key: tuple[str, str]) -> None:
        """Put an in-flight job back in the queue untouched (used when the bridge stops)."""
        self._write(
            "UPDATE jobs SET state = 'queued', attempts = MAX(attempts - 1, 0) WHERE job_id = ? AND task_id = ?"
            " AND state = 'inflight'",
            key,
        )

    def fail(self, job: SpooledJob, reason: str) -> None:
        """End a job as failed and keep it in the dead-letter table with the reason."""
        now = self._clock()
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state = 'failed', finished_at = ?, last_error = ? WHERE job_id = ? AND task_id = ?",
                (now, reason, job.job_id, job.task_id),
            )
            db.execute(
                "INSERT INTO dead_letters (at, topic, job_id, task_id, payload, reason) VALUES (?, NULL, ?, ?, ?, ?)",
                (now, job.job_id, job.task_id, job.payload, reason),
            )

    def prune(self, older_than: float) -> int:
        """Forget finished jobs older than `older_than` seconds (their ids no longer dedupe)."""
        return self._write(
            "DELETE FROM jobs WHERE state IN ('done', 'failed') AND finished_at < ?", (self._clock() - older_than,)
        )

    def counts(self) -> SpoolCounts:
        with self._lock:
            states = dict(self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
            dead = self._db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
        return SpoolCounts(
            states.get("queued", 0), states.get("inflight", 0), states.get("done", 0), states.get("failed", 0), dead
        )

    def dead_letters(self) -> list[tuple[str | None, str | None, str]]:
        """(job id, task id, reason) of every dead letter, oldest first."""
        with self._lock:
            return self._db.execute("SELECT job_id, task_id, reason FROM dead_letters ORDER BY id").fetchall()
