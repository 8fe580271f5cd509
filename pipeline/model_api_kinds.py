"""What each openvino-model-api model family means for AiCSD: parameters, Results, QC flags, picture.

A family is picked from the library's wrapper class for the model's `model_type` (and, for
classification, its `multilabel`/`hierarchical` flags). Each family declares its ModelParams
schema, the library configuration it needs so that per-job parameters can be applied after the
library's own post-processing (thresholds are set to a floor in the library and the job's value
filters afterwards), and turns a library result into compact JSON for `Results`, QC flags and,
where there is something to show, a `Drawing`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from model_api.models import (
    AnomalyDetection,
    ClassificationModel,
    DetectionModel,
    InstanceSegmentationModel,
    KeypointDetectionModel,
    Model,
    SegmentationModel,
)
from model_api.models.result import (
    AnomalyResult,
    ClassificationResult,
    DetectedKeypoints,
    DetectionResult,
    ImageResultWithSoftPrediction,
    InstanceSegmentationResult,
)

from .annotate import Box, Drawing, Point
from .parameters import Param, ParameterSchema

__all__ = [
    "ANOMALOUS",
    "FAMILIES",
    "LOW_CONFIDENCE",
    "NO_LABELS",
    "NO_OBJECTS",
    "Family",
    "Summary",
    "family_for",
    "results_json",
]

LOW_CONFIDENCE, NO_LABELS, NO_OBJECTS, ANOMALOUS = "LowConfidence", "NoLabels", "NoObjects", "Anomalous"
THRESHOLD_FLOOR = 0.05
"""The lowest ConfidenceThreshold a job may ask for (or the model's own, if lower): the library
filters at this floor and each job's threshold filters what it returned."""


@dataclass
class Summary:
    """One job's findings: Results as a dict (first key the count, where there are objects),
    QC flags, and what to draw (None: no picture)."""

    results: dict[str, Any]
    flags: list[str] = field(default_factory=list)
    drawing: Drawing | None = None


def results_json(results: Mapping[str, Any]) -> str:
    return json.dumps(results, separators=(",", ":"), ensure_ascii=False)


def _own(wrapper_class: type[Model], entries: Mapping[str, str], name: str) -> Any:
    """The model's own value of a library parameter: its model_info entry, else the library default."""
    param = wrapper_class.parameters()[name]
    if name in entries:
        return param.from_str(entries[name])
    return param.default_value


def _label(labels: Sequence[str], index: int) -> str:
    return labels[index] if 0 <= index < len(labels) else f"#{index}"


def _score(value: Any) -> float:
    return round(float(value), 4)


class Family:
    """Base of the families: a name for the README and the picture's file suffix (None: no picture)."""

    name = ""
    picture_suffix: str | None = None

    def __init__(self, wrapper_class: type[Model], entries: Mapping[str, str]) -> None:
        self.wrapper_class = wrapper_class
        self.entries = entries

    def library_config(self) -> dict[str, Any]:
        """Configuration for `Model.create_model` (only keys the wrapper declares)."""
        return {}

    def prepare(self, wrapper: Any) -> None:
        """Adjust the created wrapper once, before it serves (it is shared by every job)."""

    def schema(self, wrapper: Any) -> ParameterSchema:
        raise NotImplementedError

    def summarise(self, result: Any, values: Mapping[str, Any], labels: Sequence[str]) -> Summary:
        raise NotImplementedError

    def _threshold_param(self, what: str) -> tuple[Param, float]:
        own = float(_own(self.wrapper_class, self.entries, "confidence_threshold"))
        floor = min(THRESHOLD_FLOOR, own)
        param = Param("ConfidenceThreshold", "number", round(own, 6), f"lowest score of {what} that is reported "
                      "(default: the model's own confidence_threshold)", minimum=floor, maximum=1.0)
        return param, floor


class MultiClass(Family):
    """One label per image: the top K labels with their probabilities (the same Results as our classifier)."""

    name = "classification (multi-class)"

    def prepare(self, wrapper: Any) -> None:
        wrapper.set_param("topk", self._classes(wrapper))  # every label; each job keeps its TopK

    @staticmethod
    def _classes(wrapper: Any) -> int:
        return int(wrapper.outputs[wrapper.out_layer_names[0]].shape[1])

    def schema(self, wrapper: Any) -> ParameterSchema:
        classes = self._classes(wrapper)
        return ParameterSchema(
            Param("TopK", "integer", min(5, classes), "how many labels to return", minimum=1, maximum=classes),
            Param("MinConfidence", "number", 0.2, f"QCFlags {LOW_CONFIDENCE} when the top score is below it",
                  minimum=0.0, maximum=1.0),
        )

    def summarise(self, result: ClassificationResult, values: Mapping[str, Any], labels: Sequence[str]) -> Summary:
        top = sorted(result.top_labels or [], key=lambda lab: -float(lab.confidence))[: values["TopK"]]
        body = [
            {"label": lab.name or _label(labels, int(lab.id)), "index": int(lab.id), "score": _score(lab.confidence)}
            for lab in top
        ]
        flags = [LOW_CONFIDENCE] if not top or float(top[0].confidence) < values["MinConfidence"] else []
        return Summary({"model": "", "top": body}, flags)


class MultiLabel(Family):
    """Any number of labels per image: every label whose score reaches the threshold."""

    name = "classification (multi-label)"

    def library_config(self) -> dict[str, Any]:
        return {"confidence_threshold": self._threshold_param("a label")[1]}

    def schema(self, wrapper: Any) -> ParameterSchema:
        return ParameterSchema(self._threshold_param("a label")[0])

    def summarise(self, result: ClassificationResult, values: Mapping[str, Any], labels: Sequence[str]) -> Summary:
        kept = [lab for lab in result.top_labels or [] if float(lab.confidence) >= values["ConfidenceThreshold"]]
        kept.sort(key=lambda lab: -float(lab.confidence))
        body = [
            {"Label": lab.name or _label(labels, int(lab.id)), "Index": int(lab.id), "Score": _score(lab.confidence)}
            for lab in kept
        ]
        return Summary({"Count": len(body), "Labels": body}, [] if body else [NO_LABELS])


class Hierarchical(Family):
    """A label per level of a label tree, as the library resolves it."""

    name = "classification (hierarchical)"

    def schema(self, wrapper: Any) -> ParameterSchema:
        return ParameterSchema(
            Param("MinConfidence", "number", 0.2, f"QCFlags {LOW_CONFIDENCE} when a returned label's score is below it",
                  minimum=0.0, maximum=1.0),
        )

    def summarise(self, result: ClassificationResult, values: Mapping[str, Any], labels: Sequence[str]) -> Summary:
        found = list(result.top_labels or [])
        body = [{"Label": lab.name, "Index": int(lab.id), "Score": _score(lab.confidence)} for lab in found]
        low = not found or min(float(lab.confidence) for lab in found) < values["MinConfidence"]
        return Summary({"Labels": body}, [LOW_CONFIDENCE] if low else [])


class Detection(Family):
    """Objects with boxes (and, for instance segmentation, masks): count, then the objects, best first."""

    name = "detection"
    picture_suffix = "detected"

    def library_config(self) -> dict[str, Any]:
        if "confidence_threshold" not in self.wrapper_class.parameters():
            return {}
        return {"confidence_threshold": self._threshold_param("an object")[1]}

    def schema(self, wrapper: Any) -> ParameterSchema:
        params = [Param("MaxObjects", "integer", 100, "how many objects Results lists, best first (Count counts all)",
                        minimum=1, maximum=10_000)]
        if "confidence_threshold" in self.wrapper_class.parameters():
            params.insert(0, self._threshold_param("an object")[0])
        return ParameterSchema(*params)

    def summarise(self, result: DetectionResult, values: Mapping[str, Any], labels: Sequence[str]) -> Summary:
        threshold = values.get("ConfidenceThreshold", 0.0)
        scores = np.asarray(result.scores, np.float64).reshape(-1)
        order = [int(i) for i in np.argsort(-scores, kind="stable") if scores[i] >= threshold]
        masks = result.masks if isinstance(result, InstanceSegmentationResult) else None
        names = list(result.label_names or [])
        objects, boxes = [], []
        for i in order:
            x1, y1, x2, y2 = (int(v) for v in np.asarray(result.bboxes[i]).reshape(-1)[:4])
            index = int(result.labels[i])
            label = names[i] if i < len(names) and names[i] not in ("", "#") else _label(labels, index)
            entry: dict[str, Any] = {"Label": label, "Score": _score(scores[i]), "Box": [x1, y1, x2, y2]}
            if masks is not None and len(masks) > i:
                entry["Area"] = int((np.asarray(masks[i]) > 0.5).sum())
            objects.append(entry)
            boxes.append(Box(x1, y1, x2, y2, index, f"{label} {scores[i]:.2f}"))
        class_map = None
        if masks is not None and len(order):
            class_map = _instance_class_map(masks, order, [int(result.labels[i]) for i in order])
        results = {"Count": len(objects), "Objects": objects[: values["MaxObjects"]]}
        return Summary(results, [] if objects else [NO_OBJECTS], Drawing(class_map=class_map, boxes=boxes))


def _instance_class_map(masks: np.ndarray, order: Sequence[int], label_indices: Sequence[int]) -> np.ndarray | None:
    first = np.asarray(masks[order[0]])
    if first.ndim != 2:
        return None
    class_map = np.zeros(first.shape, np.int32)
    for i, index in reversed(list(zip(order, label_indices, strict=False))):  # the best object is painted last, on top
        mask = np.asarray(masks[i])
        if mask.shape == class_map.shape:
            class_map[mask > 0.5] = index + 1
    return class_map


class Segmentation(Family):
    """A class per pixel: per-class areas and connected regions; class 0 is the background."""

    name = "semantic segmentation"
    picture_suffix = "segmented"

    def schema(self, wrapper: Any) -> ParameterSchema:
        return ParameterSchema(
            Param("MinArea", "integer", 1, "smallest region, in pixels, that counts as an object",
                  minimum=1, maximum=1_000_000_000),
        )

    def summarise(
        self, result: ImageResultWithSoftPrediction, values: Mapping[str, Any], labels: Sequence[str]
    ) -> Summary:
        class_map = np.asarray(result.resultImage).astype(np.int32)
        total = class_map.size
        counts = np.bincount(class_map.reshape(-1))
        classes, regions_total = [], 0
        classes_n = int(result.soft_prediction.shape[2]) if np.ndim(result.soft_prediction) == 3 else len(counts)
        for index in range(1, len(counts)):
            if counts[index] == 0:
                continue
            regions = _regions(class_map == index, values["MinArea"])
            regions_total += regions
            classes.append({"Label": _segment_label(labels, index, classes_n), "Index": index,
                            "Pixels": int(counts[index]), "Fraction": round(float(counts[index]) / total, 4),
                            "Regions": regions})
        flags = [] if regions_total else [NO_OBJECTS]
        return Summary({"Count": regions_total, "Classes": classes}, flags, Drawing(class_map=class_map))


def _segment_label(labels: Sequence[str], index: int, classes: int) -> str:
    """Labels listing every class start at class 0 (background); labels of the foreground only start at 1."""
    if len(labels) >= classes:
        return _label(labels, index)
    return _label(labels, index - 1)


def _regions(mask: np.ndarray, min_area: int) -> int:
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return int((stats[1:count, cv2.CC_STAT_AREA] >= min_area).sum())


class Anomaly(Family):
    """Normal or anomalous: the anomaly score (0..1, the model's threshold at 0.5) and the anomalous area."""

    name = "anomaly"
    picture_suffix = "anomaly"

    def schema(self, wrapper: Any) -> ParameterSchema:
        return ParameterSchema(
            Param("AnomalyThreshold", "number", 0.5, f"QCFlags {ANOMALOUS} when the anomaly score exceeds it "
                  "(0.5 is the model's own image threshold)", minimum=0.0, maximum=1.0),
        )

    def summarise(self, result: AnomalyResult, values: Mapping[str, Any], labels: Sequence[str]) -> Summary:
        normal = labels[0] if labels else "Normal"
        score = float(result.pred_score or 0.0)
        anomaly_score = 1.0 - score if result.pred_label == normal else score
        mask = np.asarray(result.pred_mask) if result.pred_mask is not None else np.zeros((1, 1), np.uint8)
        area = round(float((mask > 0).mean()), 4)
        flags = [ANOMALOUS] if anomaly_score > values["AnomalyThreshold"] else []
        body = {"Label": str(result.pred_label), "Score": _score(anomaly_score), "AnomalousArea": area}
        return Summary(body, flags, Drawing(class_map=(mask > 0).astype(np.int32)))


class Keypoints(Family):
    """Keypoints of one object: how many reach MinScore, then each with its position and score."""

    name = "keypoints"
    picture_suffix = "keypoints"

    def schema(self, wrapper: Any) -> ParameterSchema:
        return ParameterSchema(
            Param("MinScore", "number", 0.0, "lowest keypoint score that is reported (a keypoint not found "
                  "scores 0 and is never reported)", minimum=0.0, maximum=1.0),
        )

    def summarise(self, result: DetectedKeypoints, values: Mapping[str, Any], labels: Sequence[str]) -> Summary:
        points = np.asarray(result.keypoints, np.float64).reshape(-1, 2)
        scores = np.asarray(result.scores, np.float64).reshape(-1)
        body, drawn = [], []
        for i, ((x, y), score) in enumerate(zip(points, scores, strict=False)):
            if score > 0 and score >= values["MinScore"]:  # the library scores a keypoint it did not find 0
                body.append({"Label": _label(labels, i), "X": round(float(x), 1), "Y": round(float(y), 1),
                             "Score": _score(score)})
                drawn.append(Point(float(x), float(y), i))
        return Summary({"Count": len(body), "Keypoints": body}, [] if body else [NO_OBJECTS], Drawing(points=drawn))


FAMILIES: tuple[tuple[type, type[Family]], ...] = (
    (ClassificationModel, MultiClass),
    (InstanceSegmentationModel, Detection),
    (DetectionModel, Detection),
    (SegmentationModel, Segmentation),
    (AnomalyDetection, Anomaly),
    (KeypointDetectionModel, Keypoints),
)
"""Library wrapper base class -> our family. Wrappers outside these (action classification on
video clips, SAM's prompt-driven models) are not served: an AiCSD job is one image."""


def family_for(wrapper_class: type[Model], entries: Mapping[str, str]) -> Family | None:
    """The family serving `wrapper_class`, or None when none does."""
    if issubclass(wrapper_class, ClassificationModel):
        hierarchical = _own(wrapper_class, entries, "hierarchical")
        multilabel = _own(wrapper_class, entries, "multilabel")
        chosen: type[Family] = Hierarchical if hierarchical else MultiLabel if multilabel else MultiClass
        return chosen(wrapper_class, entries)
    if wrapper_class.__model__.startswith("sam_"):
        return None
    for base, family in FAMILIES:
        if issubclass(wrapper_class, base):
            return family(wrapper_class, entries)
    return None
