"""A blob-counting model as an OpenVINO graph of classical operations.

Scale-space blob detection (Lindeberg; the difference-of-Gaussians form used by SIFT):
Gaussian blurs at scales sigma_i = 2^(i/2), computed as a cascade of separable blurs (row pass,
column pass, reflect padding so borders do not invent edges, dilated taps for the large scales),
differences of neighbouring scales as an
approximation of the scale-normalised Laplacian, and local maxima found by a 3x3 max pool at
each scale. The graph takes any image size and a threshold; the pipeline turns its peaks
into blob centres and diameters (diameter = 2 * sqrt(2) * sigma).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from .ir_files import set_model_info, write_ir

__all__ = ["SIGMAS", "build_cell_counter", "dog_sigmas", "min_image_side", "write_cell_counter"]

SCALE_STEP = math.sqrt(2.0)
SIGMAS = tuple(SCALE_STEP**i for i in range(10))  # 1 .. 22.6 px
TRUNCATE = 3.0


def dog_sigmas() -> list[float]:
    """The blob scale each difference-of-Gaussians channel answers to most strongly.

    Calibrated on Gaussian blobs: G(s) - G(s * sqrt2) peaks for a blob of sigma ~ 2^(1/8) * s.
    """
    return [2 ** 0.125 * low for low in SIGMAS[:-1]]


def _kernel(sigma: float, step: int) -> np.ndarray:
    """A normalised Gaussian sampled every `step` pixels, out to TRUNCATE * sigma."""
    radius = max(1, math.ceil(TRUNCATE * sigma / step))
    x = np.arange(-radius, radius + 1, dtype=np.float64) * step
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _blur(image: ov.Node, sigma: float, step: int) -> ov.Node:
    """Separable Gaussian blur with reflect padding; taps `step` pixels apart (a dilated kernel),
    which is exact enough on an input already smooth at scale >= 2 * step."""
    kernel = _kernel(sigma, step)
    pad = (kernel.size - 1) // 2 * step
    dilation = [step, step]
    rows = ops.pad(image, np.array([0, 0, 0, pad], np.int64), np.array([0, 0, 0, pad], np.int64), "reflect")
    rows = ops.convolution(rows, ops.constant(kernel.reshape(1, 1, 1, -1)), [1, 1], [0, 0], [0, 0], dilation)
    cols = ops.pad(rows, np.array([0, 0, pad, 0], np.int64), np.array([0, 0, pad, 0], np.int64), "reflect")
    return ops.convolution(cols, ops.constant(kernel.reshape(1, 1, -1, 1)), [1, 1], [0, 0], [0, 0], dilation)


def min_image_side() -> int:
    """Reflect padding needs images larger than the widest blur's padding."""
    widest = 0
    for previous, sigma in itertools.pairwise(SIGMAS):
        step = max(1, int(previous // 2))
        widest = max(widest, (_kernel(math.sqrt(sigma**2 - previous**2), step).size - 1) // 2 * step)
    return widest + 1


def build_cell_counter() -> ov.Model:
    """image f32[1,1,H,W] in [0, 1] (bright blobs), threshold f32[] -> blob candidates.

    Outputs: `peak_indices` i64[N, 4] (batch, scale, y, x) of the local maxima at each scale above
    the threshold, and `peak_values` f32[N], their responses.
    """
    image = ops.parameter([1, 1, -1, -1], np.float32, name="image")
    threshold = ops.parameter([], np.float32, name="threshold")
    # A cascade: each blur adds the variance the next scale needs to the previous blur.
    blurs = [_blur(image, SIGMAS[0], 1)]
    for previous, sigma in itertools.pairwise(SIGMAS):
        blurs.append(_blur(blurs[-1], math.sqrt(sigma**2 - previous**2), max(1, int(previous // 2))))
    # G(s) - G(s*sqrt2) ~ (sqrt2 - 1) * s^2 * (-Laplacian): divide by (sqrt2 - 1) to compare scales.
    norm = np.float32(1.0 / (SCALE_STEP - 1.0))
    response = ops.concat([ops.multiply(ops.subtract(a, b), norm) for a, b in itertools.pairwise(blurs)], 1)
    # Local maxima in space at each scale. (Maxima in scale too would lose the weaker of two
    # touching blobs, whose own scale is dominated by the pair's joint response; the pipeline
    # keeps the strongest scale of each blob instead.)
    pooled = ops.max_pool(response, [1, 1], [1, 1], [1, 1], [1, 1], [3, 3]).output(0)
    is_peak = ops.logical_and(ops.equal(response, pooled), ops.greater(response, threshold))
    indices = ops.transpose(ops.non_zero(is_peak, "i64"), np.array([1, 0], np.int64))
    indices.output(0).get_tensor().set_names({"peak_indices"})
    values = ops.gather_nd(response, indices)
    values.output(0).get_tensor().set_names({"peak_values"})
    model = ov.Model([indices, values], [image, threshold], "cell-counter")
    info = {
        "model_type": "BlobCounting",
        "sigmas": " ".join(f"{s:.6g}" for s in dog_sigmas()),
        "min_image_side": str(min_image_side()),
        "default_threshold": "0.1",
        "default_min_diameter": "3",
        "default_max_diameter": "50",
        "inference_precision": "f32",
        "performance_hint": "LATENCY",
    }
    return set_model_info(model, info)


def write_cell_counter(out_dir: Path) -> Path:
    """Write `out_dir/model.xml` (+ .bin) unless it is newer than this module; the model file."""
    return write_ir(build_cell_counter, out_dir, [Path(__file__), Path(__file__).with_name("ir_files.py")])
