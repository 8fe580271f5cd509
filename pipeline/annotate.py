"""Annotated pictures of a pipeline's findings, for AiCSD's viewer: boxes, masks and points on the image.

Drawn on the job's image as 8-bit RGB and written as PNG (an image AiCSD's file sender opens and
converts for its UI). Colours come from a fixed palette indexed by class, so one class has one
colour in every picture.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["Box", "Drawing", "Point", "colour", "render", "write_png"]

_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
)
MASK_OPACITY = 0.45


def colour(index: int) -> tuple[int, int, int]:
    return _PALETTE[index % len(_PALETTE)]


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in image pixels with the class it belongs to and its caption."""

    x1: float
    y1: float
    x2: float
    y2: float
    label_index: int
    caption: str


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    label_index: int


@dataclass
class Drawing:
    """What to draw: a class map (0 = nothing) tinted by class, boxes and points."""

    class_map: np.ndarray | None = None
    boxes: Sequence[Box] = ()
    points: Sequence[Point] = field(default_factory=tuple)


def render(rgb: np.ndarray, drawing: Drawing) -> Image.Image:
    """The HxWx3 uint8 image with `drawing` on it."""
    pixels = rgb.astype(np.float32)
    if drawing.class_map is not None and drawing.class_map.shape == rgb.shape[:2]:
        table = np.array([(0, 0, 0)] + [colour(i) for i in range(1, int(drawing.class_map.max(initial=0)) + 1)],
                         np.float32)
        tint = drawing.class_map > 0
        pixels[tint] = pixels[tint] * (1 - MASK_OPACITY) + table[drawing.class_map[tint]] * MASK_OPACITY
    image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    width = max(1, round(min(image.size) / 300))
    for box in drawing.boxes:
        shade = colour(box.label_index)
        draw.rectangle((box.x1, box.y1, box.x2, box.y2), outline=shade, width=width)
        if box.caption:
            left, top = box.x1, max(0.0, box.y1 - 11)
            draw.rectangle(draw.textbbox((left, top), box.caption), fill=shade)
            draw.text((left, top), box.caption, fill=(0, 0, 0))
    radius = max(2, width * 2)
    for point in drawing.points:
        draw.ellipse((point.x - radius, point.y - radius, point.x + radius, point.y + radius),
                     fill=colour(point.label_index))
    return image


def write_png(image: Image.Image) -> Callable[[BinaryIO], None]:
    """A writer for `publish_together`: the image as PNG into the handle it is given."""

    def write(handle: BinaryIO) -> None:
        image.save(handle, format="PNG", compress_level=1)

    return write
