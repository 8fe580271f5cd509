"""Forwarding: a fixed pool of supervised workers takes jobs from the spool and POSTs them to the service.

A worker short of work takes the oldest due jobs from the spool, up to `TAKEN_PER_WORKER` (or
`bridge.batch`, when larger) for each worker, and records the outcomes of the jobs finished since
the last take in the same transaction: one spool transaction per many jobs, not two per job (a
transaction costs a worker that wakes with cold caches some tenths of a millisecond). The
`forwarded` line of each job the service answered 200 for is logged then, once its outcome is
recorded, with the lines of the other jobs recorded with it. So under a backlog a job is recorded
done a few jobs after the service answered (at once when the bridge is idle). Jobs taken ahead
are marked in flight in the spool but are next in line, not forwarded yet: `backlog()` and
`counts()` count them as queued.

Batches: the jobs of a take are shared out in batches of n = max(1, min(bridge.batch,
ceil(taken / bridge.concurrency))) jobs, so idle workers share a small backlog and a large one
goes in full batches; each batch is one POST of a JSON array of the jobs' payloads to the
service's batch API (`BridgeConfig.batch_url`, e.g. `/classify_batch`), answered with one
`{"StatusCode", "Body"}` per job, each read as the single API's answer for that job alone would
be (`_answered`). A batch left with one job goes to the single URL, as every job does when
`bridge.batch` is 1: a job that comes alone is forwarded exactly as before batches existed. Jobs
rejected at arrival or too old are decided without the service. A batch that fails as a whole
is retried job by job as a single request would be (unreachable: as before; 5xx: the service had
the jobs); a service without the batch API (404, 405) gets one warning and one job per request
from then on, until a restart; any other unusable answer (another 4xx, a 200 that is not one
well-formed item per job) sends that batch's jobs one by one to the single URL, after a warning.

Connection errors, timeouts and 5xx answers (the service restarting, or AiCSD unreachable
behind it) are retried with exponential backoff for as long as the job is younger than
`bridge.max_age`. Who tells AiCSD when the bridge gives up depends on whether the service has the
job: a job the service refused (4xx) or never answered for is reported `PipelineFailed` by the
bridge (when the job's callback URLs are usable); a job the service answered for, even with a
5xx, is the service's to report with its real outcome, so the bridge drops it quietly. Either
way the job is kept in the dead-letter table with the reason.

Workers never die of an error: each turn of a worker's loop is guarded, an error the bridge did
not foresee is counted against the jobs of the turn it had not decided yet (a job is
dead-lettered after `bridge.max_unexpected_errors`), and `supervise()` restarts a thread that
ended anyway, queueing again every job it held. Outcomes
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
from http import HTTPStatus
from typing import Any

from pydantic import ValidationError

from aicsd.callbacks import AicsdClient
from aicsd.errors import JobRejected
from aicsd.job import CallbackUrls, Job, JobRequest
from aicsd.logs import JobLog, shown
from aicsd.outcome import PipelineOutcome
from aicsd.transport import DEFAULT_MAX_ANSWER, HttpClient, HttpFailure, HttpResponse

from .config import BridgeConfig
from .spool import Backlog, Done, Failed, Outcome, RetryLater, Spool, SpoolCounts, SpooledJob, SpoolError

__all__ = ["Forwarder", "usable_callbacks"]

log = logging.getLogger("bridge.forwarder")

TAKEN_PER_WORKER = 8
"""Jobs a take claims per worker at most, or `bridge.batch` when larger: the fewer takes, the less
CPU per job, while jobs taken ahead wait in memory (they are queued again at a stop, or at the
next start after a crash)."""

_Key = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class _Forwarded(Done):
    """Done: the service answered 200; with the job and the answer's `Status`, for the job's log line."""

    job: SpooledJob
    status: str | None


@dataclasses.dataclass(frozen=True)
class _ToReport(Failed):
    """Failed where the service never had the job, or refused it: the bridge tells AiCSD itself."""


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
        # A batch's answer holds one single answer per job: 1 MiB each.
        self._http = HttpClient(config.request_timeout, connect_timeout=10, max_idle=config.concurrency,
                                max_answer=config.batch * DEFAULT_MAX_ANSWER)
        self._wake = threading.Condition()  # guards the collections below; idle workers wait on it
        self._stopping = threading.Event()
        self._threads: list[threading.Thread | None] = [None] * config.concurrency
        self._held: list[list[_Key] | None] = [None] * config.concurrency  # each worker's batch
        self._inflight: set[_Key] = set()  # marked in flight in the spool by this bridge
        self._ready: deque[SpooledJob] = deque()  # taken ahead, next in line; changed under `_taking`
        self._portion = 1  # jobs a worker takes from `_ready` as one batch, set at each take
        self._batching = config.batch > 1  # False once the service showed it has no batch API
        self._finished: list[Outcome] = []  # to record with the next take
        self._taking = threading.Lock()  # one worker at a time takes from the spool
        # Outcomes the spool could not record yet (a full disk), retried before any new job.
        self._unrecorded: dict[tuple[str, str], Outcome] = {}
        self._recording = threading.Lock()  # one worker at a time writes the held outcomes
        # Counts since start, for the metrics (bridge.metrics); workers change them under `_counting`.
        self._counting = threading.Lock()
        self.forwarded = 0          # jobs the service answered 200 for
        self.requests = 0           # HTTP requests sent to the service: single jobs and batches
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
        """Queue again the jobs a dead worker was holding."""
        held, self._held[number] = self._held[number], None
        if not held:
            return
        with self._wake:
            keys = [key for key in held if key not in self._unrecorded]
            self._inflight.difference_update(keys)
        for key in keys:
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
        jobs = self._next()
        if not jobs:
            return
        self._held[number] = [job.key for job in jobs]
        outcomes = self._process(jobs)
        self._held[number] = None
        with self._wake:
            self._finished.extend(outcomes)

    def _next(self) -> list[SpooledJob]:
        """A batch for this worker: jobs taken already, else the spool's oldest due ones. Empty,
        after waiting until one may be due, when there is none."""
        with self._taking:
            if self._stopping.is_set():
                return []  # what is finished and taken is for `stop` to record and put back
            with self._wake:
                if self._ready:
                    portion = self._portion if self._batching else 1
                    return [self._ready.popleft() for _ in range(min(portion, len(self._ready)))]
                finished, self._finished = self._finished, []
            jobs, pause = self._take(finished)
            if jobs:
                # Shared out so that every worker gets a batch of a small backlog, up to full batches.
                batch = self.config.batch if self._batching else 1
                portion = max(1, min(batch, -(-len(jobs) // self.config.concurrency)))
                with self._wake:
                    self._portion = portion
                    self._inflight.update(job.key for job in jobs)
                    self._ready.extend(jobs[portion:])
                    self._wake.notify(-(-(len(jobs) - portion) // portion))  # a worker per batch left
        _log_forwarded(finished)
        if jobs:
            return jobs[:portion]
        self._idle(pause)
        return []

    def _take(self, finished: list[Outcome]) -> tuple[list[SpooledJob], float]:
        """Record `finished` and take the next jobs; else how long to wait."""
        try:
            jobs = self.spool.take(finished, max(TAKEN_PER_WORKER, self.config.batch) * self.config.concurrency)
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

    def _process(self, jobs: list[SpooledJob]) -> list[Outcome]:
        """One turn of a batch: decide each job, tell AiCSD where the bridge must. Never raises.

        A job without an outcome is one the bridge stopped before sending: `stop` queues it again."""
        decided: dict[_Key, Outcome] = {}
        error: Exception | None = None
        try:
            send = []
            for job in jobs:
                early = self._early(job)
                if early is None:
                    send.append(job)
                else:
                    decided[job.key] = early
            self._send(send, decided)
        except Exception as exc:
            log.exception("unexpected error in the bridge, in a turn of %d job(s)", len(jobs))
            error = exc
        outcomes = []
        for job in jobs:
            outcome = decided.get(job.key)
            if outcome is None:
                if error is None:
                    continue
                outcome = self._unexpected(job, f"unexpected error in the bridge: {type(error).__name__}: {error}")
            elif isinstance(outcome, _ToReport):
                outcome = Failed(job, self._report_failed(job, outcome.reason))
            outcomes.append(outcome)
        return outcomes

    def _early(self, job: SpooledJob) -> Outcome | None:
        """The outcome of a job decided without the service (rejected at arrival, too old), else None."""
        if job.reject_reason:
            _job_log(job).error("job failed: %s", job.reject_reason)
            return _ToReport(job, job.reject_reason)
        if self._clock() - job.received_at > self.config.max_age:
            last = f"; last error: {job.last_error}" if job.last_error else ""
            return self._give_up(job, f"not processed within {self.config.max_age:g} s (bridge.max_age){last}",
                                 job.service_answered)
        return None

    def _send(self, jobs: list[SpooledJob], decided: dict[_Key, Outcome]) -> None:
        """Forward `jobs` in one request to the batch API; put each job's outcome in `decided`.

        A batch of one job goes alone to the single URL, on purpose: a job that comes when the
        bridge is idle is forwarded exactly as before batches existed (same request, same latency,
        same log lines), and the batch API is only asked for when there is a backlog. Every job
        goes alone too once the service has shown it has no batch API."""
        if len(jobs) <= 1 or not self._batching:
            self._send_singly(jobs, decided)
            return
        # The spooled payloads are the service's job objects already (see receiver.inspect_payload).
        body = ("[" + ",".join(job.payload for job in jobs) + "]").encode("utf-8")
        try:
            response = self._post(self.config.batch_url, body)
        except HttpFailure as exc:
            for job in jobs:
                decided[job.key] = self._unreachable(job, exc)
            return
        status = response.status_code
        if status == 200:
            answers, problem = _batch_answers(response, len(jobs))
            if answers is not None:
                for job, (item_status, item_body) in zip(jobs, answers, strict=True):
                    decided[job.key] = self._answered(job, item_status, item_body)
                return
        elif status >= 500:  # the service had the batch: each job as a 5xx of its own
            for job in jobs:
                decided[job.key] = self._answered(job, status, response.text)
            return
        elif status in (404, 405):
            self._no_batch_api(status)
            problem = ""
        else:
            problem = f"answered {status}: {_error_text(status, response.text)}"
        if problem:
            log.warning("the batch API %s %s; forwarding the batch's %d jobs one by one",
                        self.config.batch_url, problem, len(jobs))
        self._send_singly(jobs, decided)

    def _send_singly(self, jobs: list[SpooledJob], decided: dict[_Key, Outcome]) -> None:
        """POST each job alone to the single URL, one after the other, until the bridge stops."""
        for index, job in enumerate(jobs):
            if index and self._stopping.is_set():
                return
            try:
                response = self._post(self.config.service_url, job.payload.encode("utf-8"))
            except HttpFailure as exc:
                decided[job.key] = self._unreachable(job, exc)
            else:
                decided[job.key] = self._answered(job, response.status_code, response.text)

    def _post(self, url: str, body: bytes) -> HttpResponse:
        with self._counting:
            self.requests += 1
        return self._http.request("POST", url, body, {"Content-Type": "application/json"})

    def _unreachable(self, job: SpooledJob, exc: HttpFailure) -> Outcome:
        """No answer: the service may never have seen the job, so what it was told before stands."""
        return self._retry(job, f"service unreachable: {exc}", job.service_answered)

    def _answered(self, job: SpooledJob, status: int, body: str | dict[str, Any]) -> Outcome:
        """What the service's answer for one job means: the single API's answer (its body as
        text), or a batch's item (its `StatusCode` and its `Body`, parsed with the batch)."""
        if status == 200:
            with self._counting:
                self.forwarded += 1
            return _Forwarded(job.key, job, _status_field(body))
        text = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
        if status >= 500:
            return self._retry(job, f"service answered {status}: {shown(text, 300)}", True)
        reason = f"service refused the job ({status}): {_error_text(status, text)}"
        _job_log(job).error("job failed: %s", reason)
        return _ToReport(job, reason)

    def _no_batch_api(self, status: int) -> None:
        """The service has no batch API: one job per request from now on, said once."""
        with self._counting:
            first, self._batching = self._batching, False
        if first:
            log.warning("%s answered %d: the service has no batch API; forwarding "
                        "one job per request from now on, until the bridge restarts", self.config.batch_url, status)

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
        return _ToReport(job, reason)

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
                     job.attempts, outcome.status or "done")


def _batch_answers(response: HttpResponse, count: int) -> tuple[list[tuple[int, dict[str, Any]]] | None, str]:
    """The batch API's 200 answer as (StatusCode, Body) per job; else None and what is wrong."""
    try:
        items = response.json()
    except ValueError:
        return None, f"answered 200 with a body that is not JSON: {shown(response.text, 200)}"
    if not isinstance(items, list):
        return None, f"answered 200 with a JSON {type(items).__name__}, not an array"
    if len(items) != count:
        return None, f"answered 200 with {len(items)} items for {count} jobs"
    answers = []
    for index, item in enumerate(items):
        status = item.get("StatusCode") if isinstance(item, dict) else None
        body = item.get("Body") if isinstance(item, dict) else None
        if type(status) is not int or not isinstance(body, dict):
            return None, (f"answered 200 with item {index} not an object with an int StatusCode and an object "
                          f"Body: {shown(json.dumps(item), 200)}")
        answers.append((status, body))
    return answers, ""


def _status_field(body: str | dict[str, Any]) -> str | None:
    """The `Status` of a 200 answer's body, when it has one."""
    try:
        value = (json.loads(body) if isinstance(body, str) else body).get("Status")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _error_text(status: int, text: str) -> str:
    text = text.strip()
    if text:
        return shown(text, 500)
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "(no body)"
