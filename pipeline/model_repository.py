"""The model repository: OVMS-layout model directories, each read and compiled once per process.

Layout: `<models_dir>/<name>/<version>/` with an OpenVINO IR (`.xml` + `.bin`) or an `.onnx`
file. The highest numbered version that holds a model is served (OVMS's default policy); a
model directory whose versions are all empty is a pipeline with no model. Several folders may
be given (the bento's own `models/` and AiCSD's): a name found in more than one is served
from the first folder that has it. A model describes itself through `rt_info` `model_info`
entries, as OpenVINO Model API and Intel Geti exports do; a `model_info.json` sidecar (in the
version or the model directory) gives defaults for models without them.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
from openvino.preprocess import ColorFormat, PrePostProcessor

from aicsd.errors import ModelError

__all__ = ["CompiledModel", "ModelEntry", "ModelInfo", "ModelRepository", "ModelUnreadable", "no_model_file"]

log = logging.getLogger(__name__)

_SIDECAR = "model_info.json"


@dataclass(frozen=True)
class ModelInfo:
    """What a model says about itself: type, labels and how its input is normalised."""

    model_type: str = ""
    labels: tuple[str, ...] = ()
    mean_values: tuple[float, ...] = ()
    scale_values: tuple[float, ...] = ()
    reverse_input_channels: bool = False
    resize_type: str = "standard"
    crop_fraction: float = 1.0
    output_is_probabilities: bool | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_entries(cls, entries: Mapping[str, str], where: str) -> ModelInfo:
        """Parse Model API style string entries; a malformed entry is a `ModelError`."""
        try:
            labels: tuple[str, ...]
            if entries.get("label_names"):
                labels = tuple(str(x) for x in json.loads(entries["label_names"]))
            else:
                labels = tuple(entries.get("labels", "").split())
            probs = entries.get("output_is_probabilities")
            known = {
                "model_type", "labels", "label_names", "mean_values", "scale_values",
                "reverse_input_channels", "resize_type", "crop_fraction", "output_is_probabilities",
            }
            info = cls(
                model_type=entries.get("model_type", "").strip(),
                labels=labels,
                mean_values=_floats(entries.get("mean_values", "")),
                scale_values=_floats(entries.get("scale_values", "")),
                reverse_input_channels=_bool(entries.get("reverse_input_channels", "false")),
                resize_type=entries.get("resize_type", "standard").strip() or "standard",
                crop_fraction=float(entries.get("crop_fraction", "1") or 1),
                output_is_probabilities=None if probs is None else _bool(probs),
                extra={k: v for k, v in entries.items() if k not in known},
            )
        except (ValueError, TypeError) as exc:
            raise ModelError(f"model_info of {where} is malformed: {exc}") from None
        if not 0 < info.crop_fraction <= 1:
            raise ModelError(f"model_info of {where}: crop_fraction must be in (0, 1]")
        if info.resize_type not in ("standard", "crop"):
            raise ModelError(f"model_info of {where}: resize_type must be 'standard' or 'crop'")
        return info


def _floats(raw: str) -> tuple[float, ...]:
    return tuple(float(x) for x in raw.replace(",", " ").split())


def _bool(raw: str) -> bool:
    value = str(raw).strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no", ""):
        return False
    raise ValueError(f"{raw!r} is not a boolean")


class ModelUnreadable(ModelError):
    """The model's files do not read as a model (yet): possibly still being copied in."""


FileStamp = tuple[str, int, int]
"""(path inside the model directory, size in bytes, modification time in ns) of one file."""


@dataclass(frozen=True)
class ModelEntry:
    """A model directory found on disk: its served version, model file, and its files' stamp.

    Two entries compare equal only when the same version's files have the same sizes and
    modification times, so an entry seen unchanged on two looks is one nobody is writing.
    """

    name: str
    directory: Path
    version: int | None
    model_file: Path | None
    stamp: tuple[FileStamp, ...] = ()

    @property
    def has_model(self) -> bool:
        return self.model_file is not None


class ActiveJobs:
    """How many jobs this process is running through pipelines right now (`PipelineRunner` counts
    them), so that a model can tell a job that runs alone from one among others."""

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return self._count

    @contextmanager
    def job(self) -> Iterator[None]:
        with self._lock:
            self._count += 1
        try:
            yield
        finally:
            with self._lock:
                self._count -= 1


ACTIVE_JOBS = ActiveJobs()


class CompiledModel:
    """A model compiled once, with a pool of infer requests for concurrent callers.

    With `alone`, a second compilation of the same model for latency (one stream over all cores),
    a call made while no other job is running (`ACTIVE_JOBS`) nor any other call of this model
    uses it: a job that runs alone finishes in about half the time. Among other jobs, even ones
    still decoding their image, calls share the throughput streams, which cost less CPU each.
    """

    def __init__(
        self, entry: ModelEntry, info: ModelInfo, compiled: ov.CompiledModel, alone: ov.CompiledModel | None = None
    ) -> None:
        self.entry = entry
        self.info = info
        self.compiled = compiled
        shape = compiled.input(0).get_partial_shape()
        self.input_shape = shape
        self.output_names = [out.get_any_name() for out in compiled.outputs]
        nreq = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._pool: queue.Queue[ov.InferRequest] = queue.Queue()
        for _ in range(nreq):
            self._pool.put(compiled.create_infer_request())
        self.pool_size = nreq
        self._alone = alone.create_infer_request() if alone is not None else None
        inputs = compiled.inputs
        self._input_dtype = inputs[0].get_element_type().to_dtype() if len(inputs) == 1 else None
        self._running = 0
        self._running_lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(width, height) the model takes, for NHWC inputs with static spatial dimensions."""
        shape = self.input_shape
        if shape.rank.is_static and shape.rank.get_length() == 4 and shape[1].is_static and shape[2].is_static:
            return (shape[2].get_length(), shape[1].get_length())
        return None

    @property
    def latency_when_alone(self) -> bool:
        """Whether a call running alone uses the latency compilation."""
        return self._alone is not None

    def warm_up(self, inputs: np.ndarray | Mapping[Any, np.ndarray | np.generic]) -> None:
        """One inference on each compilation, so the first real job pays no first-run cost."""
        self._infer(inputs, may_run_alone=False)
        self._infer(inputs, may_run_alone=True)

    def infer(self, inputs: np.ndarray | Mapping[Any, np.ndarray | np.generic]) -> dict[str, np.ndarray]:
        """Run one inference; outputs are copied out before it returns."""
        return self._infer(inputs, may_run_alone=True)

    def _infer(
        self, inputs: np.ndarray | Mapping[Any, np.ndarray | np.generic], *, may_run_alone: bool
    ) -> dict[str, np.ndarray]:
        with self._running_lock:
            alone = may_run_alone and self._running == 0 and self._alone is not None and ACTIVE_JOBS.count <= 1
            self._running += 1
        try:
            if alone:
                assert self._alone is not None
                return self._run(self._alone, inputs)
            request = self._pool.get()
            try:
                return self._run(request, inputs)
            finally:
                self._pool.put(request)
        finally:
            with self._running_lock:
                self._running -= 1

    def _takes_as_is(self, array: np.ndarray) -> bool:
        """Whether `array` can be the model's one input without conversion or copy."""
        return self._input_dtype is not None and array.dtype == self._input_dtype and array.flags.c_contiguous

    def _run(
        self, request: ov.InferRequest, inputs: np.ndarray | Mapping[Any, np.ndarray | np.generic]
    ) -> dict[str, np.ndarray]:
        try:
            if isinstance(inputs, np.ndarray) and self._takes_as_is(inputs):
                # The one input, wrapping the caller's array (which outlives the call), set directly:
                # OpenVINO's input dispatch and result dictionary cost 0.28 ms of interpreter time
                # per call against 0.18 this way (EfficientNet-Lite0, 2 streams; issue 10).
                request.set_input_tensor(ov.Tensor(inputs, shared_memory=True))
                request.start_async()
                request.wait()
            else:
                # Shared, not copied, both ways: the caller's array outlives the call, and the
                # outputs are copied out below; about 0.1 ms of interpreter time less per call.
                request.infer(inputs if isinstance(inputs, Mapping) else {0: inputs}, share_inputs=True,
                              share_outputs=True)
            return {
                name: request.get_output_tensor(i).data.copy() for i, name in enumerate(self.output_names)
            }
        except RuntimeError as exc:
            raise ModelError(f"model '{self.name}' failed to run: {exc}") from None


class ModelRepository:
    """Discovers models under one or more folders and compiles a model version on request."""

    def __init__(
        self,
        models_dirs: Path | Sequence[Path],
        *,
        device: str = "CPU",
        performance_hint: str = "THROUGHPUT",
        cache_dir: Path | None = None,
        latency_when_alone: bool = False,
    ) -> None:
        self.models_dirs: tuple[Path, ...] = (models_dirs,) if isinstance(models_dirs, Path) else tuple(models_dirs)
        self.device = device
        self.performance_hint = performance_hint
        self.latency_when_alone = latency_when_alone
        self.core = ov.Core()
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            self.core.set_property({"CACHE_DIR": str(cache_dir)})
        self._compiled: dict[str, CompiledModel] = {}
        self._lock = threading.Lock()
        self._shadowed: set[tuple[str, Path]] = set()

    def discover(self) -> list[ModelEntry]:
        """Every model directory, sorted by name; directories without a numbered version are skipped.

        A name in several folders is taken from the first; the others are logged once.
        """
        found: dict[str, ModelEntry] = {}
        for folder in self.models_dirs:
            for directory in _model_dirs(folder):
                entry = _entry(directory)
                if entry is None:
                    continue
                if entry.name in found:
                    self._log_shadowed(entry.name, found[entry.name].directory, directory)
                    continue
                found[entry.name] = entry
        return [found[name] for name in sorted(found)]

    def entry(self, name: str) -> ModelEntry:
        """The entry for one model name, or a `ModelError` that lists what is available."""
        if name and "/" not in name and name not in (".", ".."):
            for folder in self.models_dirs:
                directory = folder / name
                entry = _entry(directory) if directory.is_dir() else None
                if entry is not None:
                    return entry
        known = ", ".join(e.name for e in self.discover()) or "none"
        raise ModelError(f"unknown model '{name}' (available: {known})")

    def _log_shadowed(self, name: str, served: Path, shadowed: Path) -> None:
        if (name, shadowed) not in self._shadowed:
            self._shadowed.add((name, shadowed))
            log.warning("model %s is in %s and in %s: the first is served", name, served, shadowed)

    def get(self, name: str) -> CompiledModel:
        """The compiled model for `name`, compiled the first time and again when its files change."""
        with self._lock:
            entry = self.entry(name)
            compiled = self._compiled.get(name)
            if compiled is None or compiled.entry != entry:
                compiled = self.compile(entry)
                self._compiled[name] = compiled
            return compiled

    def describe(self, name: str) -> tuple[ModelEntry, dict[str, str]]:
        """The served entry of `name` and its model_info entries, read without compiling."""
        entry = self.entry(name)
        return entry, self.model_info(entry)

    def model_info(self, entry: ModelEntry) -> dict[str, str]:
        """One version's model_info entries (sidecar overlaid by rt_info), read without compiling:
        what decides which pipeline kind serves the model. `ModelUnreadable` when its files do
        not read (yet)."""
        if entry.model_file is None:
            raise no_model_file(entry)
        try:
            model = self.core.read_model(entry.model_file)
        except RuntimeError as exc:
            raise ModelUnreadable(f"model '{entry.name}' cannot be read from {entry.model_file}: {exc}") from None
        return _info_entries(model, entry)

    def compile(self, entry: ModelEntry) -> CompiledModel:
        """Read and compile one model version; `ModelUnreadable` when its files do not read."""
        if entry.model_file is None:
            raise no_model_file(entry)
        try:
            model = self.core.read_model(entry.model_file)
        except RuntimeError as exc:
            raise ModelUnreadable(f"model '{entry.name}' cannot be read from {entry.model_file}: {exc}") from None
        info = ModelInfo.from_entries(_info_entries(model, entry), f"model '{entry.name}'")
        model = _fold_preprocessing(model, info, entry.name)
        # A model may ask for its own precision or hint (the counter needs f32: bf16 would
        # blur the small differences of Gaussians it works on).
        config = {"PERFORMANCE_HINT": info.extra.get("performance_hint", self.performance_hint)}
        if "inference_precision" in info.extra:
            config["INFERENCE_PRECISION_HINT"] = info.extra["inference_precision"]
        try:
            compiled = self.core.compile_model(model, self.device, config)
            alone = None
            if self.latency_when_alone and config["PERFORMANCE_HINT"] == "THROUGHPUT":
                alone = self.core.compile_model(model, self.device, {**config, "PERFORMANCE_HINT": "LATENCY"})
        except RuntimeError as exc:
            raise ModelError(f"model '{entry.name}' cannot be compiled for {self.device}: {exc}") from None
        result = CompiledModel(entry, info, compiled, alone)
        log.info(
            "compiled model %s version %s (%s) on %s with %d infer requests%s",
            entry.name, entry.version, info.model_type or "no model_type", self.device, result.pool_size,
            ", and for latency when a job runs alone" if alone is not None else "",
        )
        return result


def no_model_file(entry: ModelEntry) -> ModelError:
    """What a job naming a model directory with no model file is told."""
    return ModelError(
        f"model '{entry.name}' has no model file in {entry.directory}/{entry.version} "
        "(an .xml+.bin IR or an .onnx file)"
    )


def _model_dirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:  # missing or unreadable folder: no models from it
        return []


def _entry(directory: Path) -> ModelEntry | None:
    try:
        versions = sorted((int(p.name), p) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())
    except OSError:  # removed while we looked
        return None
    if not versions:
        return None
    for number, path in reversed(versions):
        model_file = _model_file(path)
        if model_file is not None:
            return ModelEntry(directory.name, directory, number, model_file, _stamp(directory, path))
    return ModelEntry(directory.name, directory, versions[-1][0], None)


def _stamp(directory: Path, version_dir: Path) -> tuple[FileStamp, ...]:
    """Size and mtime of every file of a version, and of the model directory's sidecar."""
    stamps = []
    candidates = [directory / _SIDECAR, *sorted(version_dir.rglob("*"))]
    for path in candidates:
        try:
            st = path.stat()
        except OSError:
            continue
        if path.is_file():
            stamps.append((path.relative_to(directory).as_posix(), st.st_size, st.st_mtime_ns))
    return tuple(stamps)


def _model_file(version_dir: Path) -> Path | None:
    for pattern in ("*.xml", "*.onnx"):
        for candidate in sorted(version_dir.glob(pattern)):
            if pattern == "*.onnx" or candidate.with_suffix(".bin").is_file():
                return candidate
    return None


def _info_entries(model: ov.Model, entry: ModelEntry) -> dict[str, str]:
    """Sidecar defaults overlaid by the model's own rt_info `model_info`."""
    entries: dict[str, str] = {}
    assert entry.model_file is not None
    for sidecar in (entry.directory / _SIDECAR, entry.model_file.parent / _SIDECAR):
        if sidecar.is_file():
            try:
                data = json.loads(sidecar.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ModelError(f"{sidecar} is not valid JSON: {exc}") from None
            if not isinstance(data, dict):
                raise ModelError(f"{sidecar} must hold a JSON object")
            for key, value in data.items():
                entries.update(_sidecar_entry(str(key), value))
    if model.has_rt_info(["model_info"]):
        own = {str(k): v.astype(str) for k, v in model.get_rt_info(["model_info"]).astype(dict).items()}
        if "labels" in own and "label_names" not in own:
            entries.pop("label_names", None)
        entries.update(own)
    return entries


def _sidecar_entry(key: str, value: Any) -> dict[str, str]:
    """A JSON sidecar value in the string form rt_info uses; a label list keeps its spaces."""
    if key == "labels" and isinstance(value, list):
        return {"label_names": json.dumps([str(v) for v in value])}
    if isinstance(value, list):
        return {key: " ".join(str(v) for v in value)}
    if isinstance(value, bool):
        return {key: str(value)}
    return {key: value if isinstance(value, str) else json.dumps(value)}


def _fold_preprocessing(model: ov.Model, info: ModelInfo, name: str) -> ov.Model:
    """For an image model, take u8 NHWC RGB and fold colour order, mean and scale into the graph."""
    if len(model.inputs) != 1:
        return model
    shape = model.input(0).get_partial_shape()
    image_like = shape.rank.is_static and shape.rank.get_length() == 4 and shape[1].is_static
    if not (image_like and shape[1].get_length() == 3):
        return model
    ppp = PrePostProcessor(model)
    tensor = ppp.input().tensor()
    tensor.set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC")).set_color_format(ColorFormat.RGB)
    ppp.input().model().set_layout(ov.Layout("NCHW"))
    steps = ppp.input().preprocess()
    steps.convert_element_type(ov.Type.f32)
    if info.reverse_input_channels:
        steps.convert_color(ColorFormat.BGR)
    if info.mean_values:
        steps.mean(list(info.mean_values))
    if info.scale_values:
        steps.scale(list(info.scale_values))
    try:
        return ppp.build()
    except RuntimeError as exc:
        raise ModelError(f"model '{name}': cannot fold preprocessing into the graph: {exc}") from None
