"""Reading the job's input image: TIFF (tifffile), JPEG, PNG and BMP (Pillow).

The reader is chosen by the file's signature, not its name, so a mislabelled file still reads
and a file that is not an image gets a clear `ImageError`. The pixel count is checked from the
header before any pixel data is decoded, so a huge image is refused instead of exhausting memory.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from .errors import ImageError

__all__ = ["load_rgb", "read_pages", "to_rgb8", "value_range"]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PILLOW_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM")


def _kind(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        raise ImageError(f"input file '{path.name}' cannot be opened: {exc.strerror or exc}") from None
    if head.startswith(_TIFF_MAGIC):
        return "tiff"
    if head.startswith(_PILLOW_MAGIC):
        return "pillow"
    raise ImageError(f"input file '{path.name}' is not a TIFF, JPEG, PNG or BMP image")


def _check_pixels(path: Path, pixels: int, max_pixels: int) -> None:
    if pixels > max_pixels:
        raise ImageError(
            f"image '{path.name}' has {pixels:,} pixels, over the limit of {max_pixels:,} (PIPELINE_MAX_PIXELS)"
        )


def read_pages(path: Path, *, max_pixels: int, first_only: bool = False) -> list[np.ndarray]:
    """Every page (or the first) as an array with its own dtype: HxW or HxWxC."""
    kind = _kind(path)
    try:
        if kind == "tiff":
            return _read_tiff(path, max_pixels, first_only)
        return [_read_pillow(path, max_pixels)]
    except ImageError:
        raise
    except MemoryError:
        raise ImageError(f"image '{path.name}' is too large to decode in the memory available") from None
    except Exception as exc:  # decoders raise many types for corrupt data
        raise ImageError(f"input file '{path.name}' is not a readable image: {exc}") from None


def _read_tiff(path: Path, max_pixels: int, first_only: bool) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise ImageError(f"TIFF file '{path.name}' holds no image")
        series = tif.series[0]
        shape, axes = series.shape, series.axes
        spatial = [i for i, a in enumerate(axes) if a in "YX"]
        if len(spatial) != 2:
            raise ImageError(f"TIFF file '{path.name}' has no 2-D image (axes {axes})")
        height, width = shape[spatial[0]], shape[spatial[1]]
        pages = int(np.prod([n for i, n in enumerate(shape) if axes[i] not in "YXS"], dtype=np.int64)) or 1
        counted = 1 if first_only else pages
        _check_pixels(path, height * width * counted, max_pixels)
        if first_only and pages > 1:
            data = tif.pages[0].asarray()
            return [_normalise_tiff_page(data, "YXS" if data.ndim == 3 else "YX")]
        data = series.asarray()
    # Put the sample axis last, then split every other leading axis into pages.
    if "S" in axes:
        s = axes.index("S")
        data = np.moveaxis(data, s, -1)
        axes = axes[:s] + axes[s + 1 :] + "S"
    stack = data.reshape((-1, *data.shape[-3 if "S" in axes else -2 :]))
    result = [_normalise_tiff_page(page, "YXS" if "S" in axes else "YX") for page in stack]
    return result[:1] if first_only else result


def _normalise_tiff_page(page: np.ndarray, axes: str) -> np.ndarray:
    if axes == "YXS" and page.shape[-1] == 1:
        page = page[..., 0]
    return np.ascontiguousarray(page)


_PILLOW_LIMIT_LOCK = threading.Lock()


def _open_pillow(path: Path, max_pixels: int) -> Image.Image:
    """Open (header only) with our pixel limit in force instead of Pillow's bomb check."""
    with _PILLOW_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            image = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    try:
        _check_pixels(path, image.width * image.height, max_pixels)
    except ImageError:
        image.close()
        raise
    return image


def _read_pillow(path: Path, max_pixels: int) -> np.ndarray:
    with _open_pillow(path, max_pixels) as image:
        image.load()
        return _pillow_array(image)


def _pillow_array(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(image, dtype=np.uint16)
    if mode == "I":
        return np.asarray(image, dtype=np.int32)
    if mode == "F":
        return np.asarray(image, dtype=np.float32)
    if mode in ("1", "L"):
        return np.asarray(image.convert("L"))
    if mode in ("LA", "RGBA", "PA") or (mode == "P" and "transparency" in image.info):
        return np.asarray(image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))


def _colour_planes(page: np.ndarray) -> np.ndarray:
    """HxW or HxWx3: alpha dropped, gray+alpha reduced to gray."""
    if page.ndim == 3:
        return page[..., :3] if page.shape[2] >= 3 else page[..., 0]
    return page


def to_rgb8(page: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """HxWx3 uint8: other depths scaled by their real range, gray replicated, alpha dropped.

    `value_range` gives the (min, max) to scale by when `page` is a reduced copy of a larger image.
    """
    page = _colour_planes(page)
    if page.dtype != np.uint8:
        page = _scale_to_u8(page, value_range)
    if page.ndim == 2:
        page = np.repeat(page[..., np.newaxis], 3, axis=2)
    return np.ascontiguousarray(page)


def value_range(page: np.ndarray) -> tuple[float, float]:
    """(min, max) of the finite values of the colour planes; (0, 0) for an image with none."""
    planes = _colour_planes(page)
    if planes.dtype.kind == "f":
        finite = planes[np.isfinite(planes)]
        return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    return float(planes.min()), float(planes.max())


def _scale_to_u8(data: np.ndarray, known: tuple[float, float] | None) -> np.ndarray:
    low, high = known if known is not None else value_range(data)
    if high <= low:
        return np.zeros(data.shape, np.uint8)
    values = data.astype(np.float32, copy=False)
    if data.dtype.kind == "f":
        values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def _reduced_rgb8(page: np.ndarray, size: tuple[int, int], resize_type: str, crop_fraction: float) -> np.ndarray:
    """RGB uint8 of `page`, first thinned by whole steps while it stays at least twice the target."""
    if page.dtype == np.uint8:
        return to_rgb8(page)
    known = value_range(page)
    height, width = page.shape[:2]
    scale = min(width / size[0], height / size[1]) * (crop_fraction if resize_type == "crop" else 1.0)
    step = int(scale // 2)
    if step >= 2:
        page = page[::step, ::step]
    return to_rgb8(page, known)


def _centre_box(width: int, height: int, size: tuple[int, int], resize_type: str, crop_fraction: float):
    """The source box that maps onto `size`: the whole image, or a centred crop of it."""
    if resize_type != "crop":
        return (0.0, 0.0, float(width), float(height))
    out_w, out_h = size
    # Resize so the short side becomes short/crop_fraction, then take the centre `size`.
    scale = min(width, height) / (min(out_w, out_h) / crop_fraction)
    box_w, box_h = min(width, out_w * scale), min(height, out_h * scale)
    left, top = (width - box_w) / 2, (height - box_h) / 2
    return (left, top, left + box_w, top + box_h)


def load_rgb(
    path: Path,
    *,
    size: tuple[int, int],
    resize_type: str = "standard",
    crop_fraction: float = 1.0,
    max_pixels: int,
) -> np.ndarray:
    """The first page as RGB uint8 of exactly `size` (width, height), for a classifier."""
    kind = _kind(path)
    try:
        if kind == "pillow":
            return _load_rgb_pillow(path, size, resize_type, crop_fraction, max_pixels)
        page = read_pages(path, max_pixels=max_pixels, first_only=True)[0]
        return _resized(Image.fromarray(_reduced_rgb8(page, size, resize_type, crop_fraction)), size,
                        resize_type, crop_fraction)
    except ImageError:
        raise
    except MemoryError:
        raise ImageError(f"image '{path.name}' is too large to decode in the memory available") from None
    except Exception as exc:
        raise ImageError(f"input file '{path.name}' is not a readable image: {exc}") from None


def _load_rgb_pillow(
    path: Path, size: tuple[int, int], resize_type: str, crop_fraction: float, max_pixels: int
) -> np.ndarray:
    with _open_pillow(path, max_pixels) as image:
        if image.format == "JPEG" and image.mode in ("RGB", "L", "CMYK", "YCbCr"):
            # Decode at a reduced scale (DCT scaling) while staying at least twice the target.
            scale = min(image.width / size[0], image.height / size[1]) * (
                crop_fraction if resize_type == "crop" else 1.0
            )
            if scale >= 4:
                image.draft("RGB", (image.width // int(scale // 2), image.height // int(scale // 2)))
        image.load()
        rgb = image if image.mode == "RGB" else Image.fromarray(to_rgb8(_pillow_array(image)))
        return _resized(rgb, size, resize_type, crop_fraction)


def _resized(image: Image.Image, size: tuple[int, int], resize_type: str, crop_fraction: float) -> np.ndarray:
    box = _centre_box(image.width, image.height, size, resize_type, crop_fraction)
    if image.size != size or box != (0.0, 0.0, float(image.width), float(image.height)):
        image = image.resize(size, Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
