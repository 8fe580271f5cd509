"""The BentoML service: AiCSD jobs in, pipeline results and AiCSD callbacks out.

Thin on purpose: it loads settings and the model repository once, wires the pipelines and the
AiCSD client to BentoML's API, and holds no pipeline logic. Run it with `bentoml serve` (or
`make serve`) and open the Swagger UI at http://localhost:3000.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any

import anyio
import anyio.to_thread
import bentoml
import yaml
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

with bentoml.importing():
    from aicsd.callbacks import AicsdClient, RetryPolicy
    from aicsd.errors import JobRejected
    from aicsd.job import MAX_BATCH, Job, JobRequest
    from aicsd.logs import configure_logging, quiet_refused_requests, shown
    from pipeline.model_repository import ModelRepository
    from serving.answers import (
        Answer,
        BatchItem,
        JobResponse,
        answer_batch,
        batch_body,
        handled_answer,
        parsed_job,
        refusal,
    )
    from serving.bundle import check_bundled_models
    from serving.jobs import JobHandler
    from serving.ledger import JobLedger
    from serving.model_watch import ModelsView, ModelWatcher
    from serving.runner import PipelineRunner
    from serving.settings import Settings
    from serving.task_pipeline import TaskPipelines

log = logging.getLogger("service")


class PipelineListing(BaseModel):
    """One entry of AiCSD's pipeline list (GET /api/v1/pipelines on AiCSD's pipeline service)."""

    id: str
    name: str
    description: str
    subscriptionTopic: str
    status: str


def _listing(view: ModelsView) -> list[PipelineListing]:
    """The served models as AiCSD's pipeline service lists pipelines (AICSD_CONTRACT.md section 5)."""
    return [
        PipelineListing(
            id=f"ovms/{model.name}",
            name=f"{model.name} OVMS Pipeline",
            description=model.description,
            subscriptionTopic=f"ovms/{model.name}",
            status="Running",
        )
        for model in view.models
    ]


SERVICE_NAME = "aicsd_pipeline"


def _runtime_config() -> dict[str, Any]:
    """This service's section of the BentoML runtime configuration.

    The file is AICSD_SERVICE_CONFIG, else BENTOML_CONFIG (which BentoML also reads itself),
    else bentoml.yaml next to this file.
    """
    named = os.environ.get("AICSD_SERVICE_CONFIG") or os.environ.get("BENTOML_CONFIG")
    path = Path(named) if named else Path(__file__).with_name("bentoml.yaml")
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    section = (data.get("services") or {}).get(SERVICE_NAME) or {}
    if not isinstance(section, dict):
        raise ValueError(f"{path}: services.{SERVICE_NAME} must be a mapping")
    return section


async def _get_pipelines(request: Request) -> JSONResponse:
    service: AicsdPipeline = bentoml.get_current_service()
    view = service.models.view
    body = [listing.model_dump() for listing in _listing(view)]
    return JSONResponse(body, headers={"X-Model-Poll": str(view.poll)})


# BentoML API routes are POST only; AiCSD's UI reads its pipeline list with a GET.
aicsd_api = Starlette(routes=[Route("/pipelines", _get_pipelines, methods=["GET"])])

# `bentoml build` (and loading the bento) passes bentofile.yaml's args: the models it must carry.
check_bundled_models(Path(__file__).parent, bentoml.use_arguments())

BatchOfJobs = Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_BATCH)]
"""The body of /classify_batch: each job is validated on its own, so one bad job is its own 400."""

RUNTIME = _runtime_config()
THREADS = int(RUNTIME.get("threads", 1))
"""Jobs run at once (BentoML's `threads`), by /classify and /classify_batch together."""


@bentoml.asgi_app(aicsd_api, path="/api/v1", name="aicsd_api")
@bentoml.service(name=SERVICE_NAME, **RUNTIME)
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
            latency_when_alone=self.settings.latency_when_alone,
        )
        self.runner = PipelineRunner(self.settings, self.repository)
        # Models present now are compiled and warmed up before the service says ready; later
        # ones are picked up by the watcher's thread every PIPELINE_MODEL_POLL seconds.
        self.models = ModelWatcher(self.repository, self.runner, self.settings.model_poll)
        loaded = self.models.load_present()
        if self.settings.default_model not in loaded:
            log.warning(
                "default model %s (PIPELINE_DEFAULT_MODEL) is not loaded: not ready until it is",
                self.settings.default_model,
            )
        self.models.start()
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
            served=lambda: [model.name for model in self.models.view.models],
        )
        self.jobs = JobHandler(self.runner, self.ledger, pipelines, self.aicsd)
        self._limiter: anyio.CapacityLimiter | None = None
        folders = ", ".join(str(d.resolve()) for d in self.settings.models_dir)
        log.info(
            "started: models %s from %s; ledger %s (%s, %d old entries forgotten); task look-up %s",
            ", ".join(loaded) or "none", folders, self.settings.ledger,
            ", ".join(f"{k}={v}" for k, v in sorted(self.ledger.counts().items())) or "empty", pruned,
            "on" if self.settings.task_lookup else "off (ModelParams Model or the default model decides)",
        )

    def __is_ready__(self) -> bool:
        """/readyz: ready only while the service can run jobs.

        With the task look-up on, each job's task picks its model: ready while any model is
        served. With it off, jobs that name no model run on the default one: ready while it is
        served, so a bento without its models never looks healthy.
        """
        if self.settings.task_lookup:
            return any(model.serving for model in self.models.view.models)
        return self.runner.serves(self.settings.default_model)

    @bentoml.on_shutdown
    def close(self) -> None:
        self.models.stop()
        self.aicsd.close()
        self.ledger.close()

    @bentoml.api
    async def classify(self, job: JobRequest, /, ctx: bentoml.Context) -> JobResponse:
        """Run an AiCSD job: the pipeline on its input file, then the job update and the status."""
        return await anyio.to_thread.run_sync(self._classify, job, ctx, limiter=self._job_slots())

    def _job_slots(self) -> anyio.CapacityLimiter:
        """The one limit on jobs running at once, /classify's and every batch's together: `threads`.

        BentoML's own limit for a sync API would count /classify alone, so with batches coming too
        twice as many jobs could run (and wait for the same two inference streams)."""
        if self._limiter is None:  # made in the event loop that serves it
            self._limiter = anyio.CapacityLimiter(THREADS)
        return self._limiter

    def _classify(self, job: JobRequest, ctx: bentoml.Context) -> JobResponse:
        try:
            parsed = Job.from_request(job, self.settings.callback_hosts)
        except JobRejected as exc:
            status, body = self._refused(exc, "/classify")
            ctx.response.status_code = status
            return JSONResponse(body, status_code=status)  # type: ignore[return-value]
        status, answer = handled_answer(parsed, self.jobs.handle(parsed))
        ctx.response.status_code = status
        return answer

    @bentoml.api(route="/classify_batch")
    async def classify_batch(self, jobs: BatchOfJobs, /) -> list[BatchItem]:
        """Run several AiCSD jobs at once (the MQTT bridge forwards a backlog this way).

        One answer per job, in order: the status and body /classify would have answered for it
        alone. A job refused does not stop the others; each job gets its own callbacks.
        """
        answers = await answer_batch(jobs, self._batch_job, lanes=THREADS, limiter=self._job_slots())
        return Response(batch_body(answers), media_type="application/json")  # type: ignore[return-value]

    def _batch_job(self, raw: dict[str, Any]) -> Answer:
        """One job of a batch; never raises, so one job's crash is its own 500, not the batch's."""
        try:
            parsed = parsed_job(raw, self.settings.callback_hosts)
        except JobRejected as exc:
            return self._refused(exc, "/classify_batch")
        try:
            return handled_answer(parsed, self.jobs.handle(parsed))
        except Exception as exc:
            log.exception("job=%s task=%s crashed in the service", shown(parsed.job_id), shown(parsed.task_id))
            return 500, {"error": f"internal error in the pipeline service: {type(exc).__name__}", "field": None}

    @staticmethod
    def _refused(exc: JobRejected, path: str) -> Answer:
        log.warning("refused request to %s (HTTP %d): %s", path, exc.status_code, shown(exc, 1000))
        return refusal(exc)

    @bentoml.api(route="/pipelines")
    def pipelines(self) -> list[PipelineListing]:
        """The served models as AiCSD lists pipelines; the same list as GET /api/v1/pipelines."""
        return _listing(self.models.view)
