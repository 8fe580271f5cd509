"""Runs jobs: picks the model and the pipeline kind, and turns every failure into an outcome.

This is the one place where a `PipelineError` becomes a `PipelineFailed` outcome, so every
pipeline kind can simply raise.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from aicsd.logs import JobLog
from pipeline.base import InputFile, OutputFolder, Pipeline, PipelineTask
from pipeline.classification import ClassificationPipeline
from pipeline.counting import CountingPipeline
from aicsd.errors import ModelError, PipelineError
from aicsd.job import Job, ModelParams

from .files import open_input_file, open_output_folder
from pipeline.memory import MIB, MemoryBudget
from pipeline.model_repository import CompiledModel, ModelRepository
from aicsd.outcome import PipelineOutcome
from .settings import Settings

__all__ = ["PIPELINE_KINDS", "PipelineRunner"]

log = logging.getLogger(__name__)

PipelineFactory = Callable[[CompiledModel, int], Pipeline]

PIPELINE_KINDS: dict[str, PipelineFactory] = {
    "Classification": lambda model, max_pixels: ClassificationPipeline(model, max_pixels=max_pixels),
    "BlobCounting": lambda model, max_pixels: CountingPipeline(model, max_pixels=max_pixels),
}
"""model_type (from the model's rt_info) -> the pipeline kind that serves it."""


class PipelineRunner:
    """Holds one pipeline per model, built once, and runs jobs through them."""

    def __init__(self, settings: Settings, repository: ModelRepository) -> None:
        self.settings = settings
        self.repository = repository
        self._pipelines: dict[str, Pipeline] = {}
        self._lock = threading.Lock()
        self.image_memory = MemoryBudget(settings.image_memory_mb * MIB)

    def pipeline(self, model_name: str) -> Pipeline:
        """The pipeline serving `model_name`, compiled and built on first use."""
        with self._lock:
            pipeline = self._pipelines.get(model_name)
            if pipeline is None:
                model = self.repository.get(model_name)
                model_type = model.info.model_type or "Classification"
                factory = PIPELINE_KINDS.get(model_type)
                if factory is None:
                    known = ", ".join(sorted(PIPELINE_KINDS))
                    raise ModelError(
                        f"model '{model_name}' has model_type '{model_type}', which no pipeline serves (known: {known})"
                    )
                pipeline = factory(model, self.settings.max_pixels)
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

    def run(self, job: Job) -> PipelineOutcome:
        """Run a job from the service: paths must lie inside the file roots. Never raises."""
        job_log = JobLog(log, job.job_id, job.task_id)
        job_log.info("received from gateway %s", job.gateway_ip or "(not given)")
        roots = self.settings.file_roots
        return self._run(
            lambda: open_input_file(job.input_file, roots),
            lambda: open_output_folder(job.output_folder, roots),
            job.params,
            job_log,
        )

    def run_local(self, input_file: Path, output_folder: Path, params: ModelParams) -> PipelineOutcome:
        """Run a pipeline on a local file with no file-root rule, for pipeline authors' CLI."""
        job_log = JobLog(log, "local", input_file.name)
        return self._run(
            lambda: open_input_file(input_file, None),
            lambda: open_output_folder(output_folder, None),
            params,
            job_log,
        )

    def _run(
        self,
        open_input: Callable[[], InputFile],
        open_output: Callable[[], OutputFolder],
        params: ModelParams,
        job_log: logging.LoggerAdapter,  # type: ignore[type-arg]
    ) -> PipelineOutcome:
        try:
            with self._task(open_input, open_output, params, job_log) as task:
                model_name = self.model_name(params)
                job_log.info("running model %s on %s", model_name, task.input_file.path)
                outcome = self.pipeline(model_name).run(task)
        except PipelineError as exc:
            job_log.warning("pipeline failed: %s", exc)
            return PipelineOutcome.failed(str(exc))
        except Exception:
            job_log.exception("pipeline crashed")
            return PipelineOutcome.failed("internal error in the pipeline service; see its log")
        job_log.info("pipeline complete: %s", outcome.results)
        return outcome

    def _task(
        self,
        open_input: Callable[[], InputFile],
        open_output: Callable[[], OutputFolder],
        params: ModelParams,
        job_log: logging.LoggerAdapter,  # type: ignore[type-arg]
    ) -> PipelineTask:
        """Open the input file, then the output folder (closing the first if the second fails)."""
        input_file = open_input()
        try:
            output_folder = open_output()
        except BaseException:
            input_file.close()
            raise
        return PipelineTask(
            input_file,
            output_folder,
            params,
            job_log,
            max_pages=self.settings.max_pages,
            memory=self.image_memory.claim(job_log),
        )
