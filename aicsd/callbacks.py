"""AiCSD callbacks: the job update (PUT, always first), then the pipeline status (POST, second).

The body follows AiCSD's handlers, not its prose docs: `OutputFiles` is a JSON array,
`ErrorDetails` is null or an object, `QCFlags` and `Results` are strings, and every request
carries a Content-Length. Connection errors, timeouts and 5xx answers are retried with
exponential backoff; a 4xx is final. A job update that was not accepted means no status is sent,
because AiCSD rejects a status that does not match the job's stored status.

`helper.py` keeps the reference demo's function names on top of this module.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .job import CallbackUrls
from .logs import JobLog, shown
from .outcome import COMPLETE, FAILED, OutputFile, PipelineOutcome
from .transport import HttpClient, HttpFailure

__all__ = [
    "AicsdClient",
    "CallbackAnswer",
    "CallbackReport",
    "RetryPolicy",
    "job_update_body",
]

log = logging.getLogger("aicsd.callbacks")


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: `tries` attempts, waiting `backoff`, 2x`backoff`, ... between them."""

    tries: int = 5
    backoff: float = 2.0
    timeout: float = 10.0

    def wait_before(self, attempt: int) -> float:
        """Seconds to wait before attempt number `attempt` (1-based; none before the first)."""
        return 0.0 if attempt <= 1 else self.backoff * 2 ** (attempt - 2)


@dataclass(frozen=True)
class CallbackAnswer:
    """What AiCSD answered to one callback, after all attempts."""

    url: str
    status_code: int | None
    body: str
    attempts: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status_code == 200

    @property
    def retryable(self) -> bool:
        """True when AiCSD was unreachable or failed (5xx): trying later may succeed."""
        return not self.ok and (self.status_code is None or self.status_code >= 500)

    def summary(self) -> dict[str, Any]:
        return {"StatusCode": self.status_code, "Body": self.body, "Attempts": self.attempts, "Error": self.error}


@dataclass(frozen=True)
class CallbackReport:
    """Both callbacks of one job; `pipeline_status` is None when the job update failed."""

    job_update: CallbackAnswer
    pipeline_status: CallbackAnswer | None

    @property
    def delivered(self) -> bool:
        return self.job_update.ok and self.pipeline_status is not None and self.pipeline_status.ok

    @property
    def retryable(self) -> bool:
        last = self.pipeline_status if self.job_update.ok else self.job_update
        return last is not None and last.retryable


def job_update_body(outcome: PipelineOutcome) -> dict[str, Any]:
    """The PUT body of AICSD_CONTRACT.md section 2 for one outcome."""
    return {
        "Status": outcome.status,
        "QCFlags": outcome.qc_flags,
        "OutputFiles": [_output_file(f) for f in outcome.output_files],
        "Results": outcome.results,
    }


def _output_file(output: OutputFile) -> dict[str, Any]:
    return {
        "DirName": output.dir_name,
        "Name": output.name,
        "Extension": output.extension,
        "Status": "",
        "ErrorDetails": None,
        "Owner": "",
    }


class AicsdClient:
    """Sends AiCSD callbacks over one kept-alive HTTP client; safe to share between threads."""

    def __init__(
        self,
        policy: RetryPolicy | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.policy = policy or RetryPolicy()
        self._sleep = sleep
        # No proxy from the environment and no redirects: callbacks go only to the job's own URLs.
        self._http = HttpClient(self.policy.timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AicsdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def report(self, callbacks: CallbackUrls, outcome: PipelineOutcome) -> CallbackReport:
        """Job update first; the status only after AiCSD accepted the job update."""
        job_log = JobLog(log, callbacks.job_id, callbacks.task_id)
        update = self.put_job_update(callbacks.job_update, job_update_body(outcome), job_log)
        if not update.ok:
            job_log.error("job update not accepted; status %s not sent", outcome.status)
            return CallbackReport(update, None)
        status = self.post_status(callbacks.pipeline_status, outcome.status, job_log)
        return CallbackReport(update, status)

    def put_job_update(
        self, url: str, body: Mapping[str, Any], job_log: logging.LoggerAdapter | None = None  # type: ignore[type-arg]
    ) -> CallbackAnswer:
        content = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return self._send("PUT", url, content, "application/json", job_log)

    def post_status(
        self, url: str, status: str, job_log: logging.LoggerAdapter | None = None  # type: ignore[type-arg]
    ) -> CallbackAnswer:
        if status not in (COMPLETE, FAILED):
            raise ValueError(f"pipeline status must be {COMPLETE} or {FAILED}, got {status!r}")
        return self._send("POST", url, status.encode("ascii"), "text/plain", job_log)

    def get(
        self, url: str, job_log: logging.LoggerAdapter | None = None  # type: ignore[type-arg]
    ) -> tuple[CallbackAnswer, str]:
        """GET a resource of AiCSD's (the task launcher's task), retried like the callbacks; the
        answer and the whole text of the last response."""
        return self._exchange("GET", url, b"", {}, job_log)

    def _send(
        self,
        method: str,
        url: str,
        content: bytes,
        content_type: str,
        job_log: logging.LoggerAdapter | None,  # type: ignore[type-arg]
    ) -> CallbackAnswer:
        return self._exchange(method, url, content, {"Content-Type": content_type}, job_log)[0]

    def _exchange(
        self,
        method: str,
        url: str,
        content: bytes,
        headers: Mapping[str, str],
        job_log: logging.LoggerAdapter | None,  # type: ignore[type-arg]
    ) -> tuple[CallbackAnswer, str]:
        out: logging.Logger | logging.LoggerAdapter = job_log or log  # type: ignore[type-arg]
        answer = CallbackAnswer(url, None, "", 0, "not attempted")
        text = ""
        for attempt in range(1, self.policy.tries + 1):
            wait = self.policy.wait_before(attempt)
            if wait:
                self._sleep(wait)
            try:
                response = self._http.request(method, url, content, headers)
            except HttpFailure as exc:
                answer = CallbackAnswer(url, None, "", attempt, str(exc))
                out.warning("%s %s attempt %d/%d failed: %s", method, shown(url), attempt, self.policy.tries,
                            shown(answer.error, 500))
                continue
            text = response.text
            answer = CallbackAnswer(url, response.status_code, text[:2000], attempt)
            if answer.ok:
                out.info("%s %s accepted (200) on attempt %d", method, shown(url), attempt)
                return answer, text
            out.warning(
                "%s %s attempt %d/%d answered %d: %s",
                method, shown(url), attempt, self.policy.tries, response.status_code, shown(answer.body.strip(), 300),
            )
            if not answer.retryable:
                return answer, text
        out.error("%s %s gave up after %d attempts", method, shown(url), answer.attempts)
        return answer, text
