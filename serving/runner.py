"""Runs jobs: picks the model and the pipeline kind, and turns every failure into an outcome.

This is the one place where a `PipelineError` becomes a `PipelineFailed` outcome, so every
pipeline kind can simply raise.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from aicsd.errors import PipelineError
from aicsd.job import Job, ModelParams
from aicsd.logs import JobLog
from aicsd.outcome import PipelineOutcome
from pipeline.base import Pipeline, PipelineTask
from pipeline.classification import ClassificationPipeline
from pipeline.model_api import ModelApiModel, ModelApiPipeline, own_kind
from pipeline.counting import CountingPipeline
from pipeline.model_repository import CompiledModel, ModelRepository
from pipeline.output_files import FilesRecorder

from .files import resolve_inside
from .settings import Settings

__all__ = ["PIPELINE_KINDS", "PipelineRunner"]

log = logging.getLogger(__name__)

PipelineFactory = Callable[[CompiledModel, int], Pipeline]

PIPELINE_KINDS: dict[str, PipelineFactory] = {
    "Classification": lambda model, max_pixels: ClassificationPipeline(model, max_pixels=max_pixels),
    "BlobCounting": lambda model, max_pixels: CountingPipeline(model, max_pixels=max_pixels),
}
"""Our own kinds -> the pipeline kind that serves them (`own_kind` says which a model asks for);
every other model is served through openvino-model-api (`pipeline.model_api`)."""


class PipelineRunner:
    """Holds one pipeline per model, built once, and runs jobs through them."""

    def __init__(self, settings: Settings, repository: ModelRepository) -> None:
        self.settings = settings
        self.repository = repository
        self._pipelines: dict[str, Pipeline] = {}
        self._lock = threading.Lock()

    def pipeline(self, model_name: str) -> Pipeline:
        """The pipeline serving `model_name`, compiled and built on first use."""
        with self._lock:
            pipeline = self._pipelines.get(model_name)
            if pipeline is None:
                entry, entries = self.repository.describe(model_name)
                factory = PIPELINE_KINDS.get(own_kind(entries))
                if factory is not None:
                    pipeline = factory(self.repository.get(model_name), self.settings.max_pixels)
                else:  # every other model_type: openvino-model-api, or a ModelError saying what is missing
                    assert entry.model_file is not None
                    model = ModelApiModel(entry.name, entry.model_file, entries, core=self.repository.core,
                                          device=self.repository.device,
                                          performance_hint=self.repository.performance_hint)
                    pipeline = ModelApiPipeline(model, max_pixels=self.settings.max_pixels)
                self._pipelines[model_name] = pipeline
            return pipeline

    def load_all(self) -> list[str]:
        """Compile and warm up every model that has files; a broken model is logged, not fatal."""
        ready = []
        for entry in self.repository.discover():
            if not entry.has_model:
                log.info("model %s has no model file: listed as a pipeline with no model", entry.name)
                continue
            try:
                self.pipeline(entry.name).warm_up()
            except PipelineError as exc:
                log.error("model %s is not usable: %s", entry.name, exc)
                continue
            ready.append(entry.name)
        if self.settings.default_model not in ready:
            log.warning(
                "default model %s (PIPELINE_DEFAULT_MODEL) is not loaded; jobs must name a Model in ModelParams",
                self.settings.default_model,
            )
        return ready

    def model_name(self, params: ModelParams) -> str:
        return params.text("Model", self.settings.default_model)

    def run(self, job: Job, *, model: str | None = None, record_files: FilesRecorder | None = None) -> PipelineOutcome:
        """Run a job from the service with `model` (default: from its ModelParams): paths must lie
        inside the file roots; `record_files` is told of output files before they are named. Never raises."""
        job_log = JobLog(log, job.job_id, job.task_id)
        job_log.info("received from gateway %s", job.gateway_ip or "(not given)")

        def task() -> PipelineTask:
            roots = self.settings.file_roots
            return PipelineTask(
                input_file=resolve_inside(job.input_file, roots, "InputFileLocation", want_dir=False),
                output_folder=resolve_inside(job.output_folder, roots, "OutputFileFolder", want_dir=True),
                params=job.params,
                log=job_log,
                record_files=record_files,
            )

        return self._run(task, model or self.model_name(job.params), job_log)

    def run_local(self, input_file: Path, output_folder: Path, params: ModelParams) -> PipelineOutcome:
        """Run a pipeline on a local file with no file-root rule, for pipeline authors' CLI."""
        job_log = JobLog(log, "local", input_file.name)

        def task() -> PipelineTask:
            return PipelineTask(input_file, output_folder, params, job_log)

        return self._run(task, self.model_name(params), job_log)

    def _run(
        self, make_task: Callable[[], PipelineTask], model_name: str, job_log: logging.LoggerAdapter  # type: ignore[type-arg]
    ) -> PipelineOutcome:
        try:
            task = make_task()
            job_log.info("running model %s on %s", model_name, task.input_file)
            outcome = self.pipeline(model_name).run(task)
        except PipelineError as exc:
            job_log.warning("pipeline failed: %s", exc)
            return PipelineOutcome.failed(str(exc))
        except Exception:
            job_log.exception("pipeline crashed")
            return PipelineOutcome.failed("internal error in the pipeline service; see its log")
        job_log.info("pipeline complete: %s", outcome.results)
        return outcome
