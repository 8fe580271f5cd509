"""Forwarding: a fixed pool of supervised workers takes jobs from the spool and POSTs them to the service.

A worker short of a job takes the oldest due ones from the spool, up to `TAKEN_PER_WORKER` for
each worker, and records the outcomes of the jobs finished since the last take in the same
transaction: one spool transaction per many jobs, not two per job (a transaction costs a worker
that wakes with cold caches some tenths of a millisecond). The `forwarded` line of each job the
service answered 200 for is logged then, once its outcome is recorded, with the lines of the
other jobs recorded with it. So under a backlog a job is recorded done a few jobs after the
service answered (at once when the bridge is idle). Jobs taken ahead are marked in flight in the
spool but are next in line, not forwarded yet: `backlog()` and `counts()` count them as queued.

Connection errors, timeouts and 5xx answers (the service restarting, or AiCSD unreachable
behind it) are retried with exponential backoff for as long as the job is younger than
`bridge.max_age`. Who tells AiCSD when the bridge gives up depends on whether the service has the
job: a job the service refused (4xx) or never answered for is reported `PipelineFailed` by the
bridge (when the job's callback URLs are usable); a job the service answered for, even with a
5xx, is the service's to report with its real outcome, so the bridge drops it quietly. Either
way the job is kept in the dead-letter table with the reason.

Workers never die of an error: each turn of a worker's loop is guarded, an error the bridge did
not foresee is counted against its job in the spool (the job is dead-lettered after
`bridge.max_unexpected_errors`), and `supervise()` restarts a thread that ended anyway. Outcomes
the spool cannot record (a full disk) are kept and recorded before the workers take another
job, so no job is left marked in flight.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from aicsd.callbacks import AicsdClient
from aicsd.errors import JobRejected
from aicsd.job import CallbackUrls, Job, JobRequest
from aicsd.logs import JobLog, shown
from aicsd.outcome import PipelineOutcome
from aicsd.transport import HttpClient, HttpFailure, HttpResponse

from .config import BridgeConfig
from .spool import Backlog, Done, Failed, Outcome, RetryLater, Spool, SpoolCounts, SpooledJob, SpoolError

__all__ = ["Forwarder", "usable_callbacks"]

log = logging.getLogger("bridge.forwarder")

TAKEN_PER_WORKER = 8
"""Jobs a take claims per worker at most: the fewer takes, the less CPU per job, while jobs taken
ahead wait in memory (they are queued again at a stop, or at the next start after a crash)."""


@dataclasses.dataclass(frozen=True)
class _Forwarded(Done):
    """Done: the service answered 200; with the job and the answer, for the job's log line."""

    job: SpooledJob
    answer: HttpResponse


def _job_log(job: SpooledJob) -> JobLog:
    """A logger for lines about `job` (`job=<id> task=<id>` first)."""
    return JobLog(log, job.job_id, job.task_id)


class Forwarder:
    """Runs `concurrency` worker threads over the spool until `stop()`."""

    def __init__(
        self,
        config: BridgeConfig,
        spool: Spool,
        aicsd: AicsdClient,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.spool = spool
        self.aicsd = aicsd
        self._clock = clock
        self._http = HttpClient(config.request_timeout, connect_timeout=10, max_idle=config.concurrency)
        self._wake = threading.Condition()  # guards the collections below; idle workers wait on it
        self._stopping = threading.Event()
        self._threads: list[threading.Thread | None] = [None] * config.concurrency
        self._held: list[tuple[str, str] | None] = [None] * config.concurrency  # each worker's job
        self._inflight: set[tuple[str, str]] = set()  # marked in flight in the spool by this bridge
        self._ready: deque[SpooledJob] = deque()  # taken ahead, next in line; changed under `_taking`
        self._finished: list[Outcome] = []  # to record with the next take
        self._taking = threading.Lock()  # one worker at a time takes from the spool
        # Outcomes the spool could not record yet (a full disk), retried before any new job.
        self._unrecorded: dict[tuple[str, str], Outcome] = {}
        self._recording = threading.Lock()  # one worker at a time writes the held outcomes
        # Counts since start, for the metrics (bridge.metrics); workers change them under `_counting`.
        self._counting = threading.Lock()
        self.forwarded = 0          # jobs the service answered 200 for
        self.dead_lettered = 0      # jobs given up on, recorded failed with their reason
        self.callback_failures = 0  # PipelineFailed reports the bridge had to send and could not deliver

    def start(self) -> None:
        for number in range(self.config.concurrency):
            self._spawn(number)

    def _spawn(self, number: int) -> None:
        thread = threading.Thread(target=self._work, args=(number,), name=f"forwarder-{number + 1}", daemon=True)
        self._threads[number] = thread
        thread.start()

    def supervise(self) -> int:
        """Restart any worker thread that ended; the number restarted."""
        if self._stopping.is_set():
            return 0
        restarted = 0
        for number, thread in enumerate(self._threads):
            if thread is not None and not thread.is_alive():
                log.error("worker forwarder-%d had ended; restarting it", number + 1)
                self._release_held(number)
                self._spawn(number)
                restarted += 1
        return restarted

    def _release_held(self, number: int) -> None:
        """Queue again the job a dead worker was holding."""
        key, self._held[number] = self._held[number], None
        with self._wake:
            if key is None or key in self._unrecorded:
                return
            self._inflight.discard(key)
        self._release(key, logging.WARNING, "queued again after its worker ended")

    def _release(self, key: tuple[str, str], level: int, done: str) -> None:
        """Put an in-flight job back in the queue, logging `done` at `level`, or why it stays in flight."""
        try:
            self.spool.release(key)
            log.log(level, "job=%s task=%s %s", *map(shown, key), done)
        except SpoolError as exc:
            log.error("job=%s task=%s left in flight (queued again at the next start): %s", *map(shown, key), exc)

    @property
    def alive(self) -> int:
        return sum(1 for t in self._threads if t is not None and t.is_alive())

    @property
    def unrecorded(self) -> int:
        with self._wake:
            return len(self._unrecorded)

    def backlog(self) -> Backlog:
        """The spool's backlog with the jobs taken ahead counted as queued, not in flight."""
        with self._taking:  # no take, no job leaving the line, between the two reads
            backlog = self.spool.backlog()
            ahead = len(self._ready)
        return Backlog(backlog.queued + ahead, backlog.inflight - ahead, backlog.oldest_received_at)

    def counts(self) -> SpoolCounts:
        """The spool's counts with the jobs taken ahead counted as queued, not in flight."""
        with self._taking:
            counts = self.spool.counts()
            ahead = len(self._ready)
        return dataclasses.replace(counts, queued=counts.queued + ahead, inflight=counts.inflight - ahead)

    def notify(self, jobs: int = 1) -> None:
        """`jobs` jobs were queued in the spool: wake as many idle workers."""
        with self._wake:
            self._wake.notify(jobs)

    def stop(self, grace: float) -> None:
        """Stop taking jobs; wait up to `grace` seconds for jobs in flight, record the outcomes,
        and leave the rest queued."""
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()
        deadline = time.monotonic() + grace
        for thread in self._threads:
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        with self._taking, self._wake:
            finished, self._finished = self._finished, []
            self._ready.clear()
        if finished:
            try:
                self.spool.finish(finished)
            except Exception as exc:
                self._keep_unrecorded(finished, exc)
            else:
                self._recorded(finished)
            _log_forwarded(finished)
        self._record_unrecorded()
        with self._wake:
            left = [key for key in self._inflight if key not in self._unrecorded]
        for key in left:
            self._release(key, logging.INFO, "returned to the spool at shutdown")
        self._http.close()

    def _work(self, number: int) -> None:
        while not self._stopping.is_set():
            try:
                self._turn(number)
            except Exception:
                # Nothing may end a worker: log, pause, carry on.
                log.exception("worker error; carrying on")
                self._idle(1.0)

    def _turn(self, number: int) -> None:
        if not self._record_unrecorded():
            self._idle(1.0)
            return
        job = self._next()
        if job is None:
            return
        self._held[number] = job.key
        outcome = self._process(job)
        self._held[number] = None
        with self._wake:
            self._finished.append(outcome)

    def _next(self) -> SpooledJob | None:
        """A job for this worker: one taken already, else the spool's oldest due ones. None, after
        waiting until one may be due, when there is none."""
        with self._taking:
            if self._stopping.is_set():
                return None  # what is finished and taken is for `stop` to record and put back
            with self._wake:
                if self._ready:
                    return self._ready.popleft()
                finished, self._finished = self._finished, []
            jobs, pause = self._take(finished)
            if jobs:
                with self._wake:
                    self._inflight.update(job.key for job in jobs)
                    self._ready.extend(jobs[1:])
                    self._wake.notify(len(jobs) - 1)
        _log_forwarded(finished)
        if jobs:
            return jobs[0]
        self._idle(pause)
        return None

    def _take(self, finished: list[Outcome]) -> tuple[list[SpooledJob], float]:
        """Record `finished` and take the next jobs; else how long to wait."""
        try:
            jobs = self.spool.take(finished, TAKEN_PER_WORKER * self.config.concurrency)
        except Exception as exc:
            if finished:
                self._keep_unrecorded(finished, exc)
            else:
                log.error("cannot read the spool; trying again in 1 s: %s", exc)
            return [], 1.0
        self._recorded(finished)
        if jobs:
            return jobs, 0.0
        try:
            due = self.spool.next_due()
        except SpoolError as exc:
            log.error("cannot read the spool; trying again in 1 s: %s", exc)
            return [], 1.0
        return [], 1.0 if due is None else min(1.0, max(0.0, due - self._clock()))

    def _idle(self, seconds: float) -> None:
        with self._wake:
            if not self._stopping.is_set() and seconds > 0:
                self._wake.wait(seconds)

    def _backoff(self, job: SpooledJob) -> float:
        return float(min(self.config.retry_max, self.config.retry_initial * 2 ** max(0, job.attempts - 1)))

    def _process(self, job: SpooledJob) -> Outcome:
        """One turn of one job: decide, tell AiCSD where the bridge must. Never raises."""
        try:
            outcome = self._decide(job)
            if isinstance(outcome, Failed) and not job.service_answered:
                outcome = Failed(job, self._report_failed(job, outcome.reason))
        except Exception as exc:
            _job_log(job).exception("unexpected error in the bridge")
            outcome = self._unexpected(job, f"unexpected error in the bridge: {type(exc).__name__}: {exc}")
        return outcome

    def _decide(self, job: SpooledJob) -> Outcome:
        if job.reject_reason:
            _job_log(job).error("job failed: %s", job.reject_reason)
            return Failed(job, job.reject_reason)
        if self._clock() - job.received_at > self.config.max_age:
            last = f"; last error: {job.last_error}" if job.last_error else ""
            return self._give_up(job, f"not processed within {self.config.max_age:g} s (bridge.max_age){last}",
                                 job.service_answered)
        try:
            # The spooled payload is the service's request body already (see receiver.inspect_payload).
            response = self._http.request("POST", self.config.service_url, job.payload.encode("utf-8"),
                                          {"Content-Type": "application/json"})
        except HttpFailure as exc:
            return self._retry(job, f"service unreachable: {exc}", job.service_answered)
        if response.status_code == 200:
            with self._counting:
                self.forwarded += 1
            return _Forwarded(job.key, job, response)
        if response.status_code >= 500:
            return self._retry(job, f"service answered {response.status_code}: {shown(response.text, 300)}", True)
        reason = f"service refused the job ({response.status_code}): {_error_text(response)}"
        _job_log(job).error("job failed: %s", reason)
        return Failed(job, reason)

    def _retry(self, job: SpooledJob, error: str, answered: bool) -> Outcome:
        if self._clock() - job.received_at > self.config.max_age:
            return self._give_up(job, f"{error}; gave up after {self.config.max_age:g} s (bridge.max_age)", answered)
        delay = self._backoff(job)
        _job_log(job).warning("attempt %d failed, retrying in %.1f s: %s", job.attempts, delay, error)
        return RetryLater(job.key, delay, error, answered)

    def _give_up(self, job: SpooledJob, reason: str, answered: bool) -> Outcome:
        if answered:
            _job_log(job).warning("giving up quietly: %s; the service had the job and reports its outcome itself",
                                  reason)
            return Failed(job, f"{reason}; the service had the job: it reports the outcome,"
                               " no callback from the bridge")
        _job_log(job).error("job failed: %s", reason)
        return Failed(job, reason)

    def _unexpected(self, job: SpooledJob, error: str) -> Outcome:
        """Count the error against the job; dead-letter it once it reached the limit."""
        job_log = _job_log(job)
        try:
            count = self.spool.unexpected_error(job.key)
        except SpoolError as exc:
            job_log.error("could not count the error in the spool: %s", exc)
            return RetryLater(job.key, self._backoff(job), error, job.service_answered)
        limit = self.config.max_unexpected_errors
        if count < limit:
            job_log.warning("unexpected error %d of %d; the job is tried again later", count, limit)
            return RetryLater(job.key, self._backoff(job), error, job.service_answered)
        reason = f"{error} ({count} times, bridge.max_unexpected_errors)"
        if not job.service_answered:
            reason = self._report_failed(job, reason)
        return Failed(job, reason)

    def _report_failed(self, job: SpooledJob, reason: str) -> str:
        """Tell AiCSD PipelineFailed when the job's URLs are usable; the reason to keep. Never raises."""
        job_log = _job_log(job)
        try:
            callbacks = usable_callbacks(job.payload, self.config.callback_hosts)
            if callbacks is None:
                job_log.error("callback URLs not usable: AiCSD cannot be told; kept in the dead-letter table")
                self._callback_failed()
                return reason
            report = self.aicsd.report(callbacks, PipelineOutcome.failed(reason))
            if report.delivered:
                return reason
            self._callback_failed()
            return reason + " (AiCSD could not be told)"
        except Exception as exc:
            job_log.exception("telling AiCSD PipelineFailed went wrong")
            self._callback_failed()
            return f"{reason} (AiCSD could not be told: {type(exc).__name__}: {exc})"

    def _callback_failed(self) -> None:
        with self._counting:
            self.callback_failures += 1

    def _recorded(self, outcomes: Sequence[Outcome]) -> None:
        """The spool recorded `outcomes`: the jobs are no longer this bridge's in flight."""
        failed = sum(1 for outcome in outcomes if isinstance(outcome, Failed))
        with self._wake:
            self._inflight.difference_update(outcome.key for outcome in outcomes)
        if failed:
            with self._counting:
                self.dead_lettered += failed

    def _keep_unrecorded(self, outcomes: Sequence[Outcome], exc: Exception) -> None:
        """Keep outcomes the spool could not record, to be written when it works again."""
        for outcome in outcomes:
            log.error("job=%s task=%s cannot record the job's state in the spool, keeping it to retry: %s",
                      *map(shown, outcome.key), exc)
        with self._wake:
            self._unrecorded.update((outcome.key, outcome) for outcome in outcomes)

    def _record_unrecorded(self) -> bool:
        """Write the outcomes the spool could not take before; True when none is left."""
        with self._wake:
            if not self._unrecorded:
                return True
        if not self._recording.acquire(blocking=False):
            return False  # another worker is at it
        try:
            with self._wake:
                waiting = list(self._unrecorded.values())
            try:
                self.spool.finish(waiting)
            except Exception:
                return False
            with self._wake:
                for outcome in waiting:
                    self._unrecorded.pop(outcome.key, None)
            self._recorded(waiting)
            for outcome in waiting:
                log.info("job=%s task=%s state recorded in the spool at last", *map(shown, outcome.key))
            return True
        finally:
            self._recording.release()


def usable_callbacks(payload: str | Mapping[str, Any], allowed_hosts: frozenset[str]) -> CallbackUrls | None:
    """The job's callback URLs (from its JSON text or its parsed object) when they are well formed
    and allowed, else None."""
    try:
        data = json.loads(payload) if isinstance(payload, str) else payload
        urls = {k: data.get(k) for k in ("JobUpdateUrl", "PipelineStatusUrl")}
        # Validate the URLs alone: other fields may be the reason the job failed.
        request = JobRequest.model_validate(
            {"InputFileLocation": "-", "OutputFileFolder": "-", **urls}
        )
        return Job.from_request(request, allowed_hosts).callbacks
    except (ValueError, ValidationError, JobRejected, AttributeError, TypeError):
        return None


def _log_forwarded(outcomes: Sequence[Outcome]) -> None:
    """The line of each job among `outcomes` that the service answered 200 for."""
    for outcome in outcomes:
        if isinstance(outcome, _Forwarded):
            job = outcome.job
            log.info("job=%s task=%s forwarded (attempt %d): %s", shown(job.job_id), shown(job.task_id),
                     job.attempts, _field(outcome.answer, "Status") or "done")


def _field(response: HttpResponse, name: str) -> str | None:
    try:
        value = response.json().get(name)
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _error_text(response: HttpResponse) -> str:
    text = response.text.strip()
    return shown(text, 500) if text else shown(response.reason_phrase)
