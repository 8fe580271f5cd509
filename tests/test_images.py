"""Reading input images: every format AiCSD instruments produce, and clear errors for the rest."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from pipeline.errors import ImageError
from pipeline.images import load_rgb, read_pages, to_rgb8

LIMIT = 100_000_000


def gradient(h: int = 40, w: int = 60, dtype=np.uint8, top: int = 255) -> np.ndarray:
    return (np.linspace(0, top, h * w).reshape(h, w)).astype(dtype)


@pytest.mark.parametrize("dtype, top", [(np.uint8, 255), (np.uint16, 65535)])
def test_grayscale_tiff_keeps_its_depth(tmp_path, dtype, top):
    path = tmp_path / "g.tiff"
    tifffile.imwrite(path, gradient(dtype=dtype, top=top))
    [page] = read_pages(path, max_pixels=LIMIT)
    assert page.dtype == dtype and page.shape == (40, 60) and page.max() == top


@pytest.mark.parametrize("channels", [3, 4])
def test_rgb_and_rgba_tiff_read_as_h_w_c(tmp_path, channels):
    path = tmp_path / "c.tiff"
    data = np.random.default_rng(1).integers(0, 255, (20, 30, channels), dtype=np.uint8)
    tifffile.imwrite(path, data, photometric="rgb", extrasamples=["unassalpha"] if channels == 4 else None)
    [page] = read_pages(path, max_pixels=LIMIT)
    np.testing.assert_array_equal(page, data)
    assert to_rgb8(page).shape == (20, 30, 3)


def test_planar_rgb_tiff_is_returned_channels_last(tmp_path):
    path = tmp_path / "planar.tiff"
    data = np.random.default_rng(2).integers(0, 255, (3, 20, 30), dtype=np.uint8)
    tifffile.imwrite(path, data, photometric="rgb", planarconfig="separate")
    [page] = read_pages(path, max_pixels=LIMIT)
    np.testing.assert_array_equal(page, np.moveaxis(data, 0, -1))


def test_multi_page_tiff_gives_every_page_and_first_only_gives_one(tmp_path):
    path = tmp_path / "stack.tiff"
    stack = np.stack([gradient(dtype=np.uint16) + i for i in range(3)])
    tifffile.imwrite(path, stack, photometric="minisblack")
    pages = read_pages(path, max_pixels=LIMIT)
    assert len(pages) == 3 and all(p.shape == (40, 60) for p in pages)
    assert pages[2][0, 0] == 2
    [first] = read_pages(path, max_pixels=LIMIT, first_only=True)
    np.testing.assert_array_equal(first, stack[0])


def test_separately_written_pages_are_all_read(tmp_path):
    path = tmp_path / "pages.tiff"
    with tifffile.TiffWriter(path) as tif:
        tif.write(gradient())
        tif.write(gradient(20, 20))
    pages = read_pages(path, max_pixels=LIMIT)
    assert [p.shape for p in pages][0] == (40, 60)


def test_16_bit_is_scaled_by_its_real_range_not_truncated():
    data = np.array([[1000, 1100], [1200, 1255]], np.uint16)
    rgb = to_rgb8(data)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0] == 0 and rgb[1, 1, 0] == 255 and rgb[0, 1, 0] == 100


def test_constant_image_becomes_zeros_without_nan():
    assert not to_rgb8(np.full((4, 4), 777, np.uint16)).any()


def test_float_image_with_nan_is_scaled():
    data = np.array([[0.0, np.nan], [0.5, 1.0]], np.float32)
    rgb = to_rgb8(data)
    assert rgb[1, 1, 0] == 255 and rgb[0, 0, 0] == 0


def test_16_bit_png_is_read_with_its_depth(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(gradient(dtype=np.uint16, top=60000)).save(path)
    [page] = read_pages(path, max_pixels=LIMIT)
    assert page.dtype == np.uint16 and page.max() == 60000


@pytest.mark.parametrize("fmt, suffix", [("JPEG", ".jpg"), ("BMP", ".bmp"), ("PNG", ".png")])
def test_pillow_formats_read_as_rgb(tmp_path, fmt, suffix):
    path = tmp_path / f"c{suffix}"
    Image.fromarray(np.full((16, 24, 3), (200, 100, 50), np.uint8)).save(path, fmt)
    [page] = read_pages(path, max_pixels=LIMIT)
    assert page.shape == (16, 24, 3)
    assert abs(int(page[8, 12, 0]) - 200) < 4


def test_png_named_tiff_is_read_by_its_signature(tmp_path):
    path = tmp_path / "really-png.tiff"
    Image.fromarray(gradient()).save(path, "PNG")
    assert read_pages(path, max_pixels=LIMIT)[0].shape == (40, 60)


def test_text_file_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "notes.tiff"
    path.write_text("not an image at all")
    with pytest.raises(ImageError, match="'notes.tiff' is not a TIFF, JPEG, PNG or BMP"):
        read_pages(path, max_pixels=LIMIT)


@pytest.mark.parametrize("fmt", ["tiff", "png", "jpeg"])
def test_truncated_image_is_an_image_error(tmp_path, fmt):
    path = tmp_path / f"cut.{fmt}"
    full = tmp_path / f"full.{fmt}"
    data = np.random.default_rng(3).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    if fmt == "tiff":
        tifffile.imwrite(full, data, photometric="rgb")
    else:
        Image.fromarray(data).save(full, fmt.upper())
    path.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 3])
    with pytest.raises(ImageError, match="cut"):
        read_pages(path, max_pixels=LIMIT)
    with pytest.raises(ImageError, match="cut"):
        load_rgb(path, size=(32, 32), max_pixels=LIMIT)


def test_missing_file_is_an_image_error(tmp_path):
    with pytest.raises(ImageError, match="cannot be opened"):
        read_pages(tmp_path / "absent.png", max_pixels=LIMIT)


def test_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path):
    # A 30000x30000 16-bit page (1.8 GB decoded) stored sparsely: only the header is read.
    path = tmp_path / "huge.tiff"
    tifffile.imwrite(path, shape=(30000, 30000), dtype=np.uint16)
    with pytest.raises(ImageError, match=r"900,000,000 pixels, over the limit of 100,000,000"):
        read_pages(path, max_pixels=LIMIT)


def test_pages_together_count_against_the_limit(tmp_path):
    path = tmp_path / "stack.tiff"
    tifffile.imwrite(path, np.zeros((4, 10, 10), np.uint8), photometric="minisblack")
    with pytest.raises(ImageError, match="400 pixels"):
        read_pages(path, max_pixels=399)
    assert len(read_pages(path, max_pixels=399, first_only=True)) == 1


def test_pillow_image_over_the_limit_is_refused(tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(path)
    with pytest.raises(ImageError, match="PIPELINE_MAX_PIXELS"):
        load_rgb(path, size=(10, 10), max_pixels=9999)


def test_pillow_own_bomb_limit_does_not_override_ours(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    path = tmp_path / "ok.png"
    Image.fromarray(np.zeros((50, 50), np.uint8)).save(path)
    assert read_pages(path, max_pixels=LIMIT)[0].shape == (50, 50)
    assert Image.MAX_IMAGE_PIXELS == 100


@pytest.mark.parametrize("resize_type, fraction", [("standard", 1.0), ("crop", 0.875)])
def test_load_rgb_gives_exactly_the_model_size(tmp_path, resize_type, fraction):
    path = tmp_path / "wide.tiff"
    tifffile.imwrite(path, gradient(300, 500, np.uint16, 4000))
    out = load_rgb(path, size=(224, 200), resize_type=resize_type, crop_fraction=fraction, max_pixels=LIMIT)
    assert out.shape == (200, 224, 3) and out.dtype == np.uint8 and out.flags.c_contiguous


def test_crop_keeps_the_centre_of_the_image(tmp_path):
    # Left third black, middle white, right third black: a centre crop of a wide image is all white.
    data = np.zeros((300, 900, 3), np.uint8)
    data[:, 300:600] = 255
    path = tmp_path / "bars.png"
    Image.fromarray(data).save(path)
    out = load_rgb(path, size=(64, 64), resize_type="crop", crop_fraction=0.875, max_pixels=LIMIT)
    assert out.min() == 255
    whole = load_rgb(path, size=(64, 64), resize_type="standard", max_pixels=LIMIT)
    assert whole[:, 0].max() == 0


def test_large_jpeg_is_decoded_at_reduced_size_with_the_same_result(tmp_path):
    from skimage import data

    big = Image.fromarray(data.chelsea()).resize((2400, 1800))
    path = tmp_path / "cat.jpg"
    big.save(path, quality=95)
    out = load_rgb(path, size=(224, 224), resize_type="crop", crop_fraction=0.875, max_pixels=LIMIT)
    reference = np.asarray(
        Image.open(path).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR, box=(412.5, 112.5, 1987.5, 1687.5))
    )
    assert out.shape == (224, 224, 3)
    assert np.abs(out.astype(int) - reference.astype(int)).mean() < 6


def test_large_16_bit_tiff_is_thinned_before_scaling_but_keeps_its_full_range(tmp_path):
    from skimage import data

    cat = np.asarray(Image.fromarray(data.chelsea()).resize((2048, 2048))).astype(np.uint16) * 100 + 500
    cat[1, 1] = 65535  # the real maximum sits on a pixel the thinning skips
    path = tmp_path / "cat16.tiff"
    tifffile.imwrite(path, cat, photometric="rgb")
    out = load_rgb(path, size=(224, 224), resize_type="crop", crop_fraction=0.875, max_pixels=LIMIT)
    full = np.asarray(
        Image.fromarray(to_rgb8(cat)).resize((224, 224), Image.Resampling.BILINEAR, box=(128, 128, 1920, 1920))
    )
    assert np.abs(out.astype(int) - full.astype(int)).mean() < 3
