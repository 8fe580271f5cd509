"""One job from request to AiCSD's answers: the ledger, the task's pipeline, the run, the callbacks.

A job that comes again (a bridge retry, an MQTT redelivery, AiCSD's RetryWindow) is resumed from
the ledger, never run twice nor reported twice (see `serving.ledger`). Two requests for the same
job in this process take turns; the second then finds the first one's outcome.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

from aicsd.callbacks import AicsdClient, CallbackAnswer, job_update_body
from aicsd.errors import AicsdUnreachable, NotServedHere
from aicsd.job import Job
from aicsd.logs import JobLog
from aicsd.outcome import PipelineOutcome

from .ledger import Claim, JobLedger, LedgerBusy, State, job_digest
from .runner import PipelineRunner
from .task_pipeline import TaskPipelines

__all__ = ["Handled", "JobHandler"]

log = logging.getLogger(__name__)

PRUNE_EVERY = 1000

Later = Literal["aicsd", "busy"]


@dataclass(frozen=True)
class Handled:
    """What became of one request for a job."""

    outcome: PipelineOutcome | None = None
    job_update: CallbackAnswer | None = None
    pipeline_status: CallbackAnswer | None = None
    repeated: bool = False
    later: Later | None = None  # try again later: AiCSD could not answer, or another process runs it
    reason: str = ""  # why later, or why the job is left to another service

    @property
    def retry_later(self) -> bool:
        """True when asking again later may get further: AiCSD unreachable or busy elsewhere."""
        if self.later is not None:
            return True
        last = self.pipeline_status if self.job_update is not None and self.job_update.ok else self.job_update
        return last is not None and last.retryable


class JobHandler:
    """Runs jobs through the ledger; safe to call from many threads."""

    def __init__(
        self, runner: PipelineRunner, ledger: JobLedger, pipelines: TaskPipelines, aicsd: AicsdClient
    ) -> None:
        self.runner = runner
        self.ledger = ledger
        self.pipelines = pipelines
        self.aicsd = aicsd
        self._turns: dict[tuple[str, str, str], _Turn] = {}
        self._turns_lock = threading.Lock()
        self._claims = 0

    def handle(self, job: Job) -> Handled:
        key = (job.job_id, job.task_id, job_digest(job))
        job_log = JobLog(log, job.job_id, job.task_id)
        with self._turn(key):
            try:
                entry = self.ledger.claim(key)
            except LedgerBusy as exc:
                job_log.info("came again while %s; answered: try later", exc)
                return Handled(later="busy", reason=str(exc))
            self._maybe_prune()
            if entry.claim is Claim.ANSWER:
                job_log.info("came again: already reported to AiCSD; stored answer returned, nothing sent")
                return Handled(entry.outcome, entry.job_update, entry.pipeline_status, repeated=True)
            handled: Handled | None = None
            try:
                if entry.claim is Claim.RUN:
                    try:
                        outcome = self._run(job, key, job_log)
                    except _Later as later:
                        return later.handled
                    self.ledger.computed(key, outcome)
                    handled = self._report(key, outcome, State.COMPUTED, None, None, job, job_log, repeated=False)
                else:
                    assert entry.outcome is not None
                    job_log.info(
                        "came again with its outcome stored (%s): sending what AiCSD has not accepted",
                        entry.state.value,
                    )
                    handled = self._report(
                        key, entry.outcome, entry.state, entry.job_update, entry.pipeline_status, job, job_log,
                        repeated=True,
                    )
                return handled
            except BaseException:
                self.ledger.release(key)
                raise
            finally:
                # An accepted status already let the job go in the same write that noted it.
                if handled is None or handled.pipeline_status is None or not handled.pipeline_status.ok:
                    self.ledger.finish(key)

    def _run(self, job: Job, key: tuple[str, str, str], job_log: JobLog) -> PipelineOutcome:
        try:
            return self.runner.run(
                job,
                model=lambda: self.pipelines.choose(job, job_log),
                record_files=lambda files: self.ledger.files_written(key, files),
            )
        except AicsdUnreachable as exc:
            job_log.warning("%s; answered 502 so that it is tried later", exc)
            self.ledger.release(key)
            raise _Later(Handled(later="aicsd", reason=str(exc))) from None
        except NotServedHere as exc:
            self.ledger.release(key)
            raise _Later(Handled(reason=str(exc))) from None

    def _report(
        self,
        key: tuple[str, str, str],
        outcome: PipelineOutcome,
        state: State,
        update: CallbackAnswer | None,
        status: CallbackAnswer | None,
        job: Job,
        job_log: JobLog,
        *,
        repeated: bool,
    ) -> Handled:
        """Send the callbacks AiCSD has not accepted yet: the job update first, the status second."""
        if state is State.COMPUTED:
            update = self.aicsd.put_job_update(job.callbacks.job_update, job_update_body(outcome), job_log)
            self.ledger.answered(key, "job_update", update)
            if not update.ok:
                job_log.error("job update not accepted; status %s not sent", outcome.status)
                return Handled(outcome, update, None, repeated=repeated)
            state = State.UPDATE_ACCEPTED
        if state is State.UPDATE_ACCEPTED:
            status = self.aicsd.post_status(job.callbacks.pipeline_status, outcome.status, job_log)
            self.ledger.answered(key, "pipeline_status", status)
        return Handled(outcome, update, status, repeated=repeated)

    @contextmanager
    def _turn(self, key: tuple[str, str, str]) -> Iterator[None]:
        """Requests for the same job in this process run one after the other."""
        with self._turns_lock:
            turn = self._turns.setdefault(key, _Turn())
            turn.users += 1
        try:
            with turn.lock:
                yield
        finally:
            with self._turns_lock:
                turn.users -= 1
                if turn.users == 0:
                    del self._turns[key]

    def _maybe_prune(self) -> None:
        self._claims += 1
        if self._claims % PRUNE_EVERY == 0:
            forgotten = self.ledger.prune()
            if forgotten:
                log.info("ledger: forgot %d reported jobs older than PIPELINE_REPEAT_WINDOW", forgotten)


@dataclass
class _Turn:
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0


class _Later(Exception):
    def __init__(self, handled: Handled) -> None:
        super().__init__(handled.reason)
        self.handled = handled
