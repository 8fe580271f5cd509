"""Models described by openvino-model-api metadata (Intel Geti and Model API exports), served by the library.

A model whose `rt_info` `model_info` (or `model_info.json` sidecar) names a `model_type` the
library knows is wrapped with `Model.create_model` on an `OpenvinoAdapter` built on the
service's own `ov.Core` (its compiled-model cache), device and performance hint. The library
folds the model's preprocessing (resize, layout, colour order, mean and scale) into the graph
and compiles it once. Inference runs on this module's own pool of infer requests: the library's
synchronous path shares one request between callers and the service runs jobs on several
threads. Pre- and post-processing are the library's (`base_preprocess`, `postprocess`); what
the findings mean for AiCSD (parameters, Results, QC flags, picture) is `model_api_kinds`.

The library's convention is followed: the image is handed over as BGR, and the model's
`reverse_input_channels` says whether the network wants it swapped to RGB.
"""

from __future__ import annotations

import json
import logging
import queue
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
from model_api.adapters.openvino_adapter import OpenvinoAdapter
from model_api.models import Model

from aicsd.errors import ModelError
from aicsd.outcome import OutputFile, PipelineOutcome

from .annotate import render, write_png
from .base import PipelineTask
from .images import read_pages, to_rgb8
from .model_api_kinds import Family, Summary, family_for, results_json
from .output_files import publish_together
from .parameters import ParameterSchema

__all__ = ["OWN_PIPELINE_KEY", "ModelApiModel", "ModelApiPipeline", "own_kind", "served_model_types"]

log = logging.getLogger(__name__)

_NOT_SERVED = {"Model", "ImageModel", "DetectionModel", "Action Classification", "sam_decoder", "sam_image_encoder"}


def served_model_types() -> list[str]:
    """The `model_type` names this module serves (the library's wrappers for single images)."""
    return sorted(name for name in Model.available_wrappers() if name not in _NOT_SERVED)


def _served(model_type: str) -> bool:
    """Whether the library wraps `model_type` (matched case-insensitively, as the library does)."""
    return model_type.casefold() in {name.casefold() for name in served_model_types()}


OWN_PIPELINE_KEY = "aicsd_pipeline"
"""model_info entry with which a model built by this project asks for one of our own pipeline kinds
(our EfficientNet-Lite0 build: `Classification`; its preprocessing keys are ours, not Model API's)."""


def own_kind(entries: Mapping[str, str]) -> str:
    """The name of our own pipeline kind a model asks for: its `aicsd_pipeline` entry, else a
    model_type the library does not know (`BlobCounting`); "" for a model the library serves."""
    kind = entries.get(OWN_PIPELINE_KEY, "").strip()
    model_type = entries.get("model_type", "").strip()
    if kind or _served(model_type):
        return kind
    return model_type


def _missing_metadata(name: str, model_file: Path) -> ModelError:
    return ModelError(
        f"model '{name}' does not say what kind of model it is: its rt_info has no model_info "
        f"model_type. Add a model_info.json beside {model_file.name} (in {model_file.parent}) such as "
        '{"model_type": "SSD", "labels": ["cell", "debris"]}, with the model_type one of: '
        + ", ".join(served_model_types())
    )


class ModelApiModel:
    """One model version wrapped by the library, compiled once, with an infer-request pool."""

    def __init__(
        self,
        name: str,
        model_file: Path,
        entries: Mapping[str, str],
        *,
        core: ov.Core,
        device: str = "CPU",
        performance_hint: str = "THROUGHPUT",
    ) -> None:
        """Read `model_file` on `core`, add `entries` (the sidecar's, for keys the model's own
        rt_info lacks), wrap it as its model_type and compile it for `device` with `performance_hint`."""
        self.name = name
        model_type = entries.get("model_type", "").strip()
        if not model_type:
            raise _missing_metadata(name, model_file)
        if not _served(model_type):
            raise ModelError(
                f"model '{name}' has model_type '{model_type}', which no pipeline serves "
                f"(known: BlobCounting, {', '.join(served_model_types())})"
            )
        if model_file.suffix == ".onnx":
            raise ModelError(
                f"model '{name}': ONNX models with Model API metadata need the onnx package, which this "
                "service does not ship; convert the model to OpenVINO IR (ovc model.onnx) and copy the .xml and .bin"
            )
        self.model_type = model_type
        wrapper_class = Model.get_model_class(model_type)
        family = family_for(wrapper_class, entries)
        if family is None:
            raise ModelError(f"model '{name}' has model_type '{model_type}', which needs more than one image a job")
        self.family: Family = family
        config = {"PERFORMANCE_HINT": entries.get("performance_hint", performance_hint)}
        if "inference_precision" in entries:
            config["INFERENCE_PRECISION_HINT"] = entries["inference_precision"]
        try:
            adapter = OpenvinoAdapter(
                core, str(model_file), model_parameters={}, device=device, plugin_config=config, max_num_requests=1
            )
            for key, value in entries.items():
                if key != "label_names" and not adapter.model.has_rt_info(["model_info", key]):
                    adapter.model.set_rt_info(value, ["model_info", key])
            configuration = dict(self.family.library_config())
            if "label_names" in entries and not adapter.model.has_rt_info(["model_info", "labels"]):
                configuration["labels"] = [str(x) for x in json.loads(entries["label_names"])]
            # preload=False: the library compiles while it folds the preprocessing in; preloading
            # would compile the model a second time.
            self.wrapper = Model.create_model(adapter, model_type=model_type, configuration=configuration,
                                              preload=False)
            if not hasattr(adapter, "compiled_model"):  # dynamic input: nothing was folded in
                self.wrapper.load()
            self.family.prepare(self.wrapper)
            self.schema: ParameterSchema = self.family.schema(self.wrapper)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"model '{name}' (model_type {model_type}) cannot be served by openvino-model-api: "
                             f"{exc}") from None
        self.adapter = adapter
        compiled: ov.CompiledModel = adapter.compiled_model
        self._output_keys = list(self.wrapper.outputs)
        size = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._pool: queue.Queue[ov.InferRequest] = queue.Queue()
        for _ in range(size):
            self._pool.put(compiled.create_infer_request())
        self.pool_size = size
        labels = self.wrapper.params.labels if "labels" in wrapper_class.parameters() else None
        self.labels: list[str] = [str(x) for x in labels or []]
        log.info("model %s (%s, %s) compiled on %s with %d infer requests",
                 name, model_type, self.family.name, device, size)

    def predict(self, bgr: np.ndarray) -> Any:
        """The library's result for one HxWx3 uint8 BGR image; safe to call from several threads."""
        try:
            inputs, meta = self.wrapper.base_preprocess(bgr)
            if self.adapter.use_python_preprocessing:
                inputs = {key: self.adapter.preprocessor(value) for key, value in inputs.items()}
            request = self._pool.get()
            try:
                request.infer(inputs)
                raw = {key: request.get_output_tensor(i).data.copy() for i, key in enumerate(self._output_keys)}
            finally:
                self._pool.put(request)
            return self.wrapper.postprocess(raw, meta)
        except Exception as exc:
            raise ModelError(f"model '{self.name}' failed to run: {exc}") from None


class ModelApiPipeline:
    """Runs one Model API model on the first page of a job's image and reports what it found."""

    def __init__(self, model: ModelApiModel, *, max_pixels: int) -> None:
        self.model = model
        self.max_pixels = max_pixels

    @property
    def schema(self) -> ParameterSchema:
        return self.model.schema

    def describe(self) -> dict[str, Any]:
        """What a pipeline listing shows: the model type, its family and its parameters."""
        return {"model_type": self.model.model_type, "kind": self.model.family.name,
                "parameters": self.schema.describe()}

    def run(self, task: PipelineTask) -> PipelineOutcome:
        values = self.schema.parse(task.params)
        page = read_pages(task.input_file, max_pixels=self.max_pixels, max_pages=task.max_pages,
                          memory=task.memory, first_only=True)[0]
        rgb = to_rgb8(page)
        result = self.model.predict(np.ascontiguousarray(rgb[:, :, ::-1]))
        summary = self.model.family.summarise(result, values, self.model.labels)
        text = self._results_text(summary)
        files = self._picture(task, rgb, summary)
        task.log.info("%s: %s", self.model.family.name, text if len(text) < 300 else text[:300] + "...")
        return PipelineOutcome.complete(text, qc_flags=",".join(summary.flags), output_files=files)

    def warm_up(self) -> None:
        """One inference on a blank image, so the first real job pays no first-run cost."""
        height, width = self.model.wrapper.h, self.model.wrapper.w
        if height <= 0 or width <= 0:
            height = width = 64
        self.model.predict(np.zeros((height, width, 3), np.uint8))

    def _results_text(self, summary: Summary) -> str:
        results = summary.results
        if "model" in results:
            results["model"] = self.model.name
        else:
            results["Model"] = self.model.name
        return results_json(results)

    def _picture(self, task: PipelineTask, rgb: np.ndarray, summary: Summary) -> tuple[OutputFile, ...]:
        suffix = self.model.family.picture_suffix
        if suffix is None or summary.drawing is None:
            return ()
        name = f"{task.input_file.stem}-{suffix}.png"
        written = publish_together(task.output_folder, [(name, write_png(render(rgb, summary.drawing)))],
                                   record=task.record_files)
        return tuple(OutputFile.in_folder(task.output_folder.dir_name, final) for final in written)
