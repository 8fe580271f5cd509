"""Forwarding: a fixed pool of workers takes jobs from the spool and POSTs them to the service.

Connection errors, timeouts and 5xx answers (the service restarting, or AiCSD unreachable
behind it) are retried with exponential backoff for as long as the job is younger than its
maximum age. A 4xx answer is final: the request can never succeed, so the bridge tells AiCSD
`PipelineFailed` itself (when the job's callback URLs are usable) and keeps the job in the
dead-letter table. A job that outlives its maximum age is failed the same way.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from helper import AicsdClient
from aicsd.logs import JobLog
from aicsd.errors import JobRejected
from aicsd.transport import HttpClient, HttpFailure, HttpResponse
from aicsd.job import Job, JobRequest
from aicsd.outcome import PipelineOutcome

from .config import BridgeConfig
from .spool import Spool, SpooledJob

__all__ = ["Forwarder", "ForwardStats"]

log = logging.getLogger("bridge.forwarder")


@dataclass
class ForwardStats:
    forwarded: int = 0
    retried: int = 0
    failed: int = 0


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
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._inflight: set[tuple[str, str]] = set()
        self.stats = ForwardStats()

    def start(self) -> None:
        for number in range(self.config.concurrency):
            thread = threading.Thread(target=self._work, name=f"forwarder-{number + 1}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def notify(self) -> None:
        """A job was added to the spool: wake an idle worker."""
        with self._wake:
            self._wake.notify()

    def stop(self, grace: float) -> None:
        """Stop taking jobs; wait up to `grace` seconds for jobs in flight, then leave the rest queued."""
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()
        deadline = time.monotonic() + grace
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._wake:
            left = list(self._inflight)
        for key in left:
            self.spool.release(key)
            log.info("job=%s task=%s returned to the spool at shutdown", *key)
        self._http.close()

    @property
    def in_flight(self) -> int:
        with self._wake:
            return len(self._inflight)

    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                job = self.spool.claim()
            except Exception:
                log.exception("cannot read the spool; trying again")
                self._idle(1.0)
                continue
            if job is None:
                due = self.spool.next_due()
                self._idle(1.0 if due is None else min(1.0, max(0.0, due - self._clock())))
                continue
            with self._wake:
                self._inflight.add(job.key)
            try:
                self._handle(job)
            except Exception:
                log.exception("job=%s task=%s unexpected error; retrying later", job.job_id, job.task_id)
                self.spool.retry_later(job.key, self._backoff(job), "unexpected error in the bridge")
            finally:
                with self._wake:
                    self._inflight.discard(job.key)

    def _idle(self, seconds: float) -> None:
        with self._wake:
            if not self._stopping.is_set() and seconds > 0:
                self._wake.wait(seconds)

    def _backoff(self, job: SpooledJob) -> float:
        return min(self.config.retry_max, self.config.retry_initial * 2 ** max(0, job.attempts - 1))

    def _handle(self, job: SpooledJob) -> None:
        job_log = JobLog(log, job.job_id, job.task_id)
        if job.reject_reason:
            self._fail(job, job.reject_reason, job_log)
            return
        age = self._clock() - job.received_at
        if age > self.config.max_age:
            last = f"; last error: {job.last_error}" if job.last_error else ""
            self._fail(job, f"not processed within {self.config.max_age:g} s (bridge.max_age){last}", job_log)
            return
        try:
            # The spooled payload is the service's request body already (see receiver.inspect_payload).
            response = self._http.request("POST", self.config.service_url, job.payload.encode("utf-8"),
                                          {"Content-Type": "application/json"})
        except HttpFailure as exc:
            self._retry(job, f"service unreachable: {exc}", job_log)
            return
        if response.status_code == 200:
            status = _field(response, "Status")
            job_log.info("forwarded (attempt %d): %s", job.attempts, status or "done")
            self.spool.complete(job.key)
            self.stats.forwarded += 1
        elif response.status_code >= 500:
            self._retry(job, f"service answered {response.status_code}: {response.text[:300]}", job_log)
        else:
            reason = f"service refused the job ({response.status_code}): {_error_text(response)}"
            self._fail(job, reason, job_log)

    def _retry(self, job: SpooledJob, error: str, job_log: logging.LoggerAdapter) -> None:  # type: ignore[type-arg]
        if self._clock() - job.received_at > self.config.max_age:
            self._fail(job, f"{error}; gave up after {self.config.max_age:g} s (bridge.max_age)", job_log)
            return
        delay = self._backoff(job)
        job_log.warning("attempt %d failed, retrying in %.1f s: %s", job.attempts, delay, error)
        self.spool.retry_later(job.key, delay, error)
        self.stats.retried += 1

    def _fail(self, job: SpooledJob, reason: str, job_log: logging.LoggerAdapter) -> None:  # type: ignore[type-arg]
        """Tell AiCSD PipelineFailed when its URLs are usable, then dead-letter the job."""
        job_log.error("job failed: %s", reason)
        callbacks = usable_callbacks(job.payload, self.config.callback_hosts)
        if callbacks is None:
            job_log.error("callback URLs not usable: AiCSD cannot be told; kept in the dead-letter table")
        else:
            report = self.aicsd.report(callbacks, PipelineOutcome.failed(reason))
            if not report.delivered:
                reason += " (AiCSD could not be told)"
        self.spool.fail(job, reason)
        self.stats.failed += 1


def usable_callbacks(payload: str | Mapping[str, Any], allowed_hosts: frozenset[str]):  # type: ignore[no-untyped-def]
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


def _field(response: HttpResponse, name: str) -> str | None:
    try:
        value = response.json().get(name)
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _error_text(response: HttpResponse) -> str:
    text = response.text.strip()
    return text[:500] if text else response.reason_phrase
