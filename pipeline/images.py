"""Reading the job's input image: TIFF (tifffile), JPEG, PNG and BMP (Pillow).

The reader is chosen by the file's signature, not its name, so a mislabelled file still reads
and a file that is not an image gets a clear `ImageError`. A job's file is read through its open
descriptor (`InputFile`), never by path again. Before any pixel data is decoded, from the headers
alone: the pixel count is checked (`max_pixels`), a TIFF's page count (`max_pages`, without
parsing the pages past it), that the file holds enough data for the size it declares (so a forged
or truncated header is refused, not padded with gray), and the image's memory is reserved from
the job's claim on the budget (waiting for room if need be). Every failure while decoding becomes
an `ImageError` whose message names the file.

Limits: Pillow reads a 16-bit RGB PNG as 8-bit RGB, and an EXIF orientation tag is not applied.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import simplejpeg
import tifffile
from PIL import BmpImagePlugin, Image, ImageFile, JpegImagePlugin, PngImagePlugin

from aicsd.errors import ImageError

from .base import DEFAULT_MAX_PAGES, InputFile
from .memory import MemoryClaim

__all__ = ["Source", "load_rgb", "read_pages", "to_rgb8"]

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

Source = Path | InputFile
"""A path (opened here) or the job's already opened input file (read through its descriptor)."""

# What an image costs in flight besides its decoded pixels, per pixel of its largest page (pages
# are processed one at a time): by default room for two float32 planes (the conversions to 8-bit).
# A pipeline that needs more per page (the counter's scale space) says so.
WORKING_BYTES_PER_PIXEL = 8


def read_pages(
    source: Source,
    *,
    max_pixels: int,
    max_pages: int = DEFAULT_MAX_PAGES,
    memory: MemoryClaim | None = None,
    working_bytes_per_pixel: int = WORKING_BYTES_PER_PIXEL,
    first_only: bool = False,
) -> list[np.ndarray]:
    """The image's pages (or only the first) with their own dtype, each HxW or HxWxC.

    C is the file's sample count: 3 for RGB, 4 for RGBA (2 for a gray+alpha TIFF). A TIFF's
    pages are every plane of every page (an ImageJ hyperstack as its series says); reduced-size
    thumbnails are left out, and `first_only` parses the first page alone. Raises `ImageError`
    if the file is not a readable TIFF, JPEG, PNG or BMP, if the pixels to decode (all pages
    together) exceed `max_pixels`, a TIFF has more than `max_pages` pages, its data cannot fill
    its declared size, or it needs more than the whole `memory` budget (for which it may wait):
    its decoded size plus `working_bytes_per_pixel` for each pixel of its largest page.
    """
    with _opened(source) as (handle, name):
        kind = _kind(handle, name)
        with _decoding(name):
            if kind == "tiff":
                pages = _read_tiff(handle, name, max_pixels, max_pages, memory, first_only, working_bytes_per_pixel)
            else:
                with _open_pillow(handle, name, kind, max_pixels) as image:
                    _reserve(memory, image, name, working_bytes_per_pixel)
                    pages = [_pillow_array(image)]
    _log.debug("read %s: %d page(s) of %s %s", name, len(pages), pages[0].shape, pages[0].dtype)
    return pages


@contextmanager
def _opened(source: Source) -> Iterator[tuple[BinaryIO, str]]:
    name = source.name
    try:
        handle = source.reader() if isinstance(source, InputFile) else open(source, "rb")  # noqa: SIM115
    except OSError as exc:
        raise ImageError(f"input file '{name}' cannot be opened: {exc.strerror or exc}") from exc
    with handle:
        yield handle, name


def _kind(handle: BinaryIO, name: str) -> str:
    try:
        head = handle.read(8)
        handle.seek(0)
    except OSError as exc:
        raise ImageError(f"input file '{name}' cannot be read: {exc.strerror or exc}") from exc
    if not head:
        raise ImageError(f"input file '{name}' is empty")
    for magic, kind in _SIGNATURES:
        if head.startswith(magic):
            return kind
    raise ImageError(f"input file '{name}' is not a TIFF, JPEG, PNG or BMP image")


@contextmanager
def _decoding(name: str) -> Iterator[None]:
    """Turn whatever a decoder raises on a corrupt or truncated file into an `ImageError`."""
    try:
        yield
    except ImageError:
        raise
    except MemoryError as exc:
        raise ImageError(f"image '{name}' is too large to decode in the memory available") from exc
    except Exception as exc:  # decoders raise many types (OSError, ValueError, SyntaxError, ...)
        detail = (str(exc) or type(exc).__name__).splitlines()[0][:200]
        raise ImageError(f"input file '{name}' is not a readable image: {detail}") from exc


def _check_pixels(name: str, pixels: int, max_pixels: int) -> None:
    if pixels > max_pixels:
        raise ImageError(
            f"image '{name}' has {pixels:,} pixels, over the limit of {max_pixels:,} (PIPELINE_MAX_PIXELS)"
        )


def _incomplete(name: str, width: int, height: int, detail: str) -> ImageError:
    return ImageError(
        f"image '{name}' is incomplete: it declares {width}x{height} pixels but {detail} "
        "(a truncated file or a forged header); not used"
    )


def _file_size(handle: BinaryIO) -> int:
    return os.fstat(handle.fileno()).st_size


class _Part(NamedTuple):
    """Something tifffile will decode (a page, or an ImageJ series): its reader and its tags' shape."""

    read: Callable[[], np.ndarray]
    shape: tuple[int, ...]
    axes: str
    dtype: np.dtype

    def pixels(self, first_plane_only: bool) -> int:
        """Pixels to decode, samples not counted: of its first plane only, or of all its planes."""
        counted = "YX" if first_plane_only else None
        return math.prod(
            n for n, a in zip(self.shape, self.axes, strict=False) if (a in counted if counted else a != "S")
        )

    def bytes_per_pixel(self) -> int:
        samples = math.prod(n for n, a in zip(self.shape, self.axes, strict=False) if a == "S")
        return samples * self.dtype.itemsize


def _part(obj: tifffile.TiffPage | tifffile.TiffPageSeries) -> _Part:
    return _Part(obj.asarray, obj.shape, obj.axes, obj.dtype or np.dtype(np.float64))


def _read_tiff(
    handle: BinaryIO,
    name: str,
    max_pixels: int,
    max_pages: int,
    memory: MemoryClaim | None,
    first_only: bool,
    working_bytes_per_pixel: int = WORKING_BYTES_PER_PIXEL,
) -> list[np.ndarray]:
    with tifffile.TiffFile(handle, name=name) as tif:
        if first_only:
            # Only the first page's tags are parsed, however many pages follow.
            pages = [tif.pages.first]
            parts = [_part(tif.pages.first)]
        else:
            _check_page_count(tif, name, max_pages)
            if tif.is_imagej:
                # ImageJ's description says how its planes are laid out (even past the page count).
                parts = [_part(tif.series[0])]
                pages = [p for p in tif.series[0].pages if isinstance(p, tifffile.TiffPage)]
            else:
                # Page by page, not tif.series: that compares every page with every other.
                pages = [p for p in tif.pages if isinstance(p, tifffile.TiffPage) and not p.is_reduced]
                parts = [_part(p) for p in pages]
        if not parts:
            raise ImageError(f"TIFF file '{name}' holds no image")
        for part in parts:
            if not part.axes.replace("S", "").endswith("YX"):
                raise ImageError(f"TIFF file '{name}' has no 2-D image plane (axes {part.axes})")
        # Shapes come from the tags: nothing is decoded before the whole count is known.
        pixels = sum(part.pixels(first_only) for part in parts)
        _check_pixels(name, pixels, max_pixels)
        size = _file_size(handle)
        for page in pages:
            _check_tiff_data(page, name, size)
        if memory is not None:
            decoded = sum(part.pixels(first_only) * part.bytes_per_pixel() for part in parts)
            largest = max(part.pixels(first_plane_only=True) for part in parts)
            memory.reserve(decoded + largest * working_bytes_per_pixel, f"image '{name}'")
        planes = [plane for part in parts for plane in _split_pages(part.read(), part.shape, part.axes)]
    return planes[:1] if first_only else planes


def _check_page_count(tif: tifffile.TiffFile, name: str, max_pages: int) -> None:
    """Refuse a TIFF of more than `max_pages` pages without parsing the pages beyond it."""
    try:
        tif.pages[max_pages]  # walks the chain of page offsets; parses only that one page
    except IndexError:
        return
    raise ImageError(
        f"TIFF file '{name}' has more than {max_pages:,} pages, over the limit of {max_pages:,} (PIPELINE_MAX_PAGES)"
    )


def _check_tiff_data(page: tifffile.TiffPage, name: str, file_size: int) -> None:
    """Every strip or tile of the page is in the file, and uncompressed data is large enough."""
    offsets, counts = page.dataoffsets, page.databytecounts
    height, width = page.imagelength, page.imagewidth
    if not counts or any(c <= 0 for c in counts):
        raise _incomplete(name, width, height, "some of its strips or tiles hold no data")
    if any(o + c > file_size for o, c in zip(offsets, counts, strict=False)):
        raise _incomplete(name, width, height, f"its data runs past the end of the file ({file_size:,} bytes)")
    if page.compression == 1:
        needed_bits = page.imagedepth * height * width * page.samplesperpixel * page.bitspersample
        if sum(counts) * 8 < needed_bits:
            raise _incomplete(name, width, height, f"holds only {sum(counts):,} bytes of uncompressed data")


def _split_pages(data: np.ndarray, shape: tuple[int, ...], axes: str) -> list[np.ndarray]:
    """Planes ...YX(S) of a tifffile array as HxW or HxWxC pages, samples last."""
    data = data.reshape(shape)
    plane_ndim = 2
    if "S" in axes:
        data = np.moveaxis(data, axes.index("S"), -1)
        plane_ndim = 3
    pages = data.reshape(-1, *data.shape[-plane_ndim:])
    return [np.ascontiguousarray(p[:, :, 0] if p.ndim == 3 and p.shape[2] == 1 else p) for p in pages]


def _open_pillow(handle: BinaryIO, name: str, kind: str, max_pixels: int) -> ImageFile.ImageFile:
    """Open a PNG, JPEG or BMP (header only), check its size against `max_pixels` and that the
    file holds enough data for that size."""
    image = _PILLOW_CLASSES[kind](handle)  # type: ignore[abstract]  # each class is a concrete plugin
    try:
        _check_pixels(name, image.width * image.height, max_pixels)
        size = _file_size(handle)
        if kind == "jpeg":
            _check_jpeg_data(handle, name, size, image.width, image.height)
        elif kind == "png":
            _check_png_data(handle, name, image.width, image.height)
    except ImageError:
        image.close()
        raise
    return image


def _reserve(memory: MemoryClaim | None, image: Image.Image, name: str, working_bytes_per_pixel: int) -> None:
    """Hold the budget for a Pillow image at the size it will decode to (after any draft)."""
    if memory is None:
        return
    pixels = image.width * image.height
    # Pillow keeps multi-band pixels in 4 bytes; the numpy copy is as large again.
    stored = 4 if len(image.getbands()) > 1 or image.mode in ("I", "F") else 2 if image.mode.startswith("I;16") else 1
    memory.reserve(pixels * (2 * stored + working_bytes_per_pixel), f"image '{name}'")


_SOF_BASELINE = {0xC0, 0xC1}  # Huffman, sequential: every block costs at least 2 bits (DC + EOB codes)
_SOF_PROGRESSIVE = {0xC2}  # Huffman, progressive: every block's DC code costs at least 1 bit


def _check_jpeg_data(handle: BinaryIO, name: str, file_size: int, width: int, height: int) -> None:
    """Refuse a JPEG whose coded data is too short for the blocks its header declares.

    Huffman coding spends at least one bit per 8x8 block (two for sequential JPEG), so a file
    with fewer bits after its first scan header than that cannot hold the image: libjpeg would
    fill the rest with gray without an error. Other codings (arithmetic, lossless) are not checked.
    """
    header = _jpeg_header(handle)
    handle.seek(0)
    if header is None:
        return
    marker, components, scan_start = header
    bits_per_block = 2 if marker in _SOF_BASELINE else 1 if marker in _SOF_PROGRESSIVE else 0
    if not bits_per_block or not components:
        return
    h_max = max(h for h, _ in components)
    v_max = max(v for _, v in components)
    blocks = sum(
        math.ceil(math.ceil(width * h / h_max) / 8) * math.ceil(math.ceil(height * v / v_max) / 8)
        for h, v in components
    )
    available = max(0, file_size - scan_start)
    if available * 8 < blocks * bits_per_block:
        needed = -(-blocks * bits_per_block // 8)
        raise _incomplete(
            name, width, height,
            f"holds only {available:,} bytes of coded data where that size needs at least {needed:,}",
        )


def _jpeg_header(handle: BinaryIO) -> tuple[int, list[tuple[int, int]], int] | None:
    """(SOF marker, (h, v) sampling of each component, offset of the first scan's data), or None."""
    handle.seek(2)
    marker = None
    components: list[tuple[int, int]] = []
    for _ in range(1000):
        byte = handle.read(1)
        while byte == b"\xff":
            byte = handle.read(1)
        if not byte:
            return None
        code = byte[0]
        if code == 0x01 or 0xD0 <= code <= 0xD8:
            continue
        length_bytes = handle.read(2)
        if len(length_bytes) < 2:
            return None
        length = int.from_bytes(length_bytes, "big")
        if length < 2:
            return None
        body = handle.read(length - 2)
        if code in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            marker = code
            count = body[5] if len(body) > 5 else 0
            components = [(body[6 + 3 * i + 1] >> 4, body[6 + 3 * i + 1] & 15) for i in range(count)
                          if len(body) >= 6 + 3 * i + 3]
            if any(h == 0 or v == 0 for h, v in components):
                return None
        elif code == 0xDA:
            return (marker, components, handle.tell()) if marker is not None else None
        elif code == 0xD9 or code < 0xC0:  # the end before any scan, or not a marker at all
            return None
    return None


def _check_png_data(handle: BinaryIO, name: str, width: int, height: int) -> None:
    """Refuse a PNG whose compressed data could not expand to its declared size.

    Deflate expands at most about 1032-fold, so fewer compressed bytes than a 1032nd of the
    filtered image cannot hold it."""
    handle.seek(8)
    compressed = 0
    bits = channels = 0
    for _ in range(1_000_000):
        head = handle.read(8)
        if len(head) < 8:
            break
        length, chunk = int.from_bytes(head[:4], "big"), head[4:]
        if chunk == b"IHDR":
            data = handle.read(length)
            if len(data) < 10:
                break
            bits, colour = data[8], data[9]
            channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 1)
            handle.seek(4, os.SEEK_CUR)
            continue
        if chunk == b"IDAT":
            compressed += length
        if chunk == b"IEND":
            break
        handle.seek(length + 4, os.SEEK_CUR)
    handle.seek(0)
    if not bits:
        return
    raw = height * (1 + math.ceil(width * channels * bits / 8))
    if compressed * 1032 < raw:
        raise _incomplete(name, width, height, f"holds only {compressed:,} bytes of compressed data")


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
    source: Source,
    *,
    size: tuple[int, int],
    resize_type: str = "standard",
    crop_fraction: float = 1.0,
    max_pixels: int,
    memory: MemoryClaim | None = None,
) -> np.ndarray:
    """The first page as HxWx3 uint8 (C-contiguous) of exactly `size` = (width, height).

    "standard" resizes the whole image to `size`; "crop" resizes so the short side becomes
    short/crop_fraction and takes the centre `size` (one bilinear resample of the centre box).
    Other depths are scaled by their real range as in `to_rgb8`. Only the first page of a TIFF
    is parsed, however many follow. Raises `ImageError` as `read_pages` does, and ValueError
    for an invalid size, resize_type or crop_fraction.
    """
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (width, height) of at least 1 pixel, got {size}")
    size = (int(size[0]), int(size[1]))
    if resize_type not in _RESIZE_TYPES:
        raise ValueError(f"resize_type must be 'standard' or 'crop', got {resize_type!r}")
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    crop = crop_fraction if resize_type == "crop" else None
    with _opened(source) as (handle, name):
        kind = _kind(handle, name)
        with _decoding(name):
            if kind == "tiff":
                [page] = _read_tiff(handle, name, max_pixels, 1, memory, first_only=True)
                return _fit_array(page, size, crop)
            if kind == "jpeg":
                pixels = _load_jpeg_rgb(handle, name, size, crop, max_pixels, memory)
                if pixels is not None:
                    return pixels
            with _open_pillow(handle, name, kind, max_pixels) as image:
                if kind == "jpeg":
                    _draft_jpeg(image, name, size, crop)
                _reserve(memory, image, name, WORKING_BYTES_PER_PIXEL)
                image.load()
                if image.mode in ("L", "RGB"):
                    return _fit(image, _source_box(image.width, image.height, size, crop), size)
                return _fit_array(_pillow_array(image), size, crop)


# JPEG files up to this size are read whole and decoded by simplejpeg; larger ones stream through Pillow.
_JPEG_IN_MEMORY = 64 << 20


def _load_jpeg_rgb(
    handle: BinaryIO, name: str, size: tuple[int, int], crop: float | None, max_pixels: int,
    memory: MemoryClaim | None,
) -> np.ndarray | None:
    """`load_rgb` of a JPEG with libjpeg-turbo's own scaled decoding (simplejpeg), or None to let
    Pillow read it: a file too large to hold, or colours turbojpeg does not turn into RGB (CMYK).

    Why not Pillow for every JPEG: on a 512x512 photo decoded at half scale, Pillow's open, draft
    and chunked load cost 1.2 ms of CPU against 0.8 ms here, and a classifier's whole job is about
    11 ms (measured with `python -m bench`, issue 10). The checks are the same as Pillow's path:
    the pixel count, coded data long enough for the declared size, the memory reservation."""
    if _file_size(handle) > _JPEG_IN_MEMORY:
        return None
    data = handle.read()
    handle.seek(0)
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None  # Pillow's reading names the problem
    if colorspace not in ("YCbCr", "Gray", "RGB"):
        return None
    _check_pixels(name, width * height, max_pixels)
    _check_jpeg_data(io.BytesIO(data), name, len(data), width, height)
    step = _jpeg_scale(_reduction(_source_box(width, height, size, crop), size))
    decoded_w, decoded_h = math.ceil(width / step), math.ceil(height / step)
    if memory is not None:
        memory.reserve(decoded_w * decoded_h * (10 + WORKING_BYTES_PER_PIXEL), f"image '{name}'")
    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=decoded_w, min_height=decoded_h, strict=True)
    box = _source_box(pixels.shape[1], pixels.shape[0], size, crop)
    left, top = int(box[0]), int(box[1])
    if box == (left, top, left + size[0], top + size[1]):  # the crop is whole pixels: no resampling
        return np.ascontiguousarray(pixels[top:top + size[1], left:left + size[0]])
    return _fit(Image.fromarray(pixels), box, size)


def _jpeg_scale(reduction: float) -> int:
    """The JPEG decoder's reduction (1, 2, 4 or 8) that keeps at least the target size."""
    step = 1
    while step < 8 and step * 2 <= reduction:
        step *= 2
    return step


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


def _draft_jpeg(image: ImageFile.ImageFile, name: str, size: tuple[int, int], crop: float | None) -> None:
    """Let the JPEG decoder scale by 1/2, 1/4 or 1/8 while staying at least the target size.

    The decoder's scaling averages whole DCT blocks, so it is already a good anti-aliasing filter:
    a 512x512 photo for a 224 crop decodes at 256x256 (about 40% less time, same top-5)."""
    step = _jpeg_scale(_reduction(_source_box(image.width, image.height, size, crop), size))
    if step >= 2:
        full = image.size
        if image.draft("RGB", (math.ceil(image.width / step), math.ceil(image.height / step))):
            _log.debug("JPEG %s decoded at %s instead of %s", name, image.size, full)


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
        np.add(rows, planes[i:height:step, :width], out=rows)
    blocks = rows[:, 0:width:step].copy()
    for j in range(1, step):
        np.add(blocks, rows[:, j:width:step], out=blocks)
    return blocks


def _fit(image: Image.Image, box: Box, size: tuple[int, int]) -> np.ndarray:
    """Resample `box` of an "L" or "RGB" image to `size`: HxWx3 uint8, C-contiguous."""
    if image.size != size or box != (0.0, 0.0, float(image.width), float(image.height)):
        image = image.resize(size, Image.Resampling.BILINEAR, box=box, reducing_gap=_REDUCING_GAP)
    pixels = np.array(image)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, np.newaxis], 3, axis=2)
    return np.ascontiguousarray(pixels)
