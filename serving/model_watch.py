"""Models that come and go while the service runs, as OpenVINO Model Server polls its folders.

The model folders may include AiCSD's own `models/`, where people add models at any time. A
`ModelWatcher` looks at the folders every `PIPELINE_MODEL_POLL` seconds on a thread of its own:

- a new model, or a new version, is loaded once complete: its files' sizes and modification
  times are the same on two looks in a row, and the IR reads (a read failure means "not yet"
  and is tried again on the next look). It is compiled and warmed up on the watcher's thread,
  never on a request, then swapped in at once; jobs already running finish on the version
  they started with;
- a version that fails to load leaves the previous one serving, with one log line;
- a removed model stops being served and listed.

Each look ends by publishing a `ModelsView`: what is served, numbered by the look, which the
pipeline listing shows.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from aicsd.errors import PipelineError
from pipeline.base import Pipeline
from pipeline.model_repository import ModelEntry, ModelRepository, ModelUnreadable, no_model_file

from .runner import PipelineRunner

__all__ = ["ModelState", "ModelWatcher", "ModelsView"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelState:
    """One model directory as the service sees it after a look."""

    name: str
    version: int | None
    """The version served, or, when none is, the version found."""
    serving: bool
    note: str = ""
    """What else is true: 'no model', 'loading', or why the version found cannot be loaded."""
    parameters: str = ""
    """The served pipeline's ModelParams, as a person types them in AiCSD's task form."""

    @property
    def description(self) -> str:
        if not self.serving:
            if self.note == "no model":
                return f"{self.name} (no model)"
            return f"{self.name} version {self.version} ({self.note})"
        served = f"{self.name} version {self.version}"
        served = f"{served} ({self.note})" if self.note else served
        return f"{served}; parameters: {self.parameters}" if self.parameters else served


@dataclass(frozen=True)
class ModelsView:
    """The models after look number `poll` (0: the look at start-up)."""

    poll: int
    models: tuple[ModelState, ...]


class ModelWatcher:
    """Keeps the runner's pipelines in step with the model folders."""

    def __init__(self, repository: ModelRepository, runner: PipelineRunner, interval: float) -> None:
        self.repository = repository
        self.runner = runner
        self.interval = interval
        self._seen: dict[str, ModelEntry] = {}  # what the previous look found
        self._loaded: dict[str, ModelEntry] = {}  # what each served pipeline was built from
        self._failed: dict[str, tuple[ModelEntry, str]] = {}  # versions that read but do not load
        self._unreadable: dict[str, ModelEntry] = {}  # versions that do not read (yet)
        self._parameters: dict[str, str] = {}  # each served pipeline's ModelParams, for listings
        self._view = ModelsView(0, ())
        self._polls = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def view(self) -> ModelsView:
        return self._view

    def load_present(self) -> list[str]:
        """Load every model found now, without waiting for a second look: the start-up load."""
        self._look(initial=True)
        return sorted(self._loaded)

    def start(self) -> None:
        """Look again every `interval` seconds on a daemon thread, until `stop`."""
        if self.interval <= 0 or self._thread is not None:
            return
        self.runner.watched = True
        self._thread = threading.Thread(target=self._run, name="model-watch", daemon=True)
        self._thread.start()
        log.info("watching %s for model changes every %g s",
                 ", ".join(str(d) for d in self.repository.models_dirs), self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def poll(self) -> ModelsView:
        """One look at the folders; loads, swaps and withdraws what changed."""
        self._look(initial=False)
        return self._view

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._look(initial=False)
            except Exception:  # the watcher must outlive any one bad look
                log.exception("looking for model changes failed; trying again in %g s", self.interval)

    def _look(self, *, initial: bool) -> None:
        entries = {entry.name: entry for entry in self.repository.discover()}
        for name in set(self._seen) - set(entries):
            self._remove(name)
        for name, entry in entries.items():
            previous = self._seen.get(name)
            self._seen[name] = entry
            if not entry.has_model:
                self._no_model(entry)
            elif entry != self._loaded.get(name) and (initial or entry == previous):
                self._load(entry)
        self._polls += 0 if initial else 1
        self._view = ModelsView(self._polls, tuple(self._state(entry) for entry in entries.values()))

    def _remove(self, name: str) -> None:
        self._seen.pop(name, None)
        self._failed.pop(name, None)
        self._unreadable.pop(name, None)
        if self._loaded.pop(name, None) is not None:
            log.info("model %s was removed: no longer served", name)
        self.runner.withdraw(name)

    def _no_model(self, entry: ModelEntry) -> None:
        problem = str(no_model_file(entry))
        if self._loaded.pop(entry.name, None) is not None:
            log.info("model %s no longer has a model file: no longer served", entry.name)
        self.runner.withdraw(entry.name, problem)

    def _load(self, entry: ModelEntry) -> None:
        name = entry.name
        if self._failed.get(name, (None, ""))[0] == entry:
            return  # this very version failed already; it is tried again once its files change
        served = self._loaded.get(name)
        try:
            pipeline = self.runner.build(entry)
            pipeline.warm_up()
        except ModelUnreadable as exc:
            if self._unreadable.get(name) != entry:
                self._unreadable[name] = entry
                log.info("model %s version %s does not read yet (%s); trying again on the next look",
                         name, entry.version, exc)
            self.runner.note_problem(name, str(exc))
            return
        except Exception as exc:  # any failure of one version must leave the rest serving
            problem = str(exc) if isinstance(exc, PipelineError) else f"model '{name}' failed to load: {exc!r}"
            self._failed[name] = (entry, problem)
            self._unreadable.pop(name, None)
            keeps = f"version {served.version} keeps serving" if served else "nothing served under this name"
            log.error("model %s version %s cannot be loaded: %s; %s", name, entry.version, problem, keeps,
                      exc_info=not isinstance(exc, PipelineError))
            self.runner.note_problem(name, problem)
            return
        self.runner.install(name, pipeline)
        self._parameters[name] = parameters_text(pipeline)
        self._loaded[name] = entry
        self._failed.pop(name, None)
        self._unreadable.pop(name, None)
        if served is None:
            log.info("model %s version %s loaded from %s", name, entry.version, entry.directory)
        else:
            log.info("model %s version %s loaded from %s; replaces version %s",
                     name, entry.version, entry.directory, served.version)

    def _state(self, entry: ModelEntry) -> ModelState:
        name = entry.name
        if not entry.has_model:
            return ModelState(name, entry.version, serving=False, note="no model")
        served = self._loaded.get(name)
        failed = self._failed.get(name)
        pending = f"cannot be loaded: {failed[1]}" if failed is not None and failed[0] == entry else "loading"
        if served is None:
            return ModelState(name, entry.version, serving=False, note=pending)
        parameters = self._parameters.get(name, "")
        if served == entry:
            return ModelState(name, served.version, serving=True, parameters=parameters)
        return ModelState(
            name, served.version, serving=True, note=f"version {entry.version} {pending}", parameters=parameters
        )


def parameters_text(pipeline: Pipeline) -> str:
    """A pipeline's declared ModelParams in one line: `Name=default (type, range)`, comma-separated."""
    try:
        declared = pipeline.describe().get("parameters") or []
    except Exception:  # a listing must not fail because one kind cannot describe itself
        return ""
    parts = []
    for param in declared if isinstance(declared, list) else []:
        bounds = ""
        if "choices" in param:
            bounds = ", " + "|".join(str(c) for c in param["choices"])
        elif "min" in param or "max" in param:
            bounds = f", {param.get('min', '')}..{param.get('max', '')}"
        parts.append(f"{param['name']}={param.get('default', '')} ({param.get('type', '')}{bounds})")
    return ", ".join(parts)
