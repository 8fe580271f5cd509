"""What the service answers for a job: the HTTP status and body, one shape for `/classify` and
for each job of `/classify_batch`.

A job answered alone and the same job inside a batch get the same status and the same body, so
the bridge reads both with one function. A batch's jobs run in lanes (`answer_batch`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any

import anyio
import anyio.to_thread
from pydantic import BaseModel, Field, ValidationError

from aicsd.callbacks import CallbackAnswer, job_update_body
from aicsd.errors import JobRejected
from aicsd.job import Job, JobRequest
from aicsd.logs import validation_problems

from .jobs import Handled

__all__ = ["Answer", "BatchItem", "CallbackResult", "JobResponse", "answer_batch", "batch_body", "handled_answer",
           "parsed_job", "refusal"]


class CallbackResult(BaseModel):
    StatusCode: int | None = Field(description="HTTP status AiCSD answered; null when unreachable")
    Body: str
    Attempts: int
    Error: str | None


class JobResponse(BaseModel):
    """What the pipeline produced and what AiCSD answered to each callback."""

    JobId: str
    TaskId: str
    Status: str = Field(description="PipelineComplete or PipelineFailed; empty when the job was not run here")
    QCFlags: str = ""
    OutputFiles: list[dict[str, Any]] = Field(default_factory=list)
    Results: str = ""
    JobUpdate: CallbackResult | None = Field(None, description="null when no job update was sent")
    PipelineStatus: CallbackResult | None = Field(None, description="null when the job update was not accepted")
    Repeated: bool = Field(
        False, description="true when the job came again: its stored outcome is used, the pipeline did not run again"
    )
    Note: str = Field("", description="why the job was not run: AiCSD unreachable, or left to another service")


class BatchItem(BaseModel):
    """One job's answer inside a `/classify_batch` answer: what `/classify` would have answered."""

    StatusCode: int = Field(description="the HTTP status /classify would have answered for this job alone")
    Body: dict[str, Any] = Field(
        description="the body /classify would have answered: a JobResponse, or {error, field} when refused"
    )


Answer = tuple[int, JobResponse | dict[str, Any]]
"""(HTTP status, body) for one job."""


def refusal(exc: JobRejected) -> Answer:
    """A request that cannot be run or reported: 4xx naming the field; no callback goes anywhere."""
    return exc.status_code, {"error": str(exc), "field": exc.field}


def parsed_job(raw: Any, allowed_hosts: frozenset[str]) -> Job:
    """One job of a batch, validated as `/classify` validates its body; `JobRejected` (400, like
    BentoML's answer to a body that fails validation) names the first field at fault."""
    try:
        request = JobRequest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        field = ".".join(str(part) for part in first) or "job"
        raise JobRejected(field, validation_problems(exc, "job"), status_code=HTTPStatus.BAD_REQUEST) from None
    return Job.from_request(request, allowed_hosts)


def _callback(answer: CallbackAnswer | None) -> CallbackResult | None:
    return None if answer is None else CallbackResult(**answer.summary())


def handled_answer(job: Job, handled: Handled) -> tuple[int, JobResponse]:
    """200 with the outcome; 503 when another process runs the job; 502 when AiCSD could not be
    told or asked (the caller may try again later)."""
    status = HTTPStatus.OK
    if handled.later == "busy":
        status = HTTPStatus.SERVICE_UNAVAILABLE
    elif handled.retry_later:
        status = HTTPStatus.BAD_GATEWAY
    body = job_update_body(handled.outcome) if handled.outcome is not None else {}
    return status, JobResponse(
        JobId=job.job_id,
        TaskId=job.task_id,
        Status=body.get("Status", ""),
        QCFlags=body.get("QCFlags", ""),
        OutputFiles=body.get("OutputFiles", []),
        Results=body.get("Results", ""),
        JobUpdate=_callback(handled.job_update),
        PipelineStatus=_callback(handled.pipeline_status),
        Repeated=handled.repeated,
        Note=handled.reason,
    )


def batch_body(answers: Sequence[Answer]) -> bytes:
    """The `/classify_batch` answer, a `BatchItem` per job, as JSON bytes.

    Written directly: a `BatchItem` model per job, dumped again by BentoML, cost about 6% of the
    service's interpreter time under a batch load (py-spy), for the same bytes.
    """
    items = []
    for status, body in answers:
        text = body.model_dump_json() if isinstance(body, BaseModel) else json.dumps(body, ensure_ascii=False)
        items.append(f'{{"StatusCode":{int(status)},"Body":{text}}}')
    return ("[" + ",".join(items) + "]").encode("utf-8")


async def answer_batch(
    jobs: Sequence[Any], answer: Callable[[Any], Answer], *, lanes: int, limiter: anyio.CapacityLimiter
) -> list[Answer]:
    """Each job's `answer`, in order, from at most `lanes` worker threads at once (each also holding
    a token of `limiter`).

    Each lane takes the next job not yet taken until none is left, so a slow job holds up only its
    own lane. Why not a thread hand-off per job: every hand-off wakes a thread and the event loop
    again, and on 2 cores a batch of 8 jobs in lanes cost 10.0 to 10.6 core-ms per job against
    11.4 (measured with `python -m bench`'s batch load, issue 10), inference threads included.
    """
    answers: list[Answer | None] = [None] * len(jobs)
    pending = iter(range(len(jobs)))  # shared by the lanes: taking the next index holds the GIL

    def lane() -> None:
        for index in pending:
            answers[index] = answer(jobs[index])

    await asyncio.gather(*(anyio.to_thread.run_sync(lane, limiter=limiter) for _ in range(min(lanes, len(jobs)))))
    assert all(item is not None for item in answers)
    return answers  # type: ignore[return-value]
