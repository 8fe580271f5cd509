"""Which model runs a job: the pipeline the person chose for the task in AiCSD's web UI.

AiCSD's job message does not name the pipeline (AICSD_CONTRACT.md section 1): every `ovms/`
task publishes to the same topic. The task's `PipelineId` (`ovms/<dir>`) is asked of the task
launcher, `GET /api/v1/task/<taskid>` at the origin of the job's PipelineStatusUrl, once per task
id (a task's pipeline never changes). `ModelParams` `Model`, where given, must agree with it.
With the look-up switched off (use without AiCSD), `ModelParams` `Model` or the default decides.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable

from aicsd.callback_rules import task_url
from aicsd.callbacks import AicsdClient
from aicsd.errors import AicsdUnreachable, ModelError, NotServedHere
from aicsd.job import Job
from aicsd.logs import JobLog

__all__ = ["TaskPipelines"]

OVMS_PREFIX = "ovms/"




class TaskPipelines:
    """Asks the task launcher for a task's pipeline, remembering up to `capacity` task ids."""

    def __init__(
        self,
        aicsd: AicsdClient,
        *,
        lookup: bool,
        default_model: str,
        shared_topic: bool,
        served: Callable[[], list[str]],
        capacity: int = 10_000,
    ) -> None:
        self.aicsd = aicsd
        self.lookup = lookup
        self.default_model = default_model
        self.shared_topic = shared_topic
        self._served = served
        self._capacity = capacity
        self._known: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def choose(self, job: Job, job_log: JobLog) -> str:
        """The model for `job`.

        Raises `ModelError` (the job fails, naming why) for a disagreement or a pipeline this
        service does not serve, `NotServedHere` for a pipeline another service on the same topic
        serves, and `AicsdUnreachable` when the task launcher cannot answer.
        """
        asked = job.params.text("Model", "")
        if not self.lookup:
            return asked or self.default_model
        pipeline_id = self.pipeline_id(job, job_log)
        if not pipeline_id.startswith(OVMS_PREFIX) or not pipeline_id[len(OVMS_PREFIX):]:
            return self._elsewhere(f"the task's pipeline {pipeline_id!r} is not an OVMS pipeline", job_log)
        model = pipeline_id[len(OVMS_PREFIX):]
        if asked and asked != model:
            raise ModelError(
                f"the task's pipeline is {pipeline_id} but ModelParams Model is '{asked}': "
                f"remove Model from the task's parameters or make it '{model}'"
            )
        served = self._served()
        if model not in served:
            listing = ", ".join(f"{OVMS_PREFIX}{name}" for name in served) or "none"
            return self._elsewhere(
                f"pipeline {pipeline_id} is not served by this service (it serves: {listing})", job_log
            )
        return model

    def _elsewhere(self, reason: str, job_log: JobLog) -> str:
        if self.shared_topic:
            job_log.info("%s; left for the service that serves it (PIPELINE_SHARED_TOPIC)", reason)
            raise NotServedHere(reason)
        raise ModelError(reason)

    def pipeline_id(self, job: Job, job_log: JobLog) -> str:
        """The task's PipelineId, from memory or from the task launcher."""
        with self._lock:
            known = self._known.get(job.task_id)
            if known is not None:
                self._known.move_to_end(job.task_id)
                return known
        url = task_url(job.callbacks.pipeline_status)
        answer, text = self.aicsd.get(url, job_log)
        if answer.retryable:
            detail = answer.error or f"answered {answer.status_code}"
            raise AicsdUnreachable(f"task launcher could not tell the task's pipeline ({url}: {detail})")
        if not answer.ok:
            raise ModelError(f"task launcher answered {answer.status_code} for task {job.task_id}: {answer.body[:200]}")
        pipeline_id = _pipeline_id(text)
        if pipeline_id is None:
            raise ModelError(f"task launcher's answer for task {job.task_id} has no PipelineId string")
        with self._lock:
            self._known[job.task_id] = pipeline_id
            while len(self._known) > self._capacity:
                self._known.popitem(last=False)
        job_log.info("task's pipeline is %s", pipeline_id)
        return pipeline_id


def _pipeline_id(text: str) -> str | None:
    """`PipelineId` of the task launcher's task JSON (Go field names; matched case-insensitively,
    as Go's encoding/json does)."""
    try:
        task = json.loads(text)
    except ValueError:
        return None
    if not isinstance(task, dict):
        return None
    for key, value in task.items():
        if isinstance(key, str) and key.lower() == "pipelineid" and isinstance(value, str) and value.strip():
            return value.strip()
    return None
