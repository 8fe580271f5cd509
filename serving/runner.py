"""Runs jobs: picks the model and the pipeline kind, and turns every failure into an outcome.

This is the one place where a `PipelineError` becomes a `PipelineFailed` outcome, so every
pipeline kind can simply raise.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from aicsd.errors import JobDeferred, ModelError, PipelineError
from aicsd.job import Job, ModelParams
from aicsd.logs import JobLog, shown
from aicsd.outcome import PipelineOutcome
from pipeline.base import FilesRecorder, InputFile, OutputFolder, Pipeline, PipelineTask
from pipeline.classification import ClassificationPipeline
from pipeline.counting import CountingPipeline
from pipeline.memory import MIB, MemoryBudget
from pipeline.model_api import ModelApiModel, ModelApiPipeline, own_kind
from pipeline.model_repository import ACTIVE_JOBS, CompiledModel, ModelEntry, ModelRepository, no_model_file

from .files import open_input_file, open_output_folder
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
    """Holds one pipeline per model name and runs jobs through them.

    Without a watcher a pipeline is built on first use. With one (`serving.model_watch`), the
    watcher builds pipelines off the request path and swaps them in with `install`; a job keeps
    the pipeline object it got, so it finishes on the version it started with.
    """

    def __init__(self, settings: Settings, repository: ModelRepository) -> None:
        self.settings = settings
        self.repository = repository
        self._pipelines: dict[str, Pipeline] = {}
        self._problems: dict[str, str] = {}
        self._lock = threading.Lock()
        self.watched = False
        self.image_memory = MemoryBudget(settings.image_memory_mb * MIB)

    def pipeline(self, model_name: str) -> Pipeline:
        """The pipeline serving `model_name`; built on first use unless a watcher keeps them."""
        with self._lock:
            pipeline = self._pipelines.get(model_name)
            if pipeline is not None:
                return pipeline
            if self.watched:
                raise self._not_served(model_name)
            pipeline = self.build(self.repository.entry(model_name))
            self._pipelines[model_name] = pipeline
            return pipeline

    def build(self, entry: ModelEntry) -> Pipeline:
        """A pipeline for one model version, compiled once: our own kinds (`own_kind`: the
        counter, our classifier) on our compiled model; every other model through
        openvino-model-api, or a `ModelError` that says what metadata is missing."""
        entries = self.repository.model_info(entry)
        factory = PIPELINE_KINDS.get(own_kind(entries))
        if factory is not None:
            return factory(self.repository.compile(entry), self.settings.max_pixels)
        assert entry.model_file is not None  # model_info refuses a version without one
        model = ModelApiModel(
            entry.name, entry.model_file, entries, core=self.repository.core,
            device=self.repository.device, performance_hint=self.repository.performance_hint,
        )
        return ModelApiPipeline(model, max_pixels=self.settings.max_pixels)

    def install(self, model_name: str, pipeline: Pipeline) -> None:
        """Serve `model_name` with `pipeline` from now on; jobs already running keep the old one."""
        with self._lock:
            self._pipelines[model_name] = pipeline
            self._problems.pop(model_name, None)

    def withdraw(self, model_name: str, problem: str | None = None) -> None:
        """Stop serving `model_name`; `problem` is what jobs naming it are told, if it still exists."""
        with self._lock:
            self._pipelines.pop(model_name, None)
            if problem is None:
                self._problems.pop(model_name, None)
            else:
                self._problems[model_name] = problem

    def note_problem(self, model_name: str, problem: str) -> None:
        """Why `model_name` is not served, for jobs that name it while no version serves."""
        with self._lock:
            if model_name not in self._pipelines:
                self._problems[model_name] = problem

    def serves(self, model_name: str) -> bool:
        with self._lock:
            return model_name in self._pipelines

    def _not_served(self, model_name: str) -> ModelError:
        problem = self._problems.get(model_name)
        if problem is not None:
            return ModelError(problem)
        entry = self.repository.entry(model_name)  # raises for an unknown model
        if not entry.has_model:
            return no_model_file(entry)
        return ModelError(
            f"model '{model_name}' version {entry.version} is not loaded yet: it is served once its files "
            "stop changing"
        )

    def model_name(self, params: ModelParams) -> str:
        return params.text("Model", self.settings.default_model)

    def run(
        self, job: Job, *, model: Callable[[], str] | None = None, record_files: FilesRecorder | None = None
    ) -> PipelineOutcome:
        """Run a job from the service: paths must lie inside the file roots.

        `model` names the model to run (default: ModelParams `Model`, else the default model); a
        `PipelineError` it raises fails the job like any other. `record_files` is told of output
        files before they get their names. Only exceptions that are not `PipelineError` escape.
        """
        job_log = JobLog(log, job.job_id, job.task_id)
        job_log.info("received from gateway %s", shown(job.gateway_ip) if job.gateway_ip else "(not given)")
        roots = self.settings.file_roots
        return self._run(
            lambda: open_input_file(job.input_file, roots),
            lambda: open_output_folder(job.output_dir_name, roots),
            model or (lambda: self.model_name(job.params)),
            job.params,
            job_log,
            record_files,
        )

    def run_local(self, input_file: Path, output_folder: Path, params: ModelParams) -> PipelineOutcome:
        """Run a pipeline on a local file with no file-root rule, for pipeline authors' CLI."""
        job_log = JobLog(log, "local", input_file.name)
        return self._run(
            lambda: open_input_file(input_file, None),
            lambda: open_output_folder(output_folder, None),
            lambda: self.model_name(params),
            params,
            job_log,
        )

    def _run(
        self,
        open_input: Callable[[], InputFile],
        open_output: Callable[[], OutputFolder],
        model: Callable[[], str],
        params: ModelParams,
        job_log: logging.LoggerAdapter,  # type: ignore[type-arg]
        record_files: FilesRecorder | None = None,
    ) -> PipelineOutcome:
        try:
            model_name = model()  # first: the task look-up may defer the job before any file is opened
            with self._task(open_input, open_output, params, job_log, record_files) as task:
                job_log.info("running model %s on %s", shown(model_name), shown(task.input_file.path))
                with ACTIVE_JOBS.job():
                    outcome = self.pipeline(model_name).run(task)
        except PipelineError as exc:
            job_log.warning("pipeline failed: %s", shown(exc, 1000))
            return PipelineOutcome.failed(str(exc))
        except JobDeferred:
            raise
        except Exception:
            job_log.exception("pipeline crashed")
            return PipelineOutcome.failed("internal error in the pipeline service; see its log")
        job_log.info("pipeline complete: %s", shown(outcome.results, 1000))
        return outcome

    def _task(
        self,
        open_input: Callable[[], InputFile],
        open_output: Callable[[], OutputFolder],
        params: ModelParams,
        job_log: logging.LoggerAdapter,  # type: ignore[type-arg]
        record_files: FilesRecorder | None,
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
            record_files=record_files,
        )
