"""Reading the job's input image: TIFF (tifffile), JPEG, PNG and BMP (Pillow).

The reader is chosen by the file's signature, not its name, so a mislabelled file still reads
and a file that is not an image gets a clear `ImageError`. The pixel count is checked from the
header before any pixel data is decoded, so a huge image is refused instead of exhausting memory.
Every failure while decoding becomes an `ImageError` whose message names the file.

Limits: Pillow reads a 16-bit RGB PNG as 8-bit RGB, and an EXIF orientation tag is not applied.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import tifffile
from PIL import BmpImagePlugin, Image, ImageFile, JpegImagePlugin, PngImagePlugin

from aicsd.errors import ImageError

__all__ = ["load_rgb", "read_pages", "to_rgb8"]

_log = logging.getLogger(__name__)

_SIGNATURES = (
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"BM", "bmp"),
)

# Each format's own Pillow class, not `Image.open`: that applies Pillow's process-wide
# decompression-bomb limit (a warning, or an error at twice the limit), while here the job's
# `max_pixels` is the limit in force, checked by `_open_pillow` before anything is decoded.
_PILLOW_CLASSES = {
    "png": PngImagePlugin.PngImageFile,
    "jpeg": JpegImagePlugin.JpegImageFile,
    "bmp": BmpImagePlugin.BmpImageFile,
}

_RESIZE_TYPES = ("standard", "crop")
# Pillow first reduces by whole factors (box average) down to `gap` times the target size, then
# resamples; 3.0 is indistinguishable from a plain resize and several times faster on big images.
_REDUCING_GAP = 3.0

Box = tuple[float, float, float, float]


# --- reading -----------------------------------------------------------------------------------


def read_pages(path: Path, *, max_pixels: int, first_only: bool = False) -> list[np.ndarray]:
    """The image's pages (or only the first) with their own dtype, each HxW or HxWxC.

    C is the file's sample count: 3 for RGB, 4 for RGBA (2 for a gray+alpha TIFF). A TIFF's
    pages are every plane of every series: a multi-page file, an ImageJ/OME hyperstack or a
    3-D stack is split on its leading axes. Raises `ImageError` if the file is not a readable
    TIFF, JPEG, PNG or BMP, or if the pixels to decode (all pages together) exceed `max_pixels`.
    """
    kind = _kind(path)
    with _decoding(path):
        if kind == "tiff":
            pages = _read_tiff(path, max_pixels, first_only)
        else:
            with _open_pillow(path, kind, max_pixels) as image:
                pages = [_pillow_array(image)]
    _log.debug("read %s: %d page(s) of %s %s", path.name, len(pages), pages[0].shape, pages[0].dtype)
    return pages


def _kind(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        raise ImageError(f"input file '{path.name}' cannot be opened: {exc.strerror or exc}") from exc
    if not head:
        raise ImageError(f"input file '{path.name}' is empty")
    for magic, kind in _SIGNATURES:
        if head.startswith(magic):
            return kind
    raise ImageError(f"input file '{path.name}' is not a TIFF, JPEG, PNG or BMP image")


@contextmanager
def _decoding(path: Path) -> Iterator[None]:
    """Turn whatever a decoder raises on a corrupt or truncated file into an `ImageError`."""
    try:
        yield
    except ImageError:
        raise
    except MemoryError as exc:
        raise ImageError(f"image '{path.name}' is too large to decode in the memory available") from exc
    except Exception as exc:  # decoders raise many types (OSError, ValueError, SyntaxError, ...)
        detail = (str(exc) or type(exc).__name__).splitlines()[0][:200]
        raise ImageError(f"input file '{path.name}' is not a readable image: {detail}") from exc


def _check_pixels(path: Path, pixels: int, max_pixels: int) -> None:
    if pixels > max_pixels:
        raise ImageError(
            f"image '{path.name}' has {pixels:,} pixels, over the limit of {max_pixels:,} (PIPELINE_MAX_PIXELS)"
        )


def _read_tiff(path: Path, max_pixels: int, first_only: bool) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        series = list(tif.series)
        if not series:
            raise ImageError(f"TIFF file '{path.name}' holds no image")
        # (shape, axes, reader) of what will be decoded: the first page, or every series whole.
        if first_only:
            frame = series[0].keyframe
            parts = [(frame.shape, frame.axes, partial(series[0].asarray, key=0))]
        else:
            parts = [(s.shape, s.axes, s.asarray) for s in series]
        for _, axes, _ in parts:
            if not axes.replace("S", "").endswith("YX"):
                raise ImageError(f"TIFF file '{path.name}' has no 2-D image plane (axes {axes})")
        # Shapes come from the tags: nothing is decoded before the whole count is known.
        pixels = sum(math.prod(n for n, a in zip(shape, axes) if a != "S") for shape, axes, _ in parts)
        _check_pixels(path, pixels, max_pixels)
        pages = [page for shape, axes, read in parts for page in _split_pages(read(), shape, axes)]
    return pages[:1] if first_only else pages


def _split_pages(data: np.ndarray, shape: tuple[int, ...], axes: str) -> list[np.ndarray]:
    """Planes ...YX(S) of a tifffile array as HxW or HxWxC pages, samples last."""
    data = data.reshape(shape)
    plane_ndim = 2
    if "S" in axes:
        data = np.moveaxis(data, axes.index("S"), -1)
        plane_ndim = 3
    pages = data.reshape(-1, *data.shape[-plane_ndim:])
    return [np.ascontiguousarray(p[:, :, 0] if p.ndim == 3 and p.shape[2] == 1 else p) for p in pages]


def _open_pillow(path: Path, kind: str, max_pixels: int) -> ImageFile.ImageFile:
    """Open a PNG, JPEG or BMP (header only) and check its size against `max_pixels`."""
    image = _PILLOW_CLASSES[kind](path)
    try:
        _check_pixels(path, image.width * image.height, max_pixels)
    except ImageError:
        image.close()
        raise
    return image


def _pillow_array(image: Image.Image) -> np.ndarray:
    """Pixels of a Pillow image: 16-bit gray stays uint16; palette, CMYK, LA become RGB or RGBA."""
    mode = image.mode
    if mode.startswith("I;16"):
        return np.array(image, dtype=np.uint16)
    if mode == "I":
        return np.array(image, dtype=np.int32)
    if mode == "F":
        return np.array(image, dtype=np.float32)
    if mode in ("L", "RGB", "RGBA"):
        return np.array(image)
    if mode == "1":
        return np.array(image.convert("L"))
    if mode in ("LA", "PA") or (mode == "P" and "transparency" in image.info):
        return np.array(image.convert("RGBA"))
    return np.array(image.convert("RGB"))


# --- converting to 8-bit RGB -------------------------------------------------------------------


def to_rgb8(page: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 (C-contiguous) of an HxW or HxWxC page.

    uint8 is kept as is; other depths are scaled by the page's real range (min to 0, max to 255;
    a constant page gives zeros). Gray is replicated to three channels, alpha is dropped and
    gray+alpha becomes gray.
    """
    planes = _colour_planes(page)
    if planes.dtype != np.uint8:
        planes = _scale_to_u8(planes, *_value_range(planes))
    if planes.ndim == 2:
        planes = np.repeat(planes[:, :, np.newaxis], 3, axis=2)
    return np.ascontiguousarray(planes)


def _colour_planes(page: np.ndarray) -> np.ndarray:
    """HxW (gray) or HxWx3 (RGB): alpha and any further samples dropped."""
    if page.ndim == 2:
        return page
    if page.ndim == 3 and page.shape[2] >= 1:
        return page[:, :, :3] if page.shape[2] >= 3 else page[:, :, 0]
    raise ValueError(f"expected an HxW or HxWxC image, got shape {page.shape}")


def _value_range(planes: np.ndarray) -> tuple[float, float]:
    """(min, max) of the finite values; (0, 0) when there are none."""
    low, high = float(planes.min()), float(planes.max())
    if planes.dtype.kind == "f" and not (math.isfinite(low) and math.isfinite(high)):
        finite = planes[np.isfinite(planes)]
        return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    return low, high


def _scale_to_u8(data: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map low..high linearly onto 0..255 (rounded, clipped); zeros when high <= low."""
    if not high > low:
        return np.zeros(data.shape, np.uint8)
    if data.dtype == np.uint16 and data.size > 1 << 16:
        # One table look-up per value is several times faster than the arithmetic below.
        return _scale_to_u8(np.arange(1 << 16, dtype=np.uint16), low, high)[data]
    # float32 is exact for 8/16-bit data and for integers up to 2**24 (block sums of 16-bit data).
    exact = data.dtype.itemsize <= 2 or data.dtype == np.float32 or max(abs(low), abs(high)) < 1 << 24
    values = np.subtract(data, low, dtype=np.float32 if exact else np.float64)
    if data.dtype.kind == "f":
        np.nan_to_num(values, copy=False, nan=0.0, posinf=high - low, neginf=0.0)
    values *= 255.0 / (high - low)
    values += 0.5
    np.clip(values, 0.0, 255.0, out=values)
    return values.astype(np.uint8)


# --- classifier input --------------------------------------------------------------------------


def load_rgb(
    path: Path,
    *,
    size: tuple[int, int],
    resize_type: str = "standard",
    crop_fraction: float = 1.0,
    max_pixels: int,
) -> np.ndarray:
    """The first page as HxWx3 uint8 (C-contiguous) of exactly `size` = (width, height).

    "standard" resizes the whole image to `size`; "crop" resizes so the short side becomes
    short/crop_fraction and takes the centre `size` (one bilinear resample of the centre box).
    Other depths are scaled by their real range as in `to_rgb8`. Raises `ImageError` as
    `read_pages` does, and ValueError for an invalid size, resize_type or crop_fraction.
    """
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (width, height) of at least 1 pixel, got {size}")
    size = (int(size[0]), int(size[1]))
    if resize_type not in _RESIZE_TYPES:
        raise ValueError(f"resize_type must be 'standard' or 'crop', got {resize_type!r}")
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    crop = crop_fraction if resize_type == "crop" else None
    kind = _kind(path)
    with _decoding(path):
        if kind == "tiff":
            return _fit_array(read_pages(path, max_pixels=max_pixels, first_only=True)[0], size, crop)
        with _open_pillow(path, kind, max_pixels) as image:
            if kind == "jpeg":
                _draft_jpeg(image, size, crop)
            image.load()
            if image.mode in ("L", "RGB"):
                return _fit(image, _source_box(image.width, image.height, size, crop), size)
            return _fit_array(_pillow_array(image), size, crop)


def _source_box(width: int, height: int, size: tuple[int, int], crop: float | None) -> Box:
    """The region of a width x height image that maps onto `size`: all of it, or the centre crop."""
    if crop is None:
        return (0.0, 0.0, float(width), float(height))
    # Source pixels per output pixel once the short side is resized to short/crop.
    scale = min(width, height) * crop / min(size)
    box_w, box_h = min(width, size[0] * scale), min(height, size[1] * scale)
    left, top = (width - box_w) / 2, (height - box_h) / 2
    return (left, top, left + box_w, top + box_h)


def _reduction(box: Box, size: tuple[int, int]) -> float:
    """Source pixels per output pixel along the less reduced axis."""
    return min((box[2] - box[0]) / size[0], (box[3] - box[1]) / size[1])


def _draft_jpeg(image: ImageFile.ImageFile, size: tuple[int, int], crop: float | None) -> None:
    """Let the JPEG decoder scale by 1/2, 1/4 or 1/8 while staying at least the target size.

    The decoder's scaling averages whole DCT blocks, so it is already a good anti-aliasing filter:
    a 512x512 photo for a 224 crop decodes at 256x256 (about 40% less time, same top-5)."""
    step = int(_reduction(_source_box(image.width, image.height, size, crop), size))
    if step >= 2:
        full = image.size
        if image.draft("RGB", (math.ceil(image.width / step), math.ceil(image.height / step))):
            _log.debug("JPEG %s decoded at %s instead of %s", Path(image.filename).name, image.size, full)


def _fit_array(page: np.ndarray, size: tuple[int, int], crop: float | None) -> np.ndarray:
    """`_fit` for an array page of any depth: box-averaged, then range-scaled to 8-bit, then resized."""
    planes = _colour_planes(page)
    box = _source_box(planes.shape[1], planes.shape[0], size, crop)
    if planes.dtype != np.uint8:
        low, high = _value_range(planes)  # of the whole page, so every part of it scales alike
        step = int(_reduction(box, size) // 2)
        if step >= 2:
            # Only the box, summed over step x step blocks (scaled below as the block means): the
            # 8-bit conversion then touches a small fraction of the pixels, and unlike plain
            # thinning no pixel is skipped.
            left, top = int(box[0]), int(box[1])
            right, bottom = math.ceil(box[2]), math.ceil(box[3])
            planes = _box_sum(planes[top:bottom, left:right], step)
            low, high = low * step * step, high * step * step
            height, width = planes.shape[:2]
            box = (
                (box[0] - left) / step,
                (box[1] - top) / step,
                min(width, (box[2] - left) / step),
                min(height, (box[3] - top) / step),
            )
        planes = _scale_to_u8(planes, low, high)
    return _fit(Image.fromarray(np.ascontiguousarray(planes)), box, size)


def _box_sum(planes: np.ndarray, step: int) -> np.ndarray:
    """Sum of each step x step block (a partial last row or column of blocks is left out)."""
    height, width = planes.shape[0] // step * step, planes.shape[1] // step * step
    small_ints = planes.dtype.kind in "ub" and planes.dtype.itemsize <= 2 and step < 256
    rows = planes[0:height:step, :width].astype(np.uint32 if small_ints else np.float64)
    for i in range(1, step):
        rows += planes[i:height:step, :width]
    blocks = rows[:, 0:width:step].copy()
    for j in range(1, step):
        blocks += rows[:, j:width:step]
    return blocks


def _fit(image: Image.Image, box: Box, size: tuple[int, int]) -> np.ndarray:
    """Resample `box` of an "L" or "RGB" image to `size`: HxWx3 uint8, C-contiguous."""
    if image.size != size or box != (0.0, 0.0, float(image.width), float(image.height)):
        image = image.resize(size, Image.Resampling.BILINEAR, box=box, reducing_gap=_REDUCING_GAP)
    pixels = np.array(image)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, np.newaxis], 3, axis=2)
    return np.ascontiguousarray(pixels)
