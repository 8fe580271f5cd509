"""The counting pipeline: accuracy on images with a known answer, parameters, flags, output files."""

from __future__ import annotations

import csv
import io
import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile

from aicsd.errors import ParameterError
from aicsd.job import ModelParams
from aicsd.logs import JobLog
from devtools.synthetic_blobs import make_image, match
from pipeline.base import OutputFolder, PipelineTask
from pipeline.counting import CountingParams, CountingPipeline, _gray, page_quality
from pipeline.model_repository import ModelRepository
from pipeline.output_files import publish_together

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def counter(efficientnet_dir) -> CountingPipeline:
    from model_builders.cell_counter import write_cell_counter

    write_cell_counter(REPO / "models" / "cell-counter" / "1")
    model = ModelRepository(REPO / "models", cache_dir=None).get("cell-counter")
    return CountingPipeline(model, max_pixels=100_000_000)


def run(counter: CountingPipeline, image: Path, output: Path, **params: str):
    with PipelineTask.local(image, output, ModelParams(params), JobLog(logging.getLogger("test"), "j", "t")) as task:
        return counter.run(task)


def detect(counter: CountingPipeline, pixels: np.ndarray, **params: str):
    gray = _gray(pixels)
    chosen = CountingParams.from_params(ModelParams(params), counter.model.info)
    return counter.detect(pixels, gray, page_quality(pixels, gray), chosen, 1)


def test_count_is_within_5_percent_on_synthetic_fluorescence_next_to_scikit_image(counter, capsys):
    from skimage.feature import blob_log

    rows = []
    for bits in (8, 16):
        for seed in (11, 12, 13):
            image = make_image(seed, bits=bits, count=150, touching_pairs=15)
            blobs = detect(counter, image.pixels)
            ours = match(image, np.array([(b.x, b.y) for b in blobs]))
            low, high = np.percentile(image.pixels, [0.5, 99.9])
            reference = blob_log((image.pixels - low) / (high - low), min_sigma=1.5, max_sigma=8, num_sigma=10,
                                 threshold=0.05)
            theirs = match(image, reference[:, [1, 0]])
            rows.append((bits, seed, len(image.centres), len(blobs), *ours, len(reference), *theirs))
    with capsys.disabled():
        print("\n  bits seed truth | ours: count precision recall | skimage blob_log: count precision recall")
        for bits, seed, truth, count, p, r, ref, rp, rr in rows:
            print(f"  {bits:>4} {seed:>4} {truth:>5} | {count:>11} {p:>9.3f} {r:>6.3f} | {ref:>22} {rp:>9.3f} {rr:>6.3f}")
    for bits, seed, truth, count, precision, recall, *_ in rows:
        assert abs(count - truth) <= 0.05 * truth, (bits, seed, count, truth)
        assert precision >= 0.95 and recall >= 0.95, (bits, seed, precision, recall)


def test_dark_blobs_on_a_bright_background_are_counted_with_polarity_dark(counter):
    image = make_image(5, bits=16, count=60, touching_pairs=0)
    inverted = (65535 - image.pixels.astype(np.int64)).astype(np.uint16) - 50000
    assert len(detect(counter, inverted, Polarity="dark")) == pytest.approx(60, abs=3)
    assert abs(len(detect(counter, inverted)) - 60) > 6  # bright mode counts the gaps instead


def test_diameter_range_selects_blob_sizes(counter):
    yy, xx = np.mgrid[:200, :200]
    pixels = np.zeros((200, 200), np.float32)
    for (x, y, sigma) in [(50, 50, 2.0), (150, 150, 8.0)]:
        pixels += 1000 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    pixels = pixels.astype(np.uint16)
    sizes = sorted(round(b.diameter) for b in detect(counter, pixels))
    assert len(sizes) == 2 and sizes[0] < 10 < sizes[1]
    assert [round(b.x) for b in detect(counter, pixels, MaxDiameter="10")] == [50]
    assert [round(b.x) for b in detect(counter, pixels, MinDiameter="12")] == [150]


@pytest.mark.parametrize(
    "params, key",
    [
        ({"MinDiameter": "small"}, "MinDiameter"),
        ({"MinDiameter": "0"}, "MinDiameter"),
        ({"MinDiameter": "20", "MaxDiameter": "10"}, "MaxDiameter"),
        ({"Threshold": "2"}, "Threshold"),
        ({"Threshold": "-0.1"}, "Threshold"),
        ({"Polarity": "grey"}, "Polarity"),
    ],
)
def test_bad_parameters_are_refused_naming_the_key(counter, params, key):
    with pytest.raises(ParameterError, match=f"ModelParams {key}:"):
        CountingParams.from_params(ModelParams(params), counter.model.info)


def test_multi_page_16_bit_tiff_counts_every_page_and_lists_only_the_annotated_tiff(counter, tmp_path):
    pages = [make_image(seed, bits=16, count=n, touching_pairs=2, size=256).pixels for seed, n in ((1, 20), (2, 30))]
    image = tmp_path / "stack.tiff"
    tifffile.imwrite(image, np.stack(pages), photometric="minisblack")
    outcome = run(counter, image, tmp_path)
    results = json.loads(outcome.results)
    assert next(iter(results)) == "CellCount"
    assert results["Pages"] == [pytest.approx(20, abs=1), pytest.approx(30, abs=1)]
    assert results["CellCount"] == sum(results["Pages"])
    assert outcome.qc_flags == ""
    assert [(f.dir_name, f.name, f.extension) for f in outcome.output_files] == [
        (str(tmp_path), "stack-counted.tiff", ".tiff")
    ]
    with tifffile.TiffFile(tmp_path / "stack-counted.tiff") as tif:
        assert [p.shape for p in tif.pages] == [(256, 256, 3)] * 2 and tif.pages[0].dtype == np.uint8
        rows = list(csv.DictReader(io.StringIO(tif.pages[0].description)))
    assert len(rows) == results["CellCount"] and list(rows[0]) == ["page", "x", "y", "diameter", "intensity"]
    assert {r["page"] for r in rows} == {"1", "2"}
    # The same table, unlisted, beside the image.
    with (tmp_path / "stack-counts.csv").open() as handle:
        assert list(csv.DictReader(handle)) == rows
    assert not list(tmp_path.glob(".*partial"))


def test_pages_of_different_sizes_are_all_counted_and_annotated_at_their_own_size(counter, tmp_path):
    sizes = (256, 192)
    image = tmp_path / "mixed.tiff"
    with tifffile.TiffWriter(image) as tif:
        for seed, size in zip((31, 32), sizes, strict=False):
            tif.write(make_image(seed, bits=16, count=12, touching_pairs=0, size=size).pixels)
    outcome = run(counter, image, tmp_path)
    assert outcome.status == "PipelineComplete", outcome.results
    results = json.loads(outcome.results)
    assert results["Pages"] == [pytest.approx(12, abs=1)] * 2
    with tifffile.TiffFile(tmp_path / "mixed-counted.tiff") as tif:
        assert [p.shape for p in tif.pages] == [(s, s, 3) for s in sizes]


def test_existing_output_files_are_never_overwritten(counter, tmp_path):
    image = tmp_path / "cells.png"
    from PIL import Image

    Image.fromarray(make_image(3, bits=8, count=10, touching_pairs=0, size=128).pixels).save(image)
    (tmp_path / "cells-counted.tiff").write_bytes(b"precious")
    first = run(counter, image, tmp_path)
    second = run(counter, image, tmp_path)
    assert [f.name for f in first.output_files] == ["cells-counted-1.tiff"]
    assert [f.name for f in second.output_files] == ["cells-counted-2.tiff"]
    assert (tmp_path / "cells-counts-1.csv").is_file() and (tmp_path / "cells-counts-2.csv").is_file()
    assert (tmp_path / "cells-counted.tiff").read_bytes() == b"precious"


def test_concurrent_writers_of_the_same_names_get_different_files(tmp_path):
    results: list[list[str]] = []

    def write() -> None:
        folder = OutputFolder.open(tmp_path)
        try:
            results.append(publish_together(folder, [("a-counted.tiff", lambda h: h.write(b"x")),
                                                      ("a-counts.csv", lambda h: h.write(b"y"))]))
        finally:
            folder.close()

    threads = [threading.Thread(target=write) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    names = [name for names in results for name in names]
    assert len(names) == 16 and len(set(names)) == 16


@pytest.mark.parametrize(
    "kind, flags",
    [("blank", "LowContrast,NoObjects"), ("saturated", "Saturated"), ("noise", "LowContrast")],
)
def test_quality_flags(counter, tmp_path, kind, flags):
    rng = np.random.default_rng(0)
    if kind == "blank":
        pixels = np.full((128, 128), 500, np.uint16)
    elif kind == "noise":
        pixels = rng.normal(1000, 20, (128, 128)).astype(np.uint16)
    else:
        pixels = make_image(4, bits=16, count=20, touching_pairs=0, size=128).pixels
        pixels[:20, :20] = 65535
    image = tmp_path / f"{kind}.tiff"
    tifffile.imwrite(image, pixels)
    outcome = run(counter, image, tmp_path)
    assert outcome.qc_flags.startswith(flags)
    if "NoObjects" in flags:
        assert json.loads(outcome.results)["CellCount"] == 0


def test_tiny_image_is_padded_rather_than_refused(counter, tmp_path):
    pixels = np.zeros((20, 30), np.uint8)
    pixels[8:12, 14:18] = 200
    assert len(detect(counter, pixels)) == 1
