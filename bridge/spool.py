"""The bridge's durable store of jobs (SQLite, WAL).

A job's key is (job id, task id) from its callback URLs. A job moves queued -> inflight -> done,
or to failed with its reason in the dead-letter table. A redelivery of a job still queued or in
flight is collapsed into the one stored; a job published again after it was done or failed
(AiCSD re-publishes only what it has not heard about, contract §6) is queued again with a fresh
start, the earlier run kept in `job_history`. Jobs left inflight by a bridge that stopped are
queued again at start-up. Payloads that are not jobs at all are kept in the dead-letter table too,
so nothing that reached the bridge is lost without a trace. Every failure to read or write the
store is a `SpoolError` (a full or read-only disk among them).

Arrivals are synced to disk before their call returns (`synchronous=FULL`): they are what the
broker is told it may forget. `store` takes every message waiting in one transaction, so a burst
costs one sync, not one per job. The writes after an arrival (claim, done, retry) are committed
without a sync of their own (`synchronous=NORMAL`): the next synced commit covers them, WAL frames
being written in order, and losing one on power loss only sends the job again, which the service's
ledger answers from its record without running or reporting it twice. A job failed is synced
again: the bridge may have told AiCSD itself, and no ledger would keep it from telling twice.
"""

from __future__ import annotations

import enum
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Arrival", "Backlog", "DeadLetter", "Done", "Failed", "NewJob", "Outcome", "RetryLater", "Spool", "SpoolCounts",
    "SpoolError", "SpooledJob",
]

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
DROP INDEX IF EXISTS jobs_ready;
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (state, received_at);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    topic TEXT,
    job_id TEXT,
    task_id TEXT,
    payload BLOB,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS job_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    task_id TEXT NOT NULL,
    state TEXT NOT NULL,
    received_at REAL NOT NULL,
    finished_at REAL,
    attempts INTEGER NOT NULL,
    last_error TEXT,
    replaced_at REAL NOT NULL
);
"""
# `jobs_queue` hands out the oldest queued job without sorting the queue; `jobs_ready`, which it
# replaces, made each claim sort every queued job, so a burst of n jobs cost n^2.
# Columns added after the first release; a spool written by an older bridge gets them at start-up.
_ADDED_COLUMNS = {
    "unexpected_errors": "INTEGER NOT NULL DEFAULT 0",
    "service_answered": "INTEGER NOT NULL DEFAULT 0",
}


class SpoolError(Exception):
    """The spool could not be read or written (full disk, read-only disk, corrupt file); names the cause."""


class Arrival(enum.Enum):
    """What `Spool.add` did with a job."""

    NEW = "new"                # first time seen: queued
    DUPLICATE = "duplicate"    # still queued or in flight: collapsed into the stored one
    AGAIN = "again"            # done or failed before: queued again, the earlier run kept as history


@dataclass(frozen=True)
class NewJob:
    """A job as it arrives: its key, the text to forward, and why it will be failed, if it will."""

    job_id: str
    task_id: str
    payload: str
    reject_reason: str | None = None


@dataclass(frozen=True)
class DeadLetter:
    """A payload that cannot be processed, with the reason, kept for an operator to look at."""

    reason: str
    payload: bytes | str
    topic: str | None = None
    key: tuple[str, str] | None = None


@dataclass(frozen=True)
class SpooledJob:
    job_id: str
    task_id: str
    payload: str
    received_at: float
    attempts: int
    reject_reason: str | None
    last_error: str | None = None
    unexpected_errors: int = 0
    service_answered: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.job_id, self.task_id)


@dataclass(frozen=True)
class Done:
    """The service answered 200: the job is done."""

    key: tuple[str, str]


@dataclass(frozen=True)
class RetryLater:
    """Queue the job again after `delay` s; `service_answered` records that the service has seen it."""

    key: tuple[str, str]
    delay: float
    error: str
    service_answered: bool = False


@dataclass(frozen=True)
class Failed:
    """End the job as failed and keep it in the dead-letter table with the reason."""

    job: SpooledJob
    reason: str

    @property
    def key(self) -> tuple[str, str]:
        return self.job.key


Outcome = Done | RetryLater | Failed
"""What a job's turn ended in, to record in the spool."""


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


@dataclass(frozen=True)
class Backlog:
    """The jobs not finished yet: how many wait, how many are in flight, when the oldest arrived."""

    queued: int
    inflight: int
    oldest_received_at: float | None


class Spool:
    """Thread-safe access to the spool database; every change is committed before it returns (and
    synced to disk too for arrivals, see the module docstring)."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self.failing: str | None = None  # the last write's error while writes fail, for the status line
        self._synced = True  # the connection's `synchronous` setting: FULL (True) or NORMAL
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        except (OSError, sqlite3.Error) as exc:
            raise SpoolError(f"cannot open the spool {path}: {_cause(exc)}") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            with self._transaction() as db:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                present = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
                for name, declaration in _ADDED_COLUMNS.items():
                    if name not in present:
                        db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}")
        except (SpoolError, sqlite3.Error) as exc:
            self._db.close()
            raise SpoolError(f"cannot prepare the spool {path}: {_cause(exc)}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self, *, synced: bool = True) -> Iterator[sqlite3.Connection]:
        """One committed transaction under the lock; rolled back if anything raises, COMMIT included.
        `synced`: the commit returns only once on disk; else it is on disk at the next synced one."""
        with self._lock:
            try:
                if synced is not self._synced:
                    self._db.execute("PRAGMA synchronous=FULL" if synced else "PRAGMA synchronous=NORMAL")
                    self._synced = synced
                self._db.execute("BEGIN IMMEDIATE")
                changes = self._db.total_changes
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                    if self._db.total_changes != changes:
                        # Only a write shows the disk takes writes again: a take that found
                        # nothing commits on a full disk too.
                        self.failing = None
                except BaseException:
                    if self._db.in_transaction:
                        try:
                            self._db.execute("ROLLBACK")
                        except sqlite3.Error:
                            pass  # SQLite rolls back by itself when ROLLBACK cannot run
                    raise
            except sqlite3.Error as exc:
                self.failing = _cause(exc)
                raise SpoolError(f"spool {self.path}: {_cause(exc)}") from exc

    def _read(self, sql: str, args: tuple[object, ...] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise SpoolError(f"spool {self.path}: {_cause(exc)}") from exc

    def _write(self, sql: str, args: tuple[object, ...], *, synced: bool = False) -> int:
        with self._transaction(synced=synced) as db:
            return db.execute(sql, args).rowcount

    def store(self, arrivals: Sequence[NewJob | DeadLetter]) -> list[Arrival | None]:
        """Store every arrival in one transaction synced to disk before this returns: each job as
        new, a duplicate of one still queued or in flight, or a job taken again (its `Arrival`);
        each dead letter kept (None). All or nothing: a `SpoolError` means none is stored."""
        now = self._clock()
        with self._transaction(synced=True) as db:
            return [self._add(db, item, now) if isinstance(item, NewJob) else self._keep_dead(db, item, now)
                    for item in arrivals]

    def add(self, job_id: str, task_id: str, payload: str, reject_reason: str | None = None) -> Arrival:
        """Store one job (see `store`)."""
        arrival = self.store([NewJob(job_id, task_id, payload, reject_reason)])[0]
        assert arrival is not None
        return arrival

    def dead_letter(
        self, reason: str, payload: bytes | str, *, topic: str | None = None, key: tuple[str, str] | None = None
    ) -> None:
        """Keep a payload that cannot be processed, with the reason, for an operator to look at."""
        self.store([DeadLetter(reason, payload, topic, key)])

    @staticmethod
    def _add(db: sqlite3.Connection, job: NewJob, now: float) -> Arrival:
        inserted = db.execute(
            "INSERT INTO jobs (job_id, task_id, payload, received_at, state, next_attempt_at, reject_reason)"
            " VALUES (?, ?, ?, ?, 'queued', ?, ?) ON CONFLICT (job_id, task_id) DO NOTHING",
            (job.job_id, job.task_id, job.payload, now, now, job.reject_reason),
        ).rowcount
        if inserted:
            return Arrival.NEW
        state, received_at, finished_at, attempts, last_error = db.execute(
            "SELECT state, received_at, finished_at, attempts, last_error FROM jobs WHERE job_id = ? AND task_id = ?",
            (job.job_id, job.task_id),
        ).fetchone()
        if state in ("queued", "inflight"):
            return Arrival.DUPLICATE
        db.execute(
            "INSERT INTO job_history (job_id, task_id, state, received_at, finished_at, attempts, last_error,"
            " replaced_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (job.job_id, job.task_id, state, received_at, finished_at, attempts, last_error, now),
        )
        db.execute(
            "UPDATE jobs SET payload = ?, received_at = ?, state = 'queued', attempts = 0, next_attempt_at = ?,"
            " reject_reason = ?, last_error = NULL, finished_at = NULL, unexpected_errors = 0,"
            " service_answered = 0 WHERE job_id = ? AND task_id = ?",
            (job.payload, now, now, job.reject_reason, job.job_id, job.task_id),
        )
        return Arrival.AGAIN

    @staticmethod
    def _keep_dead(db: sqlite3.Connection, letter: DeadLetter, now: float) -> None:
        job_id, task_id = letter.key or (None, None)
        db.execute(
            "INSERT INTO dead_letters (at, topic, job_id, task_id, payload, reason) VALUES (?, ?, ?, ?, ?, ?)",
            (now, letter.topic, job_id, task_id, letter.payload, letter.reason),
        )

    def requeue_inflight(self) -> int:
        """Return jobs a stopped bridge left in flight to the queue; the count of them."""
        return self._write("UPDATE jobs SET state = 'queued' WHERE state = 'inflight'", (), synced=True)

    def take(self, finished: Sequence[Outcome] = (), limit: int = 1) -> list[SpooledJob]:
        """Record the outcomes of finished jobs, then claim up to `limit` due jobs, oldest first,
        marked in flight: one transaction, synced to disk only when a job failed (see the module
        docstring)."""
        now = self._clock()
        with self._transaction(synced=any(isinstance(outcome, Failed) for outcome in finished)) as db:
            for outcome in finished:
                self._record(db, outcome, now)
            if limit <= 0:
                return []
            rows = db.execute(
                "SELECT job_id, task_id, payload, received_at, attempts, reject_reason, last_error,"
                " unexpected_errors, service_answered FROM jobs"
                " WHERE state = 'queued' AND next_attempt_at <= ? ORDER BY received_at, rowid LIMIT ?",
                (now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE jobs SET state = 'inflight', attempts = attempts + 1 WHERE job_id = ? AND task_id = ?",
                [row[:2] for row in rows],
            )
        return [SpooledJob(row[0], row[1], row[2], row[3], row[4] + 1, row[5], row[6], row[7], bool(row[8]))
                for row in rows]

    def claim(self) -> SpooledJob | None:
        """The oldest queued job that is due, marked in flight; None when there is none."""
        jobs = self.take()
        return jobs[0] if jobs else None

    def finish(self, outcomes: Sequence[Outcome]) -> None:
        """Record the outcomes of finished jobs in one transaction (see `take`)."""
        self.take(outcomes, limit=0)

    @staticmethod
    def _record(db: sqlite3.Connection, outcome: Outcome, now: float) -> None:
        if isinstance(outcome, Done):
            db.execute(
                "UPDATE jobs SET state = 'done', finished_at = ?, last_error = NULL, service_answered = 1"
                " WHERE job_id = ? AND task_id = ?",
                (now, *outcome.key),
            )
        elif isinstance(outcome, RetryLater):
            db.execute(
                "UPDATE jobs SET state = 'queued', next_attempt_at = ?, last_error = ?,"
                " service_answered = MAX(service_answered, ?) WHERE job_id = ? AND task_id = ?",
                (now + outcome.delay, outcome.error, int(outcome.service_answered), *outcome.key),
            )
        else:
            job = outcome.job
            db.execute(
                "UPDATE jobs SET state = 'failed', finished_at = ?, last_error = ? WHERE job_id = ? AND task_id = ?",
                (now, outcome.reason, job.job_id, job.task_id),
            )
            Spool._keep_dead(db, DeadLetter(outcome.reason, job.payload, key=job.key), now)

    def next_due(self) -> float | None:
        """When the next queued job becomes due (a clock time), or None when nothing is queued."""
        due = self._read("SELECT MIN(next_attempt_at) FROM jobs WHERE state = 'queued'")[0][0]
        return None if due is None else float(due)

    def complete(self, key: tuple[str, str]) -> None:
        self.finish([Done(key)])

    def retry_later(self, key: tuple[str, str], delay: float, error: str, *, service_answered: bool = False) -> None:
        """Queue the job again after `delay` s; `service_answered` records that the service has seen it."""
        self.finish([RetryLater(key, delay, error, service_answered)])

    def fail(self, job: SpooledJob, reason: str) -> None:
        """End a job as failed and keep it in the dead-letter table with the reason."""
        self.finish([Failed(job, reason)])

    def unexpected_error(self, key: tuple[str, str]) -> int:
        """Count an error the bridge did not foresee against the job; the count so far. The job
        stays in flight: its outcome (queued again, or failed) is recorded with the others."""
        with self._transaction(synced=False) as db:
            db.execute(
                "UPDATE jobs SET unexpected_errors = unexpected_errors + 1 WHERE job_id = ? AND task_id = ?", key
            )
            row = db.execute("SELECT unexpected_errors FROM jobs WHERE job_id = ? AND task_id = ?", key).fetchone()
        return 0 if row is None else int(row[0])

    def release(self, key: tuple[str, str]) -> None:
        """Put an in-flight job back in the queue untouched (used when the bridge stops)."""
        self._write(
            "UPDATE jobs SET state = 'queued', attempts = MAX(attempts - 1, 0) WHERE job_id = ? AND task_id = ?"
            " AND state = 'inflight'",
            key,
        )

    def prune(self, older_than: float) -> int:
        """Forget finished jobs (and earlier runs) older than `older_than` seconds."""
        cutoff = self._clock() - older_than
        with self._transaction() as db:
            db.execute("DELETE FROM job_history WHERE replaced_at < ?", (cutoff,))
            return db.execute("DELETE FROM jobs WHERE state IN ('done', 'failed') AND finished_at < ?",
                              (cutoff,)).rowcount

    def counts(self) -> SpoolCounts:
        states = dict(self._read("SELECT state, COUNT(*) FROM jobs GROUP BY state"))
        dead = self._read("SELECT COUNT(*) FROM dead_letters")[0][0]
        return SpoolCounts(
            states.get("queued", 0), states.get("inflight", 0), states.get("done", 0), states.get("failed", 0), dead
        )

    def backlog(self) -> Backlog:
        """Queued and in-flight counts and the oldest one's arrival, in one read."""
        rows = self._read(
            "SELECT state, COUNT(*), MIN(received_at) FROM jobs WHERE state IN ('queued', 'inflight') GROUP BY state"
        )
        counts = {state: count for state, count, _ in rows}
        oldest = min((float(first) for _, _, first in rows), default=None)
        return Backlog(counts.get("queued", 0), counts.get("inflight", 0), oldest)

    def dead_letters(self) -> list[tuple[str | None, str | None, str]]:
        """(job id, task id, reason) of every dead letter, oldest first."""
        return self._read("SELECT job_id, task_id, reason FROM dead_letters ORDER BY id")

    def history(self, key: tuple[str, str]) -> list[tuple[str, str | None]]:
        """(state, last error) of the earlier runs of a job, oldest first."""
        return self._read(
            "SELECT state, last_error FROM job_history WHERE job_id = ? AND task_id = ? ORDER BY id", key
        )


def _cause(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
