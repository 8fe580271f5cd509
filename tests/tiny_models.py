"""Small real OpenVINO models written by the tests, for repository and pipeline tests."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops


def channel_mean_classifier(size: int = 8) -> ov.Model:
    """f32[1,3,size,size] NCHW -> f32[1,3]: the mean of each channel, as 'logits' of 3 classes."""
    image = ops.parameter([1, 3, size, size], np.float32, name="image")
    logits = ops.reduce_mean(image, np.array([2, 3], np.int64), keep_dims=False)
    logits.output(0).get_tensor().set_names({"logits"})
    return ov.Model([logits], [image], "channel_mean")


def identity_image(size: int = 2) -> ov.Model:
    """f32[1,3,size,size] -> the same tensor: shows exactly what preprocessing fed the network."""
    image = ops.parameter([1, 3, size, size], np.float32, name="image")
    out = ops.multiply(image, np.array(1.0, np.float32))
    return ov.Model([out], [image], "identity")


def write_model(version_dir: Path, model: ov.Model, info: Mapping[str, str] | None = None) -> Path:
    """Save `model` as version_dir/model.xml with `info` as rt_info model_info entries."""
    version_dir.mkdir(parents=True, exist_ok=True)
    for key, value in (info or {}).items():
        model.set_rt_info(value, ["model_info", key])
    path = version_dir / "model.xml"
    ov.save_model(model, path, compress_to_fp16=False)
    return path
