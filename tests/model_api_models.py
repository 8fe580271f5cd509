"""Small real IRs described the way Intel Geti and OpenVINO Model API exports describe themselves.

Each network is built from known operations on colour channels, so the expected output on a
drawn test image is known exactly. Every network takes f32[1,3,S,S] RGB in 0..1: the model_info
says `mean_values 0 0 0`, `scale_values 255 255 255`, `reverse_input_channels True` (the library
is handed BGR and swaps it), `resize_type standard`, and the library folds that into the graph.

    colour classes    a pixel is "red" when R > 0.5 and G, B < 0.5; "green" and "blue" alike
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from .tiny_models import write_model

SIZE = 64
COLOURS = ("red", "green", "blue")

GETI_PREPROCESSING = {
    "mean_values": "0 0 0",
    "scale_values": "255 255 255",
    "reverse_input_channels": "True",
    "resize_type": "standard",
}


def _image(size: int) -> ov.Node:
    return ops.parameter([1, 3, size, size], np.float32, name="image")


def _channels(image: ov.Node) -> list[ov.Output]:
    """R, G, B as [1,1,S,S] each."""
    parts = ops.split(image, np.int64(1), 3)
    return [parts.output(i) for i in range(3)]


def _colour_masks(image: ov.Node) -> list[ov.Node]:
    """[1,1,S,S] f32 masks (1/0) of the red, green and blue pixels."""
    r, g, b = _channels(image)
    high = [ops.greater(c, np.float32(0.5)) for c in (r, g, b)]
    low = [ops.less(c, np.float32(0.5)) for c in (r, g, b)]
    masks = []
    for i in range(3):
        others = [low[j] for j in range(3) if j != i]
        both = ops.logical_and(high[i], ops.logical_and(others[0], others[1]))
        masks.append(ops.convert(both, np.float32))
    return masks


def channel_mean_logits(scale: float, offset: float, size: int = SIZE) -> ov.Model:
    """logits[c] = scale * (mean of channel c - offset): f32[1,3]."""
    image = _image(size)
    means = ops.reduce_mean(image, np.array([2, 3], np.int64), keep_dims=False)
    logits = ops.multiply(ops.subtract(means, np.float32(offset)), np.float32(scale))
    logits.output(0).get_tensor().set_names({"logits"})
    return ov.Model([logits], [image], "channel_mean_logits")


def write_multiclass(version_dir: Path) -> Path:
    """Geti-style multi-class classifier: softmax of 10 x channel means, labels red green blue."""
    info = {"model_type": "Classification", "labels": "red green blue", "label_ids": "1 2 3",
            "multilabel": "False", "hierarchical": "False", "confidence_threshold": "0.5",
            "task_type": "classification", "output_raw_scores": "True", **GETI_PREPROCESSING}
    return write_model(version_dir, channel_mean_logits(10.0, 0.0), info)


def write_multilabel(version_dir: Path) -> Path:
    """Geti-style multi-label classifier: sigmoid(20 x (channel mean - 0.5)), threshold 0.5."""
    info = {"model_type": "Classification", "labels": "red green blue", "label_ids": "1 2 3",
            "multilabel": "True", "hierarchical": "False", "confidence_threshold": "0.5",
            "task_type": "classification", **GETI_PREPROCESSING}
    return write_model(version_dir, channel_mean_logits(20.0, 0.5), info)


def _bbox_rows(mask2d: ov.Node, size: int, axis: int) -> tuple[ov.Node, ov.Node]:
    """(first, one past last) index along `axis` of the 2-D mask's non-zero lines, as f32 scalars."""
    lines = ops.reduce_max(mask2d, np.array([1 - axis], np.int64), keep_dims=False)  # [S]
    present = ops.greater(lines, np.float32(0.5))
    index = ops.constant(np.arange(size, dtype=np.float32))
    first = ops.reduce_min(ops.select(present, index, np.float32(size)), np.array([0], np.int64), keep_dims=False)
    last = ops.reduce_max(ops.select(present, ops.add(index, np.float32(1)), np.float32(0)),
                          np.array([0], np.int64), keep_dims=False)
    return first, last


def colour_box_detector(size: int = SIZE) -> ov.Model:
    """SSD single output f32[1,1,3,7]: per colour class c (0 red, 1 green, 2 blue) the row
    (0, c, score, xmin, ymin, xmax, ymax), box = bounding box of the class's pixels (normalised),
    score = class pixels / box area (1.0 for one filled rectangle; 0 when there are none)."""
    image = _image(size)
    rows = []
    for c, mask in enumerate(_colour_masks(image)):
        mask2d = ops.reshape(mask, np.array([size, size], np.int64), False)
        y0, y1 = _bbox_rows(mask2d, size, axis=0)
        x0, x1 = _bbox_rows(mask2d, size, axis=1)
        count = ops.reduce_sum(mask2d, np.array([0, 1], np.int64), keep_dims=False)
        area = ops.maximum(ops.multiply(ops.subtract(x1, x0), ops.subtract(y1, y0)), np.float32(1))
        score = ops.divide(count, area)
        values = [np.float32(0), np.float32(c), score, ops.divide(x0, np.float32(size)),
                  ops.divide(y0, np.float32(size)), ops.divide(x1, np.float32(size)), ops.divide(y1, np.float32(size))]
        scalars = [ops.reshape(ops.constant(v) if isinstance(v, np.floating) else v, np.array([1], np.int64), False)
                   for v in values]
        rows.append(ops.reshape(ops.concat(scalars, 0), np.array([1, 7], np.int64), False))
    out = ops.reshape(ops.concat(rows, 0), np.array([1, 1, 3, 7], np.int64), False)
    out.output(0).get_tensor().set_names({"detection_out"})
    return ov.Model([out], [image], "colour_box_detector")


def write_detector(version_dir: Path, confidence_threshold: float = 0.5) -> Path:
    """Model API SSD export of `colour_box_detector`."""
    info = {"model_type": "SSD", "labels": "red green blue", "confidence_threshold": str(confidence_threshold),
            "iou_threshold": "0.5", "task_type": "detection", **GETI_PREPROCESSING}
    return write_model(version_dir, colour_box_detector(), info)


def colour_segmenter(size: int = SIZE) -> ov.Model:
    """f32[1,4,S,S] class scores: background 0.5 everywhere, then the red, green and blue masks."""
    image = _image(size)
    background = ops.add(ops.multiply(_channels(image)[0], np.float32(0)), np.float32(0.5))
    out = ops.concat([background, *_colour_masks(image)], 1)
    out.output(0).get_tensor().set_names({"scores"})
    return ov.Model([out], [image], "colour_segmenter")


def write_segmenter(version_dir: Path) -> Path:
    """Geti-style semantic segmentation export of `colour_segmenter`: labels list every class."""
    info = {"model_type": "Segmentation", "labels": "background red green blue", "task_type": "segmentation",
            "blur_strength": "-1", "soft_threshold": "-inf", "return_soft_prediction": "True", **GETI_PREPROCESSING}
    return write_model(version_dir, colour_segmenter(), info)


def red_anomaly_map(size: int = SIZE) -> ov.Model:
    """f32[1,1,S,S]: the red mask as the anomaly map."""
    image = _image(size)
    out = _colour_masks(image)[0]
    out.output(0).get_tensor().set_names({"anomaly_map"})
    return ov.Model([out], [image], "red_anomaly")


def write_anomaly(version_dir: Path) -> Path:
    info = {"model_type": "AnomalyDetection", "labels": "Normal Anomalous", "image_threshold": "0.5",
            "pixel_threshold": "0.5", "normalization_scale": "1.0", "task": "segmentation", **GETI_PREPROCESSING}
    return write_model(version_dir, red_anomaly_map(), info)


def colour_pixels(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """The expected colour masks of an HxWx3 uint8 RGB image, computed in numpy (the independent side)."""
    high, low = rgb > 127.5, rgb < 127.5
    return {name: high[:, :, c] & low[:, :, (c + 1) % 3] & low[:, :, (c + 2) % 3] for c, name in enumerate(COLOURS)}
