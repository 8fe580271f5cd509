"""Reading input images: every format AiCSD instruments produce, and clear errors for the rest."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageFile, JpegImagePlugin

from aicsd.errors import ImageError
from pipeline import images
from pipeline.images import load_rgb, read_pages, to_rgb8

LIMIT = 100_000_000


def gradient(h: int = 40, w: int = 60, dtype=np.uint8, top: int = 255) -> np.ndarray:
    return np.linspace(0, top, h * w).reshape(h, w).astype(dtype)


def noise(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def chelsea(width: int, height: int) -> np.ndarray:
    from skimage import data

    return np.asarray(Image.fromarray(data.chelsea()).resize((width, height)))


# --- TIFF ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, top", [(np.uint8, 255), (np.uint16, 65535), (np.int16, 32000), (np.float32, 1.5)])
def test_grayscale_tiff_keeps_its_dtype_and_values(tmp_path, dtype, top):
    path = tmp_path / "g.tiff"
    data = gradient(dtype=dtype, top=top)
    tifffile.imwrite(path, data)
    [page] = read_pages(path, max_pixels=LIMIT)
    assert page.dtype == dtype and page.shape == (40, 60)
    np.testing.assert_array_equal(page, data)


@pytest.mark.parametrize("channels", [3, 4])
def test_rgb_and_rgba_tiff_read_as_h_w_c(tmp_path, channels):
    path = tmp_path / "c.tiff"
    data = noise((20, 30, channels))
    tifffile.imwrite(path, data, photometric="rgb", extrasamples=["unassalpha"] if channels == 4 else None)
    [page] = read_pages(path, max_pixels=LIMIT)
    np.testing.assert_array_equal(page, data)
    np.testing.assert_array_equal(to_rgb8(page), data[:, :, :3])


def test_16_bit_rgb_tiff_keeps_its_depth(tmp_path):
    path = tmp_path / "c16.tiff"
    data = noise((20, 30, 3)).astype(np.uint16) * 250
    tifffile.imwrite(path, data, photometric="rgb")
    [page] = read_pages(path, max_pixels=LIMIT)
    assert page.dtype == np.uint16
    np.testing.assert_array_equal(page, data)


def test_planar_rgb_tiff_is_returned_channels_last(tmp_path):
    path = tmp_path / "planar.tiff"
    data = noise((3, 20, 30), seed=2)
    tifffile.imwrite(path, data, photometric="rgb", planarconfig="separate")
    [page] = read_pages(path, max_pixels=LIMIT)
    np.testing.assert_array_equal(page, np.moveaxis(data, 0, -1))


def test_first_page_of_a_multi_page_planar_tiff_is_channels_last(tmp_path):
    path = tmp_path / "planar-stack.tiff"
    data = noise((2, 3, 20, 30), seed=3)
    tifffile.imwrite(path, data, photometric="rgb", planarconfig="separate")
    [first] = read_pages(path, max_pixels=LIMIT, first_only=True)
    np.testing.assert_array_equal(first, np.moveaxis(data[0], 0, -1))
    assert len(read_pages(path, max_pixels=LIMIT)) == 2


def test_multi_page_tiff_gives_every_page_and_first_only_gives_one(tmp_path):
    path = tmp_path / "stack.tiff"
    stack = np.stack([gradient(dtype=np.uint16) + i for i in range(3)])
    tifffile.imwrite(path, stack, photometric="minisblack")
    pages = read_pages(path, max_pixels=LIMIT)
    assert len(pages) == 3
    for page, expected in zip(pages, stack, strict=False):
        np.testing.assert_array_equal(page, expected)
    [first] = read_pages(path, max_pixels=LIMIT, first_only=True)
    np.testing.assert_array_equal(first, stack[0])


def test_pages_of_different_shapes_and_depths_are_all_read(tmp_path):
    path = tmp_path / "pages.tiff"
    with tifffile.TiffWriter(path) as tif:
        tif.write(gradient())
        tif.write(gradient(20, 20, np.uint16, 4000))
        tif.write(noise((10, 12, 3)), photometric="rgb")
    pages = read_pages(path, max_pixels=LIMIT)
    assert [(p.shape, p.dtype) for p in pages] == [
        ((40, 60), np.uint8),
        ((20, 20), np.uint16),
        ((10, 12, 3), np.uint8),
    ]
    assert len(read_pages(path, max_pixels=LIMIT, first_only=True)) == 1


@pytest.mark.parametrize("layout", ["imagej", "ome"])
def test_hyperstack_is_split_into_planes_in_file_order(tmp_path, layout):
    path = tmp_path / f"hyper.{layout}.tif"
    data = np.arange(2 * 3 * 10 * 12, dtype=np.uint16).reshape(2, 3, 10, 12)
    if layout == "imagej":
        tifffile.imwrite(path, data, imagej=True, metadata={"axes": "ZCYX"})
    else:
        tifffile.imwrite(path, data, ome=True, metadata={"axes": "TCYX"})
    pages = read_pages(path, max_pixels=LIMIT)
    assert len(pages) == 6
    np.testing.assert_array_equal(pages[4], data[1, 1])
    np.testing.assert_array_equal(read_pages(path, max_pixels=LIMIT, first_only=True)[0], data[0, 0])


def test_reduced_resolution_thumbnail_is_not_a_page(tmp_path):
    path = tmp_path / "thumb.tiff"
    with tifffile.TiffWriter(path) as tif:
        tif.write(gradient(64, 64))
        tif.write(gradient(16, 16), subfiletype=1)
    assert [p.shape for p in read_pages(path, max_pixels=LIMIT)] == [(64, 64)]


def test_gray_with_alpha_tiff_converts_to_gray_rgb(tmp_path):
    path = tmp_path / "ga.tiff"
    data = np.dstack([gradient(), np.full((40, 60), 255, np.uint8)])
    tifffile.imwrite(path, data, photometric="minisblack", extrasamples=["unassalpha"])
    [page] = read_pages(path, max_pixels=LIMIT)
    assert page.shape == (40, 60, 2)
    rgb = to_rgb8(page)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[:, :, channel], data[:, :, 0])


# --- conversion to 8-bit RGB ---------------------------------------------------------------------


def test_16_bit_is_scaled_by_its_real_range_not_truncated():
    data = np.array([[1000, 1100], [1200, 1255]], np.uint16)
    rgb = to_rgb8(data)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[1, 1].tolist() == [255, 255, 255]
    assert rgb[0, 1, 0] == 100 and rgb[1, 0, 0] == 200


def test_large_16_bit_page_scales_exactly_like_a_small_one():
    # Big uint16 pages go through a look-up table: it must give the same mapping.
    small = np.arange(2000, 5001, dtype=np.uint16).reshape(1, -1)
    large = np.tile(small, (30, 1))
    assert large.size > 65536 > small.size
    expected = to_rgb8(small)
    np.testing.assert_array_equal(to_rgb8(large), np.tile(expected, (30, 1, 1)))
    exact = np.round((small[0].astype(np.float64) - 2000) * 255 / 3000)
    assert np.abs(expected[0, :, 0] - exact).max() <= 1 and expected[0, 0, 0] == 0 and expected[0, -1, 0] == 255


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.float32])
def test_constant_image_becomes_zeros_without_nan(dtype):
    rgb = to_rgb8(np.full((300, 300), 777, dtype))
    assert rgb.shape == (300, 300, 3) and not rgb.any()


def test_signed_image_with_negative_values_is_scaled_by_its_range():
    rgb = to_rgb8(np.array([[-500, 0], [250, 500]], np.int16))
    assert rgb[:, :, 0].tolist() == [[0, 128], [191, 255]]


def test_float_image_with_nan_and_infinity_is_scaled_by_its_finite_values():
    data = np.array([[0.0, np.nan], [0.5, 1.0], [np.inf, -np.inf]], np.float32)
    rgb = to_rgb8(data)
    assert rgb[:, :, 0].tolist() == [[0, 0], [128, 255], [255, 0]]


def test_eight_bit_rgb_is_kept_as_is():
    data = noise((5, 6, 3))
    np.testing.assert_array_equal(to_rgb8(data), data)


def test_rgba_drops_alpha_and_gray_is_replicated():
    rgba = noise((5, 6, 4))
    np.testing.assert_array_equal(to_rgb8(rgba), rgba[:, :, :3])
    assert to_rgb8(rgba).flags.c_contiguous
    gray = noise((5, 6))
    np.testing.assert_array_equal(to_rgb8(gray), np.dstack([gray] * 3))


# --- Pillow formats ------------------------------------------------------------------------------


def test_16_bit_png_is_read_with_its_depth(tmp_path):
    path = tmp_path / "g16.png"
    data = gradient(dtype=np.uint16, top=60000)
    Image.fromarray(data).save(path)
    [page] = read_pages(path, max_pixels=LIMIT)
    assert page.dtype == np.uint16
    np.testing.assert_array_equal(page, data)


@pytest.mark.parametrize("fmt, suffix", [("JPEG", ".jpg"), ("BMP", ".bmp"), ("PNG", ".png")])
def test_pillow_formats_read_as_rgb(tmp_path, fmt, suffix):
    path = tmp_path / f"c{suffix}"
    Image.fromarray(np.full((16, 24, 3), (200, 100, 50), np.uint8)).save(path, fmt)
    [page] = read_pages(path, max_pixels=LIMIT)
    assert page.shape == (16, 24, 3) and page.dtype == np.uint8
    assert np.abs(page[8, 12].astype(int) - (200, 100, 50)).max() < 4


def test_grayscale_jpeg_reads_as_h_w(tmp_path):
    path = tmp_path / "g.jpg"
    Image.fromarray(np.full((16, 24), 90, np.uint8)).save(path)
    [page] = read_pages(path, max_pixels=LIMIT)
    assert page.shape == (16, 24) and abs(int(page[8, 12]) - 90) < 3


def test_palette_png_with_transparency_reads_as_rgba(tmp_path):
    path = tmp_path / "p.png"
    image = Image.new("P", (8, 6))
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.paste(1, (4, 0, 8, 6))
    image.save(path, transparency=0)
    [page] = read_pages(path, max_pixels=LIMIT)
    assert page.shape == (6, 8, 4)
    assert page[0, 0].tolist() == [10, 20, 30, 0] and page[0, 7].tolist() == [200, 100, 50, 255]


def test_palette_png_without_transparency_reads_as_rgb(tmp_path):
    path = tmp_path / "p.png"
    image = Image.new("P", (8, 6), 1)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.save(path)
    [page] = read_pages(path, max_pixels=LIMIT)
    assert page.shape == (6, 8, 3) and page[0, 0].tolist() == [200, 100, 50]


def test_gray_alpha_png_reads_as_rgba_and_converts_to_gray_rgb(tmp_path):
    path = tmp_path / "la.png"
    Image.fromarray(np.dstack([gradient(), np.full((40, 60), 128, np.uint8)]), "LA").save(path)
    [page] = read_pages(path, max_pixels=LIMIT)
    assert page.shape == (40, 60, 4)
    np.testing.assert_array_equal(to_rgb8(page), np.dstack([gradient()] * 3))


def test_cmyk_jpeg_reads_as_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("RGB", (16, 16), (200, 100, 50)).convert("CMYK").save(path)
    [page] = read_pages(path, max_pixels=LIMIT)
    assert page.shape == (16, 16, 3)
    assert np.abs(page[8, 8].astype(int) - (200, 100, 50)).max() < 8


def test_png_named_tiff_is_read_by_its_signature(tmp_path):
    path = tmp_path / "really-png.tiff"
    Image.fromarray(gradient()).save(path, "PNG")
    np.testing.assert_array_equal(read_pages(path, max_pixels=LIMIT)[0], gradient())


def test_tiff_named_jpg_is_read_by_its_signature(tmp_path):
    path = tmp_path / "really-tiff.jpg"
    tifffile.imwrite(path, gradient(dtype=np.uint16, top=5000))
    assert read_pages(path, max_pixels=LIMIT)[0].dtype == np.uint16


# --- errors --------------------------------------------------------------------------------------


def test_text_file_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "notes.tiff"
    path.write_text("not an image at all")
    with pytest.raises(ImageError, match="'notes.tiff' is not a TIFF, JPEG, PNG or BMP image"):
        read_pages(path, max_pixels=LIMIT)
    with pytest.raises(ImageError, match="'notes.tiff' is not a TIFF, JPEG, PNG or BMP image"):
        load_rgb(path, size=(32, 32), max_pixels=LIMIT)


def test_empty_file_is_refused_as_empty(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="'empty.png' is empty"):
        read_pages(path, max_pixels=LIMIT)


@pytest.mark.parametrize("fmt", ["tiff", "png", "jpeg", "bmp"])
@pytest.mark.parametrize("kept", [3, 50])
def test_truncated_image_is_an_image_error_naming_the_file(tmp_path, fmt, kept):
    full = tmp_path / f"full.{fmt}"
    data = noise((200, 200, 3), seed=4)
    if fmt == "tiff":
        tifffile.imwrite(full, data, photometric="rgb")
    else:
        Image.fromarray(data).save(full, fmt.upper())
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(full.read_bytes()[: len(full.read_bytes()) * kept // 100])
    reason = f"'cut.{fmt}' (is not a readable image: |is incomplete: it declares 200x200 pixels)"
    with pytest.raises(ImageError, match=reason):
        read_pages(path, max_pixels=LIMIT)
    with pytest.raises(ImageError, match=reason):
        load_rgb(path, size=(32, 32), resize_type="crop", crop_fraction=0.875, max_pixels=LIMIT)


def test_truncated_compressed_tiff_is_an_image_error(tmp_path):
    full = tmp_path / "full.tiff"
    tifffile.imwrite(full, noise((200, 200)), compression="zlib")
    path = tmp_path / "cut.tiff"
    path.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    with pytest.raises(ImageError, match="'cut.tiff' is incomplete: .* its data runs past the end of the file"):
        read_pages(path, max_pixels=LIMIT)


def test_missing_file_and_directory_are_image_errors(tmp_path):
    with pytest.raises(ImageError, match="'absent.png' cannot be opened"):
        read_pages(tmp_path / "absent.png", max_pixels=LIMIT)
    with pytest.raises(ImageError, match="cannot be opened"):
        load_rgb(tmp_path, size=(8, 8), max_pixels=LIMIT)


@pytest.fixture
def no_decoding(monkeypatch):
    """Records any attempt to decode pixel data with tifffile, Pillow or simplejpeg (and makes it fail)."""
    calls: list[str] = []

    def refuse(name):
        def decode(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} decoded pixel data")

        return decode

    monkeypatch.setattr(tifffile.TiffPage, "asarray", refuse("TiffPage.asarray"))
    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", refuse("TiffPageSeries.asarray"))
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse("ImageFile.load"))
    monkeypatch.setattr(images.simplejpeg, "decode_jpeg", refuse("simplejpeg.decode_jpeg"))
    return calls


def test_tiff_over_the_pixel_limit_is_refused_before_decoding(tmp_path, no_decoding):
    # Tags of a 30000x30000 16-bit page (1.8 GB decoded) over a 200-byte strip: only the tags are read.
    path = tmp_path / "huge.tiff"
    tifffile.imwrite(path, np.zeros((10, 10), np.uint16), metadata=None)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        for name in ("ImageWidth", "ImageLength", "RowsPerStrip"):
            tif.pages[0].tags[name].overwrite(30000)
    assert path.stat().st_size < 1000
    message = r"image 'huge.tiff' has 900,000,000 pixels, over the limit of 100,000,000 \(PIPELINE_MAX_PIXELS\)"
    with pytest.raises(ImageError, match=message):
        read_pages(path, max_pixels=LIMIT)
    with pytest.raises(ImageError, match=message):
        load_rgb(path, size=(224, 224), max_pixels=LIMIT)
    assert no_decoding == []


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP"])
def test_pillow_image_over_the_limit_is_refused_before_decoding(tmp_path, fmt, no_decoding):
    path = tmp_path / "big.img"
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(path, fmt)
    with pytest.raises(ImageError, match="'big.img' has 10,000 pixels, over the limit of 9,999"):
        read_pages(path, max_pixels=9999)
    with pytest.raises(ImageError, match="PIPELINE_MAX_PIXELS"):
        load_rgb(path, size=(10, 10), max_pixels=9999)
    assert no_decoding == []


def test_pages_together_count_against_the_limit(tmp_path):
    path = tmp_path / "stack.tiff"
    tifffile.imwrite(path, np.zeros((4, 10, 10), np.uint8), photometric="minisblack")
    with pytest.raises(ImageError, match="'stack.tiff' has 400 pixels, over the limit of 399"):
        read_pages(path, max_pixels=399)
    assert len(read_pages(path, max_pixels=100, first_only=True)) == 1
    assert load_rgb(path, size=(5, 5), max_pixels=100).shape == (5, 5, 3)


def test_samples_do_not_count_as_pixels(tmp_path):
    path = tmp_path / "rgb.tiff"
    tifffile.imwrite(path, noise((10, 10, 3)), photometric="rgb")
    assert read_pages(path, max_pixels=100)[0].shape == (10, 10, 3)


@pytest.mark.parametrize("pillow_limit", [2000, 100], ids=["warning-zone", "error-zone"])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_pillow_own_bomb_limit_does_not_apply_and_is_left_alone(tmp_path, monkeypatch, pillow_limit, fmt):
    # 2500 pixels: over Pillow's limit (a warning, an error at twice the limit) but within ours.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
    path = tmp_path / "ok.img"
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(path, fmt)
    assert read_pages(path, max_pixels=LIMIT)[0].shape == (50, 50, 3)
    assert load_rgb(path, size=(20, 20), max_pixels=LIMIT).shape == (20, 20, 3)
    assert pillow_limit == Image.MAX_IMAGE_PIXELS


@pytest.mark.parametrize(
    "kwargs",
    [{"resize_type": "stretch"}, {"resize_type": "crop", "crop_fraction": 0}, {"crop_fraction": 1.5}, {"size": (0, 4)}],
)
def test_load_rgb_rejects_invalid_arguments(tmp_path, kwargs):
    path = tmp_path / "g.png"
    Image.fromarray(gradient()).save(path)
    with pytest.raises(ValueError):
        load_rgb(path, **{"size": (8, 8), "max_pixels": LIMIT, **kwargs})


# --- classifier input ----------------------------------------------------------------------------


@pytest.mark.parametrize("resize_type, fraction", [("standard", 1.0), ("crop", 0.875), ("crop", 0.5)])
@pytest.mark.parametrize(
    "name, write",
    [
        ("wide16.tiff", lambda p: tifffile.imwrite(p, gradient(300, 500, np.uint16, 4000))),
        ("tall8.tiff", lambda p: tifffile.imwrite(p, gradient(500, 300))),
        ("rgba.tiff", lambda p: tifffile.imwrite(p, noise((300, 500, 4)), photometric="rgb", extrasamples=[2])),
        ("big16.tiff", lambda p: tifffile.imwrite(p, gradient(1500, 1000, np.uint16, 60000))),
        ("wide.jpg", lambda p: Image.fromarray(noise((300, 500, 3))).save(p)),
        ("big.jpg", lambda p: Image.fromarray(noise((1500, 1000, 3))).save(p)),
        ("gray.png", lambda p: Image.fromarray(gradient(300, 500)).save(p)),
        ("g16.png", lambda p: Image.fromarray(gradient(300, 500, np.uint16, 4000)).save(p)),
        ("small.bmp", lambda p: Image.fromarray(noise((50, 70, 3))).save(p)),
    ],
)
def test_load_rgb_gives_exactly_the_model_size(tmp_path, name, write, resize_type, fraction):
    path = tmp_path / name
    write(path)
    out = load_rgb(path, size=(224, 200), resize_type=resize_type, crop_fraction=fraction, max_pixels=LIMIT)
    assert out.shape == (200, 224, 3) and out.dtype == np.uint8
    assert out.flags.c_contiguous and out.flags.writeable


def test_load_rgb_of_a_16_bit_image_spans_the_full_8_bit_range(tmp_path):
    path = tmp_path / "narrow16.tiff"
    data = np.zeros((64, 64), np.uint16) + 1000
    data[:, 32:] = 1255
    tifffile.imwrite(path, data)
    out = load_rgb(path, size=(16, 16), max_pixels=LIMIT)
    assert out[:, :6].max() == 0 and out[:, 10:].min() == 255


def wide_bars() -> np.ndarray:
    """300x900: red, green and blue thirds from left to right."""
    data = np.zeros((300, 900, 3), np.uint8)
    data[:, :300, 0] = data[:, 300:600, 1] = data[:, 600:, 2] = 255
    return data


@pytest.mark.parametrize("suffix", [".png", ".tiff"])
def test_crop_keeps_the_centre_of_a_wide_image_and_standard_keeps_all(tmp_path, suffix):
    path = tmp_path / f"bars{suffix}"
    Image.fromarray(wide_bars()).save(path)
    out = load_rgb(path, size=(64, 64), resize_type="crop", crop_fraction=0.875, max_pixels=LIMIT)
    assert (out == (0, 255, 0)).all()
    whole = load_rgb(path, size=(64, 64), resize_type="standard", max_pixels=LIMIT)
    assert (whole[:, :15] == (255, 0, 0)).all() and (whole[:, 28:36] == (0, 255, 0)).all()
    assert (whole[:, -15:] == (0, 0, 255)).all()


@pytest.mark.parametrize("suffix", [".png", ".tiff"])
def test_crop_keeps_the_orientation_of_the_image(tmp_path, suffix):
    # Quadrants: red top-left, green top-right, blue bottom-left, white bottom-right.
    data = np.zeros((400, 400, 3), np.uint8)
    data[:200, :200] = (255, 0, 0)
    data[:200, 200:] = (0, 255, 0)
    data[200:, :200] = (0, 0, 255)
    data[200:, 200:] = 255
    path = tmp_path / f"quadrants{suffix}"
    Image.fromarray(data).save(path)
    out = load_rgb(path, size=(32, 48), resize_type="crop", crop_fraction=0.875, max_pixels=LIMIT)
    assert out.shape == (48, 32, 3)
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, -1].tolist() == [0, 255, 0]
    assert out[-1, 0].tolist() == [0, 0, 255] and out[-1, -1].tolist() == [255, 255, 255]


def test_crop_matches_resize_short_side_then_centre_crop(tmp_path):
    data = chelsea(672, 448)
    path = tmp_path / "cat.png"
    Image.fromarray(data).save(path)
    out = load_rgb(path, size=(224, 224), resize_type="crop", crop_fraction=0.875, max_pixels=LIMIT)
    # Two steps: short side 448 -> 224 / 0.875 = 256 (long side 384), then the centre 224x224.
    resized = Image.fromarray(data).resize((384, 256), Image.Resampling.BILINEAR)
    reference = np.asarray(resized.crop((80, 16, 304, 240)))
    assert np.abs(out.astype(int) - reference.astype(int)).mean() < 3


def test_chelsea_jpeg_gives_a_224_rgb_image(tmp_path):
    from skimage import data

    path = tmp_path / "chelsea.jpg"
    Image.fromarray(data.chelsea()).save(path)
    out = load_rgb(path, size=(224, 224), resize_type="crop", crop_fraction=0.875, max_pixels=LIMIT)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # 451x300: short side 300 -> 256 is 1.171875 source pixels per output pixel; 224 of them span 262.5.
    with Image.open(path) as image:
        box = (94.25, 18.75, 356.75, 281.25)
        reference = np.asarray(image.resize((224, 224), Image.Resampling.BILINEAR, box=box))
    assert np.abs(out.astype(int) - reference.astype(int)).mean() < 2


def _large_cat_jpeg(tmp_path):
    path = tmp_path / "cat.jpg"
    Image.fromarray(chelsea(2400, 1800)).save(path, quality=95)
    with Image.open(path) as image:
        full = image.convert("RGB")
    return path, np.asarray(full.resize((224, 224), Image.Resampling.BILINEAR, box=(412.5, 112.5, 1987.5, 1687.5)))


def test_large_jpeg_is_decoded_at_reduced_size_by_libjpeg_turbo_with_the_same_result(tmp_path, monkeypatch):
    decoded = []
    original = images.simplejpeg.decode_jpeg

    def spy(data, **options):
        pixels = original(data, **options)
        decoded.append(pixels.shape)
        return pixels

    monkeypatch.setattr(images.simplejpeg, "decode_jpeg", spy)
    path, reference = _large_cat_jpeg(tmp_path)
    out = load_rgb(path, size=(224, 224), resize_type="crop", crop_fraction=0.875, max_pixels=LIMIT)
    assert decoded == [(450, 600, 3)]  # 1800/4 x 2400/4: still covers 224 for the 1575-pixel crop box
    assert out.shape == (224, 224, 3) and out.flags.c_contiguous
    assert np.abs(out.astype(int) - reference.astype(int)).mean() < 3


def test_jpeg_too_large_to_hold_in_memory_streams_through_pillow_at_reduced_size(tmp_path, monkeypatch):
    drafts = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        drafts.append(result)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    monkeypatch.setattr(images, "_JPEG_IN_MEMORY", 1000)
    path, reference = _large_cat_jpeg(tmp_path)
    out = load_rgb(path, size=(224, 224), resize_type="crop", crop_fraction=0.875, max_pixels=LIMIT)
    assert len(drafts) == 1 and drafts[0] is not None  # the decoder scaled the image down
    assert out.shape == (224, 224, 3)
    assert np.abs(out.astype(int) - reference.astype(int)).mean() < 3


def test_jpeg_whose_crop_is_whole_decoded_pixels_is_cut_out_without_resampling(tmp_path):
    pixels = chelsea(512, 512)
    path = tmp_path / "cat512.jpg"
    Image.fromarray(pixels).save(path, quality=95)
    out = load_rgb(path, size=(224, 224), resize_type="crop", crop_fraction=0.875, max_pixels=LIMIT)
    with Image.open(path) as image:
        image.draft("RGB", (256, 256))  # the same half-scale decode
        half = np.asarray(image.convert("RGB"))
    assert np.abs(out.astype(int) - half[16:240, 16:240].astype(int)).max() <= 1


def test_large_16_bit_tiff_matches_scaling_then_resizing_at_full_size(tmp_path):
    cat = chelsea(2048, 2048).astype(np.uint16) * 100 + 500
    cat[1, 1] = 65535  # the real maximum is a single pixel
    path = tmp_path / "cat16.tiff"
    tifffile.imwrite(path, cat, photometric="rgb")
    out = load_rgb(path, size=(224, 224), resize_type="crop", crop_fraction=0.875, max_pixels=LIMIT)
    full = Image.fromarray(to_rgb8(cat)).resize((224, 224), Image.Resampling.BILINEAR, box=(128, 128, 1920, 1920))
    assert np.abs(out.astype(int) - np.asarray(full).astype(int)).mean() < 1


def test_small_bright_features_of_a_large_16_bit_image_are_averaged_in_not_skipped(tmp_path):
    # One bright pixel in every 4x4 block, never on a multiple of 4: plain thinning would miss them all.
    data = np.zeros((2048, 2048), np.uint16)
    data[1::4, 2::4] = 60000
    path = tmp_path / "spots.tiff"
    tifffile.imwrite(path, data)
    out = load_rgb(path, size=(224, 224), resize_type="crop", crop_fraction=0.875, max_pixels=LIMIT)
    assert 14 <= out.min() <= out.max() <= 18  # each block averages to 1/16 of full brightness


def test_bilevel_tiff_reads_as_bool_and_converts_to_black_and_white(tmp_path):
    path = tmp_path / "mask.tiff"
    mask = gradient() > 127
    tifffile.imwrite(path, mask)
    [page] = read_pages(path, max_pixels=LIMIT)
    assert page.dtype == bool
    np.testing.assert_array_equal(to_rgb8(page)[:, :, 1], np.where(mask, 255, 0))


# --- image bombs: many pages, data that cannot fill the declared size, memory in flight ----------


@pytest.fixture(scope="module")
def many_pages(tmp_path_factory):
    """A TIFF of 3,000 1x1 pages of different widths (the shape that makes series detection slow)."""
    path = tmp_path_factory.mktemp("bombs") / "pages.tiff"
    with tifffile.TiffWriter(path) as tif:
        tif.write(noise((64, 64)), contiguous=False, metadata=None)
        for i in range(2999):
            tif.write(np.zeros((1, 1 + i % 7), np.uint8), contiguous=False, metadata=None)
    return path


@pytest.fixture
def pages_parsed(monkeypatch):
    """Counts the TIFF pages tifffile parses (each costs a TiffPage)."""
    count = [0]
    real = tifffile.TiffPage.__init__

    def counting(self, *args, **kwargs):
        count[0] += 1
        real(self, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffPage, "__init__", counting)
    return count


def test_classifying_a_tiff_of_thousands_of_pages_parses_only_the_first(many_pages, pages_parsed):
    out = load_rgb(many_pages, size=(16, 16), max_pixels=LIMIT)
    assert out.shape == (16, 16, 3)
    assert pages_parsed[0] == 1


def test_tiff_over_the_page_limit_is_refused_before_its_pages_are_parsed(many_pages, pages_parsed):
    with pytest.raises(ImageError, match=r"'pages.tiff' has more than 1,000 pages.*\(PIPELINE_MAX_PAGES\)"):
        read_pages(many_pages, max_pixels=LIMIT, max_pages=1000)
    assert pages_parsed[0] <= 2


def test_tiff_within_the_page_limit_gives_every_page(many_pages):
    pages = read_pages(many_pages, max_pixels=LIMIT, max_pages=3000)
    assert len(pages) == 3000 and pages[0].shape == (64, 64) and pages[7].shape == (1, 7)


def forged_jpeg(path, width, height, **save):
    """A real 64x64 JPEG whose frame header claims width x height."""
    import io
    import struct

    buffer = io.BytesIO()
    Image.fromarray(noise((64, 64, 3), seed=9)).save(buffer, "JPEG", **save)
    data = bytearray(buffer.getvalue())
    sof = max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))
    struct.pack_into(">HH", data, sof + 5, height, width)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_jpeg_whose_data_cannot_fill_its_declared_size_is_refused_before_decoding(tmp_path, no_decoding, progressive):
    path = forged_jpeg(tmp_path / "forged.jpg", 10000, 10000, progressive=progressive)
    reason = r"image 'forged.jpg' is incomplete: it declares 10000x10000 pixels but holds only [\d,]+ bytes of coded data"
    with pytest.raises(ImageError, match=reason):
        load_rgb(path, size=(224, 224), max_pixels=LIMIT)
    with pytest.raises(ImageError, match=reason):
        read_pages(path, max_pixels=LIMIT)
    assert no_decoding == []


@pytest.mark.parametrize("save", [{}, {"optimize": True}, {"progressive": True, "optimize": True}],
                         ids=["baseline", "optimized", "progressive"])
def test_large_flat_jpeg_that_compresses_to_almost_nothing_is_still_read(tmp_path, save):
    # As little coded data as a real encoder makes per block: the check must not refuse it.
    path = tmp_path / "flat.jpg"
    Image.new("RGB", (3000, 2000), (90, 90, 90)).save(path, "JPEG", quality=50, **save)
    assert read_pages(path, max_pixels=LIMIT)[0].shape == (2000, 3000, 3)


def test_png_whose_data_cannot_fill_its_declared_size_is_refused_before_decoding(tmp_path, no_decoding):
    import struct
    import zlib

    path = tmp_path / "forged.png"
    Image.fromarray(noise((64, 64, 3))).save(path)
    data = bytearray(path.read_bytes())
    struct.pack_into(">II", data, 16, 10000, 10000)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="'forged.png' is incomplete: it declares 10000x10000 pixels"):
        read_pages(path, max_pixels=LIMIT)
    assert no_decoding == []


def test_tiff_with_a_strip_that_holds_no_data_is_refused(tmp_path):
    path = tmp_path / "sparse.tiff"
    tifffile.imwrite(path, noise((64, 64)), rowsperstrip=16, metadata=None)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        counts = list(tif.pages[0].tags["StripByteCounts"].value)
        tif.pages[0].tags["StripByteCounts"].overwrite([*counts[:-1], 0])
    with pytest.raises(ImageError, match="'sparse.tiff' is incomplete: .* some of its strips or tiles hold no data"):
        read_pages(path, max_pixels=LIMIT)


def test_image_larger_than_the_whole_memory_budget_fails_with_that_reason(tmp_path, no_decoding):
    from pipeline.memory import MemoryBudget

    path = tmp_path / "big.tiff"
    tifffile.imwrite(path, np.zeros((1000, 1000), np.uint16))
    budget = MemoryBudget(4 << 20)
    with budget.claim() as claim, pytest.raises(
        ImageError, match=r"image 'big.tiff' needs about 10 MB to process, more than the whole image memory "
                          r"budget of 4 MB \(PIPELINE_IMAGE_MEMORY_MB\)"
    ):
        read_pages(path, max_pixels=LIMIT, memory=claim)
    assert no_decoding == [] and budget.used_bytes == 0


@pytest.mark.parametrize("in_memory", [True, False], ids=["simplejpeg", "pillow"])
def test_jpeg_whose_reduced_decode_exceeds_the_whole_memory_budget_fails_before_decoding(
    tmp_path, no_decoding, monkeypatch, in_memory
):
    from pipeline.memory import MemoryBudget

    if not in_memory:
        monkeypatch.setattr(images, "_JPEG_IN_MEMORY", 0)
    path = tmp_path / "big.jpg"
    pixels = np.random.default_rng(0).integers(0, 256, (2000, 2000, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)  # decoded at 1/8: 250x250
    budget = MemoryBudget(1 << 19)
    with budget.claim() as claim, pytest.raises(
        ImageError, match=r"image 'big.jpg' needs about \d+ MB to process, more than the whole image memory budget"
    ):
        load_rgb(path, size=(224, 224), max_pixels=LIMIT, memory=claim)
    assert no_decoding == [] and budget.used_bytes == 0


def test_jobs_wait_for_image_memory_so_only_what_fits_is_decoded_at_once(tmp_path, monkeypatch):
    """Four readers of an image whose cost fits the budget only once: never two decoding at once."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.memory import MemoryBudget

    path = tmp_path / "one.tiff"
    tifffile.imwrite(path, noise((500, 500)))
    cost = 500 * 500 * (1 + 8)
    budget = MemoryBudget(cost + cost // 2)
    active, peak, lock = [0], [0], threading.Lock()
    real = tifffile.TiffPage.asarray

    def tracked(self, *args, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return real(self, *args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(tifffile.TiffPage, "asarray", tracked)
    barrier = threading.Barrier(4)

    def job(_: int) -> int:
        barrier.wait(30)
        with budget.claim() as claim:
            pages = read_pages(path, max_pixels=LIMIT, memory=claim)
            assert budget.used_bytes <= budget.total_bytes
            # Hold the image a moment as a pipeline would, so the others must wait for it.
            return int(pages[0].sum() > 0)

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(job, range(4), timeout=60)) == [1, 1, 1, 1]
    assert peak[0] == 1 and budget.used_bytes == 0


def test_a_waiting_claim_is_served_when_memory_is_given_back_and_in_arrival_order():
    from pipeline.memory import MemoryBudget

    budget = MemoryBudget(100)
    order: list[str] = []
    first = budget.claim()
    first.reserve(80, "first")
    started = threading.Event()

    def later(name: str, nbytes: int) -> None:
        with budget.claim() as claim:
            started.set()
            claim.reserve(nbytes, name)
            order.append(name)

    big = threading.Thread(target=later, args=("big", 60))
    big.start()
    started.wait(10)
    while not budget._queue:  # the big one is queued
        threading.Event().wait(0.01)
    small = threading.Thread(target=later, args=("small", 10))
    small.start()
    while len(budget._queue) < 2:
        threading.Event().wait(0.01)
    # 10 bytes would fit now, but the small claim queues behind the big one.
    assert order == []
    first.release()
    big.join(10)
    small.join(10)
    assert order == ["big", "small"] and budget.used_bytes == 0
