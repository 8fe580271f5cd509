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


def _box_rows(image: ov.Node, size: int, pixels: bool) -> tuple[list[ov.Node], list[ov.Node]]:
    """Per colour: [1,4] box (x0, y0, x1, y1; in pixels or normalised) and [1] score (fill ratio)."""
    boxes, scores = [], []
    for mask in _colour_masks(image):
        mask2d = ops.reshape(mask, np.array([size, size], np.int64), False)
        y0, y1 = _bbox_rows(mask2d, size, axis=0)
        x0, x1 = _bbox_rows(mask2d, size, axis=1)
        count = ops.reduce_sum(mask2d, np.array([0, 1], np.int64), keep_dims=False)
        area = ops.maximum(ops.multiply(ops.subtract(x1, x0), ops.subtract(y1, y0)), np.float32(1))
        scale = np.float32(1 if pixels else size)
        corners = [ops.reshape(ops.divide(v, scale), np.array([1], np.int64), False) for v in (x0, y0, x1, y1)]
        boxes.append(ops.reshape(ops.concat(corners, 0), np.array([1, 4], np.int64), False))
        scores.append(ops.reshape(ops.divide(count, area), np.array([1], np.int64), False))
    return boxes, scores


def colour_instance_segmenter(size: int = SIZE) -> ov.Model:
    """DETR-style instance segmentation: labels i64[1,3] (0 red, 1 green, 2 blue), boxes f32[1,3,5]
    (x0, y0, x1, y1 in pixels, score = fill ratio) and full-image masks f32[1,3,S,S] (the colour masks)."""
    image = _image(size)
    boxes, scores = _box_rows(image, size, pixels=True)
    rows = [ops.concat([box, ops.reshape(score, np.array([1, 1], np.int64), False)], 1)
            for box, score in zip(boxes, scores, strict=False)]
    boxes_out = ops.reshape(ops.concat(rows, 0), np.array([1, 3, 5], np.int64), False)
    boxes_out.output(0).get_tensor().set_names({"boxes"})
    labels = ops.add(ops.multiply(ops.convert(ops.reduce_max(image, np.array([1, 2, 3], np.int64), keep_dims=False),
                                              np.int64), np.int64(0)), ops.constant(np.array([[0, 1, 2]], np.int64)))
    labels.output(0).get_tensor().set_names({"labels"})
    masks = ops.concat(_colour_masks(image), 1)  # [1,3,S,S]
    masks.output(0).get_tensor().set_names({"masks"})
    return ov.Model([boxes_out, labels, masks], [image], "colour_instance_segmenter")


def write_instance_segmenter(version_dir: Path) -> Path:
    info = {"model_type": "DETRInstSeg", "labels": "background red green blue", "confidence_threshold": "0.5",
            "task_type": "instance_segmentation", **GETI_PREPROCESSING}
    return write_model(version_dir, colour_instance_segmenter(), info)


def colour_corner_keypoints(size: int = SIZE) -> ov.Model:
    """SimCC keypoints, one per colour: simcc_x f32[1,3,2S] and simcc_y f32[1,3,2S] are the colour
    mask's column and row maxima, each bin repeated twice (split ratio 2), so the decoded keypoint is
    the top-left corner of the colour's pixels, with score 1 (0 when the colour is absent)."""
    image = _image(size)
    xs, ys = [], []
    for mask in _colour_masks(image):
        mask2d = ops.reshape(mask, np.array([size, size], np.int64), False)
        for axis, out in ((0, xs), (1, ys)):
            profile = ops.reduce_max(mask2d, np.array([axis], np.int64), keep_dims=False)  # [S]
            pairs = ops.concat([ops.reshape(profile, np.array([size, 1], np.int64), False)] * 2, 1)  # [S,2]
            out.append(ops.reshape(pairs, np.array([1, 1, 2 * size], np.int64), False))
    simcc_x, simcc_y = ops.concat(xs, 1), ops.concat(ys, 1)
    simcc_x.output(0).get_tensor().set_names({"simcc_x"})
    simcc_y.output(0).get_tensor().set_names({"simcc_y"})
    return ov.Model([simcc_x, simcc_y], [image], "colour_corner_keypoints")


def write_keypoints(version_dir: Path) -> Path:
    info = {"model_type": "keypoint_detection", "labels": "red green blue", "apply_softmax": "False",
            "task_type": "keypoint_detection", **GETI_PREPROCESSING}
    return write_model(version_dir, colour_corner_keypoints(), info)


def colour_yolo(size: int = SIZE) -> ov.Model:
    """YOLOv8-style output f32[1,7,3]: per colour an anchor (cx, cy, w, h in pixels of the box of its
    pixels) with class scores one-hot times the fill ratio."""
    image = _image(size)
    boxes, scores = _box_rows(image, size, pixels=True)
    columns = []
    for c, (box, score) in enumerate(zip(boxes, scores, strict=False)):
        x0, y0, x1, y1 = (ops.gather(box, np.int64(i), np.int64(1)) for i in range(4))  # [1] each
        centre_w = [ops.divide(ops.add(x0, x1), np.float32(2)), ops.divide(ops.add(y0, y1), np.float32(2)),
                    ops.subtract(x1, x0), ops.subtract(y1, y0)]
        classes = [ops.multiply(score, np.float32(1 if k == c else 0)) for k in range(3)]
        columns.append(ops.reshape(ops.concat(centre_w + classes, 0), np.array([7, 1], np.int64), False))
    out = ops.reshape(ops.concat(columns, 1), np.array([1, 7, 3], np.int64), False)
    out.output(0).get_tensor().set_names({"output0"})
    return ov.Model([out], [image], "colour_yolo")


def write_yolo(version_dir: Path) -> Path:
    """An Ultralytics-style YOLOv8 export: letterboxed input, RGB, 0..1."""
    info = {"model_type": "YOLOv8", "labels": "red green blue", "confidence_threshold": "0.25",
            "iou_threshold": "0.7", "resize_type": "fit_to_window_letterbox", "pad_value": "114",
            "reverse_input_channels": "True", "scale_values": "255"}
    return write_model(version_dir, colour_yolo(), info)
