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
    from helper import AicsdClient, CallbackAnswer, CallbackReport, RetryPolicy, job_update_body
    from aicsd.errors import JobRejected
    from aicsd.job import Job, JobRequest
    from aicsd.logs import configure_logging, quiet_refused_requests, shown
    from pipeline.model_repository import ModelRepository
    from aicsd.outcome import PipelineOutcome
    from serving.recent_jobs import RecentJobs
    from serving.runner import PipelineRunner
    from serving.settings import Settings

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
    Status: str
    QCFlags: str
    OutputFiles: list[dict[str, Any]]
    Results: str
    JobUpdate: CallbackResult
    PipelineStatus: CallbackResult | None = Field(description="null when the job update was not accepted")
    Repeated: bool = Field(description="true when this job was already reported and the stored answer is returned")


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
        quiet_refused_requests()
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
        self.recent: RecentJobs[tuple[PipelineOutcome, CallbackReport]] = RecentJobs(self.settings.repeat_window)
        log.info("ready: models %s from %s", ", ".join(loaded) or "none", self.settings.models_dir.resolve())

    @bentoml.on_shutdown
    def close(self) -> None:
        self.aicsd.close()

    @bentoml.api
    def classify(self, job: JobRequest, /, ctx: bentoml.Context) -> JobResponse:
        """Run an AiCSD job: the pipeline on its input file, then the job update and the status."""
        try:
            parsed = Job.from_request(job, self.settings.callback_hosts)
        except JobRejected as exc:
            # Answered 4xx naming the field; no callback goes anywhere.
            log.warning("refused request to /classify (HTTP %d): %s", exc.status_code, shown(exc, 1000))
            ctx.response.status_code = exc.status_code
            return JSONResponse({"error": str(exc), "field": exc.field}, status_code=exc.status_code)  # type: ignore[return-value]

        (outcome, report), repeated = self.recent.run_once(
            parsed.key, lambda: self._process(parsed), keep=lambda done: done[1].delivered
        )
        if not report.delivered and report.retryable:
            ctx.response.status_code = HTTPStatus.BAD_GATEWAY
        body = job_update_body(outcome)
        return JobResponse(
            JobId=parsed.job_id,
            TaskId=parsed.task_id,
            Status=body["Status"],
            QCFlags=body["QCFlags"],
            OutputFiles=body["OutputFiles"],
            Results=body["Results"],
            JobUpdate=_callback(report.job_update),  # type: ignore[arg-type]
            PipelineStatus=_callback(report.pipeline_status),
            Repeated=repeated,
        )

    def _process(self, job: Job) -> tuple[PipelineOutcome, CallbackReport]:
        outcome = self.runner.run(job)
        return outcome, self.aicsd.report(job.callbacks, outcome)

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
