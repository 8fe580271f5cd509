"""The BentoML service: AiCSD jobs in, pipeline results and AiCSD callbacks out.

Thin on purpose: it loads settings and the model repository once, wires the pipelines and the
AiCSD client to BentoML's API, and holds no pipeline logic. Run it with `bentoml serve` (or
`make serve`) and open the Swagger UI at http://localhost:3000.
"""

from __future__ import annotations

import logging
import os
from http import HTTPStatus
from pathlib import Path
from typing import Any

import bentoml
import yaml
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

with bentoml.importing():
    from aicsd.callbacks import AicsdClient, CallbackAnswer, RetryPolicy, job_update_body
    from aicsd.errors import JobRejected
    from aicsd.job import Job, JobRequest
    from aicsd.logs import configure_logging
    from pipeline.model_repository import ModelRepository
    from serving.jobs import JobHandler
    from serving.ledger import JobLedger
    from serving.runner import PipelineRunner
    from serving.settings import Settings
    from serving.task_pipeline import TaskPipelines

log = logging.getLogger("service")


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


class PipelineListing(BaseModel):
    """One entry of AiCSD's pipeline list (GET /api/v1/pipelines on AiCSD's pipeline service)."""

    id: str
    name: str
    description: str
    subscriptionTopic: str
    status: str


def _callback(answer: CallbackAnswer | None) -> CallbackResult | None:
    return None if answer is None else CallbackResult(**answer.summary())


SERVICE_NAME = "aicsd_pipeline"


def _runtime_config() -> dict[str, Any]:
    """This service's section of bentoml.yaml (or of the file AICSD_SERVICE_CONFIG names)."""
    path = Path(os.environ.get("AICSD_SERVICE_CONFIG") or Path(__file__).with_name("bentoml.yaml"))
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    section = (data.get("services") or {}).get(SERVICE_NAME) or {}
    if not isinstance(section, dict):
        raise ValueError(f"{path}: services.{SERVICE_NAME} must be a mapping")
    return section


@bentoml.service(name=SERVICE_NAME, **_runtime_config())
class AicsdPipeline:
    """Runs AiCSD jobs through OpenVINO pipelines from the model repository."""

    def __init__(self) -> None:
        self.settings = Settings.from_env()
        configure_logging(level=self.settings.log_level)
        self.repository = ModelRepository(
            self.settings.models_dir,
            device=self.settings.device,
            performance_hint=self.settings.performance_hint,
            cache_dir=self.settings.cache_dir,
        )
        self.runner = PipelineRunner(self.settings, self.repository)
        loaded = self.runner.load_all()
        self.aicsd = AicsdClient(
            RetryPolicy(
                tries=self.settings.callback_tries,
                backoff=self.settings.callback_backoff,
                timeout=self.settings.callback_timeout,
            )
        )
        self.ledger = JobLedger(self.settings.ledger, keep_reported=self.settings.repeat_window)
        pruned = self.ledger.prune()
        pipelines = TaskPipelines(
            self.aicsd,
            lookup=self.settings.task_lookup,
            default_model=self.settings.default_model,
            shared_topic=self.settings.shared_topic,
            served=lambda: [entry.name for entry in self.repository.discover()],
        )
        self.jobs = JobHandler(self.runner, self.ledger, pipelines, self.aicsd)
        log.info(
            "ready: models %s from %s; ledger %s (%s, %d old entries forgotten); task look-up %s",
            ", ".join(loaded) or "none", self.settings.models_dir.resolve(), self.settings.ledger,
            ", ".join(f"{k}={v}" for k, v in sorted(self.ledger.counts().items())) or "empty", pruned,
            "on" if self.settings.task_lookup else "off (ModelParams Model or the default model decides)",
        )

    @bentoml.on_shutdown
    def close(self) -> None:
        self.aicsd.close()
        self.ledger.close()

    @bentoml.api
    def classify(self, job: JobRequest, /, ctx: bentoml.Context) -> JobResponse:
        """Run an AiCSD job: the pipeline on its input file, then the job update and the status."""
        try:
            parsed = Job.from_request(job, self.settings.callback_hosts)
        except JobRejected as exc:
            # Answered 4xx naming the field; no callback goes anywhere.
            log.warning("rejected request: %s", exc)
            ctx.response.status_code = exc.status_code
            return JSONResponse({"error": str(exc), "field": exc.field}, status_code=exc.status_code)  # type: ignore[return-value]

        handled = self.jobs.handle(parsed)
        if handled.later == "busy":
            ctx.response.status_code = HTTPStatus.SERVICE_UNAVAILABLE
        elif handled.retry_later:
            ctx.response.status_code = HTTPStatus.BAD_GATEWAY
        body = job_update_body(handled.outcome) if handled.outcome is not None else {}
        return JobResponse(
            JobId=parsed.job_id,
            TaskId=parsed.task_id,
            Status=body.get("Status", ""),
            QCFlags=body.get("QCFlags", ""),
            OutputFiles=body.get("OutputFiles", []),
            Results=body.get("Results", ""),
            JobUpdate=_callback(handled.job_update),
            PipelineStatus=_callback(handled.pipeline_status),
            Repeated=handled.repeated,
            Note=handled.reason,
        )

    @bentoml.api(route="/pipelines")
    def pipelines(self) -> list[PipelineListing]:
        """The served models as AiCSD lists pipelines: every model directory with a version."""
        return [
            PipelineListing(
                id=f"ovms/{entry.name}",
                name=f"{entry.name} OVMS Pipeline",
                description=(
                    f"{entry.name} version {entry.version}" if entry.has_model else f"{entry.name} (no model)"
                ),
                subscriptionTopic=f"ovms/{entry.name}",
                status="Running",
            )
            for entry in self.repository.discover()
        ]
