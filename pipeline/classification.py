"""Image classification: top-k labels with probabilities from an OpenVINO classifier."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from aicsd.errors import ModelError
from aicsd.job import ModelParams
from aicsd.outcome import PipelineOutcome

from .base import PipelineTask
from .images import load_rgb
from .model_repository import CompiledModel
from .parameters import Param, ParameterSchema

__all__ = ["Classification", "ClassificationParams", "ClassificationPipeline", "Prediction", "to_probabilities"]

LOW_CONFIDENCE = "LowConfidence"


@dataclass(frozen=True)
class ClassificationParams:
    """ModelParams the classifier understands: `TopK` (default 5) and `MinConfidence` (default 0.2)."""

    top_k: int
    min_confidence: float

    @staticmethod
    def schema(num_classes: int) -> ParameterSchema:
        return ParameterSchema(
            Param("TopK", "integer", min(5, num_classes), "how many labels to return", minimum=1, maximum=num_classes),
            Param("MinConfidence", "number", 0.2, f"QCFlags {LOW_CONFIDENCE} when the top score is below it",
                  minimum=0.0, maximum=1.0),
        )

    @classmethod
    def from_params(cls, params: ModelParams, num_classes: int) -> ClassificationParams:
        values = cls.schema(num_classes).parse(params)
        return cls(top_k=values["TopK"], min_confidence=values["MinConfidence"])


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    score: float


@dataclass(frozen=True)
class Classification:
    """The top predictions of one model on one image, with a stable compact JSON form."""

    model: str
    top: tuple[Prediction, ...]

    def to_results(self) -> str:
        body = {
            "model": self.model,
            "top": [{"label": p.label, "index": p.index, "score": round(p.score, 4)} for p in self.top],
        }
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def to_probabilities(scores: np.ndarray) -> np.ndarray:
    """Softmax of `scores`, unless they already are a probability distribution."""
    scores = scores.astype(np.float64).ravel()
    if scores.size and scores.min() >= 0 and abs(float(scores.sum()) - 1.0) < 1e-3:
        return scores
    shifted = np.exp(scores - scores.max())
    return shifted / shifted.sum()


class ClassificationPipeline:
    """Classifies the first page of the job's image with one compiled model."""

    model_type = "Classification"

    def __init__(self, model: CompiledModel, *, max_pixels: int) -> None:
        size = model.image_size
        if size is None:
            raise ModelError(f"model '{model.name}' does not take a fixed-size image input")
        self.model = model
        self.size = size
        self.max_pixels = max_pixels
        # Asked once: reading the output shape through OpenVINO cost about 2% of the service's
        # interpreter time when it was asked for every job.
        self.num_classes = self._num_classes()

    def classify(self, task: PipelineTask, top_k: int) -> Classification:
        """The `top_k` most probable labels for the first page of the task's image."""
        info = self.model.info
        image = load_rgb(
            task.input_file,
            size=self.size,
            resize_type=info.resize_type,
            crop_fraction=info.crop_fraction,
            max_pixels=self.max_pixels,
            memory=task.memory,
        )
        outputs = self.model.infer(image[np.newaxis])
        probabilities = to_probabilities(next(iter(outputs.values())))
        order = np.argsort(-probabilities)[:top_k]
        top = tuple(Prediction(self._label(int(i)), int(i), float(probabilities[i])) for i in order)
        return Classification(self.model.name, top)

    def run(self, task: PipelineTask) -> PipelineOutcome:
        params = ClassificationParams.from_params(task.params, self.num_classes)
        result = self.classify(task, params.top_k)
        best = result.top[0]
        task.log.info("top-1 %s (%d) %.3f", best.label, best.index, best.score)
        flags = LOW_CONFIDENCE if best.score < params.min_confidence else ""
        return PipelineOutcome.complete(result.to_results(), qc_flags=flags)

    def describe(self) -> dict[str, object]:
        """What a pipeline listing shows: the model type, the kind and its parameters."""
        return {"model_type": self.model_type, "kind": "classification (ours)",
                "parameters": ClassificationParams.schema(self.num_classes).describe()}

    def warm_up(self) -> None:
        """One inference on a blank image, so the first real job pays no first-run cost."""
        width, height = self.size
        self.model.warm_up(np.zeros((1, height, width, 3), np.uint8))

    def _num_classes(self) -> int:
        output = self.model.compiled.output(0).get_partial_shape()
        last = output[output.rank.get_length() - 1] if output.rank.is_static else None
        if last is not None and last.is_static:
            return last.get_length()
        return max(1, len(self.model.info.labels))

    def _label(self, index: int) -> str:
        labels = self.model.info.labels
        return labels[index] if index < len(labels) else str(index)
