"""Job files: checked once, opened once, used only through their descriptors.

A path swapped for a symbolic link in the middle of a job (after the check, after the open) must
not send a read or a write outside PIPELINE_FILE_ROOTS; paths no file can have get a clear reason.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import tifffile

import serving.files
from aicsd.errors import InputFileError
from aicsd.job import CallbackUrls, Job, ModelParams
from devtools.synthetic_blobs import make_image
from pipeline.model_repository import ModelRepository
from serving.files import open_input_file, open_output_folder
from serving.runner import PipelineRunner
from serving.settings import Settings

from .test_service import failed_job, job_body


@pytest.fixture
def places(tmp_path):
    """A file root with in/ and out/, and a folder outside it with the same layout and a decoy."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for base in (root, outside):
        (base / "in").mkdir(parents=True)
        (base / "out").mkdir()
    tifffile.imwrite(root / "in" / "cells.tiff", make_image(7, bits=16, count=10, touching_pairs=0, size=128).pixels)
    tifffile.imwrite(outside / "in" / "cells.tiff", make_image(8, bits=16, count=30, touching_pairs=0, size=128).pixels)
    return root, outside


def swap_for_link(folder: Path, target: Path) -> Path:
    """Move `folder` aside and put a symbolic link to `target` in its place; returns where it went."""
    moved = folder.with_name(folder.name + "-moved")
    folder.rename(moved)
    folder.symlink_to(target, target_is_directory=True)
    return moved


@pytest.fixture(scope="module")
def runner(built_models, tmp_path_factory):
    def make(root: Path, **env: str) -> PipelineRunner:
        settings = Settings.from_env(
            {"PIPELINE_MODELS_DIR": str(built_models), "PIPELINE_FILE_ROOTS": str(root), "PIPELINE_CACHE_DIR": "",
             **env}
        )
        return PipelineRunner(settings, repository)

    repository = ModelRepository(built_models, cache_dir=None)
    return make


def counting_job(input_file: Path, output_folder: Path) -> Job:
    job_id, task_id = str(uuid.uuid4()), str(uuid.uuid4())
    callbacks = CallbackUrls(job_id, task_id, f"http://127.0.0.1:9/api/v1/job/pipeline/{job_id}/{task_id}",
                             f"http://127.0.0.1:9/api/v1/pipelineStatus/{job_id}/{task_id}")
    return Job(callbacks, input_file, output_folder, ModelParams({"Model": "cell-counter"}), "")


def test_folders_swapped_for_links_mid_job_are_neither_read_nor_written_outside_the_roots(
    runner, places, monkeypatch
):
    root, outside = places
    import pipeline.counting

    real_read_pages = pipeline.counting.read_pages
    moved: dict[str, Path] = {}

    def swap_then_read(*args, **kwargs):
        # The job has checked and opened its files; now both folders become links out of the root.
        moved["in"] = swap_for_link(root / "in", outside / "in")
        moved["out"] = swap_for_link(root / "out", outside / "out")
        return real_read_pages(*args, **kwargs)

    monkeypatch.setattr(pipeline.counting, "read_pages", swap_then_read)
    outcome = runner(root).run(counting_job(root / "in" / "cells.tiff", root / "out"))
    assert outcome.status == "PipelineComplete", outcome.results
    assert moved, "the swap did not happen"
    # Read: the 10 blobs of the file that was opened, not the 30 of the decoy now at that path.
    assert json.loads(outcome.results)["CellCount"] == pytest.approx(10, abs=1)
    # Written: into the folder that was opened; nothing at all outside the root.
    assert sorted(p.name for p in (outside / "out").iterdir()) == []
    assert sorted(p.name for p in moved["out"].iterdir()) == ["cells-counted.tiff", "cells-counts.csv"]
    [listed] = outcome.output_files
    assert listed.dir_name == str(root / "out")


def test_runner_gives_image_memory_back_after_every_job_so_the_next_one_never_waits_for_it(runner, places):
    root, _ = places
    # Counting 128x128 16-bit costs about 3 MB: the 8 MB budget holds it, but not three of them at once.
    chosen = runner(root, PIPELINE_IMAGE_MEMORY_MB="8")
    outcomes = [chosen.run(counting_job(root / "in" / "cells.tiff", root / "out")) for _ in range(8)]
    assert [o.status for o in outcomes] == ["PipelineComplete"] * 8
    assert chosen.image_memory.used_bytes == 0


def test_job_whose_image_exceeds_the_whole_memory_budget_fails_with_that_reason(runner, places):
    root, _ = places
    tifffile.imwrite(root / "in" / "big.tiff", np.zeros((400, 400), np.uint16))
    chosen = runner(root, PIPELINE_IMAGE_MEMORY_MB="8")
    outcome = chosen.run(counting_job(root / "in" / "big.tiff", root / "out"))
    assert outcome.status == "PipelineFailed"
    # 160,000 pixels x (2 bytes decoded + 179 of the counter's scale space) = 27.6 MB
    assert outcome.results == ("image 'big.tiff' needs about 28 MB to process, more than the whole image memory "
                               "budget of 8 MB (PIPELINE_IMAGE_MEMORY_MB)")
    assert list((root / "out").iterdir()) == [] and chosen.image_memory.used_bytes == 0


def test_job_with_more_pages_than_allowed_fails_naming_the_setting(runner, places):
    root, _ = places
    tifffile.imwrite(root / "in" / "stack.tiff", np.zeros((5, 8, 8), np.uint8), photometric="minisblack")
    outcome = runner(root, PIPELINE_MAX_PAGES="4").run(counting_job(root / "in" / "stack.tiff", root / "out"))
    assert outcome.status == "PipelineFailed" and "has more than 4 pages" in outcome.results
    assert "PIPELINE_MAX_PAGES" in outcome.results


def checked_then_swapped(monkeypatch, folder: Path, target: Path) -> None:
    """Swap `folder` for a link to `target` right after the path check, before the open."""
    real = serving.files.resolve_inside

    def resolve_then_swap(*args, **kwargs):
        resolved = real(*args, **kwargs)
        swap_for_link(folder, target)
        return resolved

    monkeypatch.setattr(serving.files, "resolve_inside", resolve_then_swap)


def test_output_folder_swapped_for_a_link_between_check_and_open_is_refused(places, monkeypatch):
    root, outside = places
    checked_then_swapped(monkeypatch, root / "out", outside / "out")
    with pytest.raises(InputFileError, match="OutputFileFolder .* changed while it was being opened"):
        open_output_folder(root / "out", (root,))


@pytest.mark.parametrize(
    "field, opener, inside",
    [("InputFileLocation", open_input_file, "cells.tiff"), ("OutputFileFolder", open_output_folder, "sub")],
)
def test_parent_folder_swapped_for_a_link_between_check_and_open_is_refused(places, monkeypatch, field, opener, inside):
    root, outside = places
    for base in (root, outside):
        (base / "in" / "sub").mkdir()
    # The last part of the path stays real: only the opened object's own path shows the escape.
    checked_then_swapped(monkeypatch, root / "in", outside / "in")
    with pytest.raises(InputFileError, match=f"{field} .* is outside the allowed file roots"):
        opener(root / "in" / inside, (root,))


def test_opened_input_is_read_through_its_descriptor_after_the_file_is_replaced(places):
    root, outside = places
    from pipeline.images import read_pages

    path = root / "in" / "cells.tiff"
    expected = tifffile.imread(path)
    opened = open_input_file(path, (root,))
    try:
        path.unlink()
        path.symlink_to(outside / "in" / "cells.tiff")
        [page] = read_pages(opened, max_pixels=10**8)
    finally:
        opened.close()
    np.testing.assert_array_equal(page, expected)


@pytest.mark.parametrize("field, opener", [("InputFileLocation", open_input_file),
                                           ("OutputFileFolder", open_output_folder)])
@pytest.mark.parametrize(
    "bad, reason",
    [
        ("{root}/in/a\x00b.tiff", "contains a NUL byte"),
        ("{root}/in/\ud800.tiff", "holds characters no file path can hold"),
        ("in/cells.tiff", "must be an absolute path"),
        ("{root}/" + "x" * 300, "cannot be resolved: File name too long"),
    ],
    ids=["nul", "lone-surrogate", "relative", "too-long"],
)
def test_paths_no_file_can_have_get_a_clear_reason(places, field, opener, bad, reason):
    root, _ = places
    with pytest.raises(InputFileError, match=f"^{field} .*{reason}"):
        opener(Path(bad.format(root=root)), (root,))


def test_fifo_as_input_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.tiff"
    os.mkfifo(fifo)
    errors: list[Exception] = []

    def attempt(roots):
        try:
            open_input_file(fifo, roots)
        except InputFileError as exc:
            errors.append(exc)

    for roots in ((tmp_path,), None):
        thread = threading.Thread(target=attempt, args=(roots,), daemon=True)
        thread.start()
        thread.join(30)
        assert not thread.is_alive(), "opening a FIFO blocked"
    assert [str(e).endswith("is not a regular file") for e in errors] == [True, True]


def test_link_in_a_root_to_a_fifo_outside_is_refused_as_outside_without_opening_it(places):
    root, outside = places
    fifo = outside / "in" / "pipe.tiff"
    os.mkfifo(fifo)
    (root / "in" / "pipe.tiff").symlink_to(fifo)
    errors: list[Exception] = []

    def attempt():
        try:
            open_input_file(root / "in" / "pipe.tiff", (root,))
        except InputFileError as exc:
            errors.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "following the link opened the FIFO"
    [error] = errors
    assert "is outside the allowed file roots" in str(error)
    # Nothing ever opened the FIFO for reading: a writer that will not wait finds no reader.
    with pytest.raises(OSError) as no_reader:
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    assert no_reader.value.errno == errno.ENXIO


@pytest.mark.parametrize("field, opener", [("InputFileLocation", open_input_file),
                                           ("OutputFileFolder", open_output_folder)])
def test_link_loop_gets_a_clear_reason(places, field, opener):
    root, _ = places
    (root / "in" / "a").symlink_to(root / "in" / "b")
    (root / "in" / "b").symlink_to(root / "in" / "a")
    with pytest.raises(InputFileError, match=f"^{field} .*/in/a' cannot be resolved: Too many levels of symbolic links"):
        opener(root / "in" / "a", (root,))


@pytest.mark.parametrize("root_text", ["/", "{root}", "{root}/"])
def test_paths_inside_a_root_given_with_or_without_its_slash_are_inside(places, root_text):
    root, _ = places
    opened = open_input_file(root / "in" / "cells.tiff", (Path(root_text.format(root=root)),))
    opened.close()


def test_a_sibling_sharing_the_roots_name_as_prefix_is_outside(places, tmp_path):
    root, _ = places
    sibling = Path(f"{root}-sibling")
    sibling.mkdir()
    (sibling / "x.tiff").write_bytes((root / "in" / "cells.tiff").read_bytes())
    with pytest.raises(InputFileError, match="is outside the allowed file roots"):
        open_input_file(sibling / "x.tiff", (root,))


@pytest.mark.integration
@pytest.mark.parametrize("field", ["InputFileLocation", "OutputFileFolder"])
def test_a_nul_byte_in_a_path_fails_the_job_with_that_reason(service, aicsd, client, file_root, photos, field):
    from .conftest import copy_into

    image = copy_into(file_root, photos["chelsea"], f"{uuid.uuid4()}.png")
    job, body = job_body(aicsd, image, file_root / "output")
    body[field] = body[field] + "\x00.png"
    reason = failed_job(aicsd, client, service, body, job)
    assert reason.startswith(f"{field} contains a NUL byte")


@pytest.mark.integration
def test_jpeg_whose_header_claims_more_than_its_data_fails_the_job_as_incomplete(service, aicsd, client, file_root):
    import io
    import struct

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    struct.pack_into(">HH", data, data.find(b"\xff\xc0") + 5, 10000, 10000)
    image = file_root / "input" / f"{uuid.uuid4()}.jpg"
    image.write_bytes(bytes(data))
    job, body = job_body(aicsd, image, file_root / "output")
    reason = failed_job(aicsd, client, service, body, job)
    assert reason.startswith(f"image '{image.name}' is incomplete: it declares 10000x10000 pixels")
