"""Counting cells and particles: blob detection in OpenVINO, annotated image and table out.

The model (model_type `BlobCounting`, built by `make models` into `models/cell-counter`) finds
local maxima of a difference-of-Gaussians scale space. This pipeline normalises each page,
turns the model's peaks into blobs (centre, diameter, intensity), removes duplicates of one blob
found at neighbouring scales, and writes `<stem>-counted.tiff`: the pages with the detections
circled, one TIFF page per input page (pages may differ in size), with the per-object table
(page, x, y, diameter, intensity) as CSV text in the first page's ImageDescription tag. Only
that TIFF is listed for AiCSD, whose file sender turns every listed file into a JPEG and fails
on anything that is not an image; the same table is also left beside it as `<stem>-counts.csv`,
not listed.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import tifffile
from PIL import Image, ImageDraw

from aicsd.errors import ModelError, ParameterError
from aicsd.job import ModelParams
from aicsd.outcome import OutputFile, PipelineOutcome

from .base import PipelineTask
from .images import read_pages, to_rgb8
from .model_repository import CompiledModel, ModelInfo
from .output_files import publish_together
from .parameters import Param, ParameterSchema

__all__ = ["TABLE_COLUMNS", "Blob", "CountingParams", "CountingPipeline", "PageQuality", "blob_table", "page_quality"]

SATURATED, LOW_CONTRAST, NO_OBJECTS = "Saturated", "LowContrast", "NoObjects"
SATURATION_FRACTION = 0.01
# Memory a page costs while the model runs, per pixel and per scale of its scale space (measured:
# about 170 bytes a pixel with the 9 scales of models/cell-counter), charged to the image budget.
WORKING_BYTES_PER_PIXEL_PER_SCALE = 19
MIN_CONTRAST_TO_NOISE = 8.0


@dataclass(frozen=True)
class CountingParams:
    """ModelParams of the counter: Polarity, MinDiameter, MaxDiameter (pixels), Threshold."""

    polarity: str
    min_diameter: float
    max_diameter: float
    threshold: float

    @staticmethod
    def schema(info: ModelInfo) -> ParameterSchema:
        """The counter's declared parameters; a model may give its own defaults in model_info."""

        def default(key: str, fallback: float) -> float:
            return float(info.extra.get(key, fallback))

        return ParameterSchema(
            Param("Polarity", "choice", "bright", "bright blobs on a dark background, or dark on bright",
                  choices=("bright", "dark")),
            Param("MinDiameter", "number", default("default_min_diameter", 3), "smallest blob diameter, pixels",
                  minimum=1, maximum=10_000),
            Param("MaxDiameter", "number", default("default_max_diameter", 50), "largest blob diameter, pixels",
                  minimum=1, maximum=10_000),
            Param("Threshold", "number", default("default_threshold", 0.1), "minimum blob response, as a fraction "
                  "of the page's robust intensity range", minimum=0.001, maximum=1.0),
        )

    @classmethod
    def from_params(cls, params: ModelParams, info: ModelInfo) -> CountingParams:
        values = cls.schema(info).parse(params)
        low, high = values["MinDiameter"], values["MaxDiameter"]
        if high < low:
            raise ParameterError("MaxDiameter", f"must not be below MinDiameter ({low:g}), got {high:g}")
        return cls(values["Polarity"], low, high, values["Threshold"])

    def as_results(self) -> dict[str, object]:
        return {"Polarity": self.polarity, "MinDiameter": self.min_diameter, "MaxDiameter": self.max_diameter,
                "Threshold": self.threshold}


@dataclass(frozen=True)
class Blob:
    page: int
    x: float
    y: float
    diameter: float
    intensity: float
    response: float


@dataclass(frozen=True)
class PageQuality:
    """What the quality-control flags are computed from."""

    saturated_fraction: float
    low: float
    high: float
    noise: float

    @property
    def contrast_to_noise(self) -> float:
        if self.high <= self.low:
            return 0.0
        return (self.high - self.low) / self.noise if self.noise > 0 else math.inf

    @property
    def noise_floor(self) -> float:
        """The smallest threshold that noise alone does not cross (in normalised response units).

        White noise of standard deviation n (normalised) gives the finest difference-of-Gaussians
        channel a response of about 0.5 n; four of those is well clear of it.
        """
        return 2.0 / self.contrast_to_noise if self.contrast_to_noise > 0 else math.inf


def _gray(page: np.ndarray) -> np.ndarray:
    if page.ndim == 3:
        channels = page[..., :3].astype(np.float32)
        if channels.shape[2] == 3:
            return channels @ np.array([0.299, 0.587, 0.114], np.float32)
        return channels[..., 0]
    return page.astype(np.float32)


def page_quality(page: np.ndarray, gray: np.ndarray) -> PageQuality:
    """Saturation (pixels at the type's maximum), robust range and noise of one page."""
    if np.issubdtype(page.dtype, np.integer):
        top = np.iinfo(page.dtype).max
        at_top = (page == top) if page.ndim == 2 else (page[..., :3] == top).any(axis=2)
        saturated = float(at_top.mean())
    else:
        saturated = 0.0
    sample = gray[:: max(1, gray.shape[0] // 512), :: max(1, gray.shape[1] // 512)]
    low, high = (float(v) for v in np.percentile(sample, [0.5, 99.9]))
    # Noise from neighbouring-pixel differences (robust: median absolute deviation).
    diffs = np.diff(gray[:, : min(gray.shape[1], 2048)], axis=1).ravel()[:2_000_000]
    noise = float(np.median(np.abs(diffs - np.median(diffs)))) * 1.4826 / math.sqrt(2) if diffs.size else 0.0
    return PageQuality(saturated, low, high, noise)


class CountingPipeline:
    """Counts blobs on every page of the job's image with one compiled BlobCounting model."""

    model_type = "BlobCounting"

    def __init__(self, model: CompiledModel, *, max_pixels: int) -> None:
        try:
            self.sigmas = np.array([float(s) for s in model.info.extra["sigmas"].split()], np.float64)
            self.min_side = int(model.info.extra.get("min_image_side", "1"))
        except (KeyError, ValueError):
            raise ModelError(f"model '{model.name}' has no usable 'sigmas' in its model_info") from None
        self.model = model
        self.max_pixels = max_pixels
        self.working_bytes_per_pixel = WORKING_BYTES_PER_PIXEL_PER_SCALE * len(self.sigmas) + 8

    def warm_up(self) -> None:
        side = max(64, self.min_side)
        self.model.warm_up({0: np.zeros((1, 1, side, side), np.float32), 1: np.float32(1.0)})

    def detect(self, page: np.ndarray, gray: np.ndarray, quality: PageQuality, params: CountingParams,
               number: int) -> list[Blob]:
        """The blobs of one page, strongest first, duplicates removed."""
        scale = quality.high - quality.low
        normalised = (gray - quality.low) / (scale if scale > 0 else 1.0)
        if params.polarity == "dark":
            normalised = 1.0 - normalised
        height, width = normalised.shape
        padded = np.pad(normalised, ((0, max(0, self.min_side - height)), (0, max(0, self.min_side - width))),
                        mode="edge")
        threshold = max(params.threshold, quality.noise_floor)
        if not math.isfinite(threshold):
            return []  # a flat page: nothing to find
        outputs = self.model.infer({0: padded[np.newaxis, np.newaxis], 1: np.float32(threshold)})
        indices, values = outputs["peak_indices"], outputs["peak_values"]
        if indices.size == 0:
            return []
        scales, ys, xs = indices[:, 1], indices[:, 2], indices[:, 3]
        diameters = 2 * math.sqrt(2) * self.sigmas[scales]
        inside = (ys < height) & (xs < width)
        order = np.argsort(-values[inside], kind="stable")
        ys, xs = ys[inside][order], xs[inside][order]
        diameters, values = diameters[inside][order], values[inside][order]
        # One blob answers at several scales: keep its strongest, then apply the size range.
        chosen = _without_duplicates(xs.astype(np.float64), ys.astype(np.float64), diameters / 2)
        return [
            Blob(number, float(xs[i]), float(ys[i]), round(float(diameters[i]), 2), float(gray[ys[i], xs[i]]),
                 float(values[i]))
            for i in chosen
            if params.min_diameter <= diameters[i] <= params.max_diameter
        ]

    def describe(self) -> dict[str, object]:
        """What a pipeline listing shows: the model type, the kind and its parameters."""
        return {"model_type": self.model_type, "kind": "counting",
                "parameters": CountingParams.schema(self.model.info).describe()}

    def run(self, task: PipelineTask) -> PipelineOutcome:
        params = CountingParams.from_params(task.params, self.model.info)
        pages = read_pages(task.input_file, max_pixels=self.max_pixels, max_pages=task.max_pages,
                           memory=task.memory, working_bytes_per_pixel=self.working_bytes_per_pixel)
        blobs: list[Blob] = []
        per_page: list[int] = []
        flags: list[str] = []
        for number, page in enumerate(pages, start=1):
            gray = _gray(page)
            quality = page_quality(page, gray)
            if quality.saturated_fraction > SATURATION_FRACTION and SATURATED not in flags:
                flags.append(SATURATED)
            if quality.contrast_to_noise < MIN_CONTRAST_TO_NOISE and LOW_CONTRAST not in flags:
                flags.append(LOW_CONTRAST)
            found = self.detect(page, gray, quality, params, number)
            per_page.append(len(found))
            blobs.extend(found)
        if not blobs:
            flags.append(NO_OBJECTS)
        task.log.info("counted %d objects on %d page(s)", len(blobs), len(pages))
        stem = task.input_file.stem
        table = blob_table(blobs)
        annotated, _ = publish_together(
            task.output_folder,
            [
                (f"{stem}-counted.tiff", lambda handle: _write_annotated(handle, pages, blobs, table)),
                (f"{stem}-counts.csv", lambda handle: _write_text(handle, table)),
            ],
            record=task.record_files,
        )
        results = {"CellCount": len(blobs), "Pages": per_page, "Model": self.model.name, **params.as_results()}
        return PipelineOutcome.complete(
            json.dumps(results, separators=(",", ":")),
            qc_flags=",".join(flags),
            output_files=(OutputFile.in_folder(task.output_folder.dir_name, annotated),),
        )


def _without_duplicates(xs: np.ndarray, ys: np.ndarray, radii: np.ndarray) -> list[int]:
    """Greedy, strongest first: drop a blob whose centre lies within half the radii sum of a kept one."""
    kept: list[int] = []
    kept_x = np.empty(0)
    kept_y = np.empty(0)
    kept_r = np.empty(0)
    for i in range(xs.size):
        if kept_x.size:
            near = np.hypot(kept_x - xs[i], kept_y - ys[i]) < 0.5 * (kept_r + radii[i])
            if near.any():
                continue
        kept.append(i)
        kept_x, kept_y, kept_r = np.append(kept_x, xs[i]), np.append(kept_y, ys[i]), np.append(kept_r, radii[i])
    return kept


def _write_annotated(handle: BinaryIO, pages: list[np.ndarray], blobs: list[Blob], table: str) -> None:
    """Each page as 8-bit RGB with a circle around every detection (viewable in any TIFF viewer),
    one TIFF page per input page; the object table rides in the first page's ImageDescription."""
    with tifffile.TiffWriter(handle) as tif:
        for number, page in enumerate(pages, start=1):
            image = Image.fromarray(to_rgb8(page))
            draw = ImageDraw.Draw(image)
            width = max(2, round(min(image.size) / 400))
            for blob in (b for b in blobs if b.page == number):
                r = blob.diameter / 2 + width
                draw.ellipse((blob.x - r, blob.y - r, blob.x + r, blob.y + r), outline=(0, 255, 0), width=width)
            tif.write(np.asarray(image), photometric="rgb", compression="zlib", metadata=None,
                      description=table if number == 1 else None)


def _write_text(handle: BinaryIO, text: str) -> None:
    handle.write(text.encode("ascii"))


TABLE_COLUMNS = ("page", "x", "y", "diameter", "intensity")


def blob_table(blobs: list[Blob]) -> str:
    """The per-object table as CSV text: a header row, then one row per blob."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(TABLE_COLUMNS)
    for blob in blobs:
        writer.writerow([blob.page, f"{blob.x:g}", f"{blob.y:g}", f"{blob.diameter:g}", f"{blob.intensity:g}"])
    return out.getvalue()
