"""Outputs AiCSD can show, through the real service: every listed file opens as an image in the
stand-in's file sender, named by its dotted Extension, in the folder exactly as the job sent it."""

from __future__ import annotations

import csv
import io
import json
import uuid

import numpy as np
import pytest
import tifffile

from devtools.synthetic_blobs import make_image

from .test_service import classify, job_body

pytestmark = pytest.mark.integration


def test_counting_job_in_a_symlinked_output_folder_is_reported_as_sent_and_every_file_is_viewable(
    service, aicsd, client, file_root
):
    linked = file_root / f"linked-{uuid.uuid4()}"
    linked.symlink_to(file_root / "output", target_is_directory=True)
    image = file_root / "input" / f"{uuid.uuid4()}.tiff"
    tifffile.imwrite(image, np.stack([make_image(s, bits=16, count=15, touching_pairs=0, size=160).pixels
                                      for s in (41, 42)]), photometric="minisblack")
    job, body = job_body(aicsd, image, linked, Model="cell-counter")
    response = classify(client, service, body)
    assert response.status_code == 200, response.text
    state = aicsd.wait_for_status(job.job_id, timeout=30)
    assert state.ended == "complete", state.file_sender_error or state.missing_files
    name = f"{image.stem}-counted.tiff"
    assert [(f["dirname"], f["name"], f["extension"]) for f in state.output_files] == [(str(linked), name, ".tiff")]
    assert state.viewable == [f"{image.stem}-counted.jpeg"]
    # The object table travels inside the listed image; the CSV beside it is not listed.
    results = json.loads(state.results)
    with tifffile.TiffFile(linked / name) as tif:
        rows = list(csv.DictReader(io.StringIO(tif.pages[0].description)))
    assert len(rows) == results["CellCount"] > 0
    assert (file_root / "output" / f"{image.stem}-counts.csv").is_file()


def test_classification_job_lists_no_files_and_completes(service, aicsd, client, file_root, photos):
    from .conftest import copy_into

    image = copy_into(file_root, photos["coffee"], f"{uuid.uuid4()}.png")
    job, body = job_body(aicsd, image, file_root / "output")
    assert classify(client, service, body).status_code == 200
    state = aicsd.wait_for_status(job.job_id, timeout=30)
    assert state.ended == "complete" and state.output_files == [] and state.viewable == []


def test_counting_pages_of_different_sizes_lists_one_viewable_tiff_with_a_page_each(service, aicsd, client, file_root):
    image = file_root / "input" / f"{uuid.uuid4()}.tiff"
    sizes = (160, 96)
    with tifffile.TiffWriter(image) as tif:
        for seed, size in zip((51, 52), sizes, strict=False):
            tif.write(make_image(seed, bits=16, count=8, touching_pairs=0, size=size).pixels)
    job, body = job_body(aicsd, image, file_root / "output", Model="cell-counter")
    response = classify(client, service, body)
    assert response.status_code == 200 and response.json()["Status"] == "PipelineComplete", response.text
    state = aicsd.wait_for_status(job.job_id, timeout=30)
    assert state.ended == "complete" and state.viewable == [f"{image.stem}-counted.jpeg"]
    with tifffile.TiffFile(file_root / "output" / f"{image.stem}-counted.tiff") as tif:
        assert [p.shape for p in tif.pages] == [(s, s, 3) for s in sizes]


def test_dir_name_keeps_the_output_folder_exactly_as_aicsd_spelled_it(service, aicsd, client, file_root, photos):
    import shutil

    image = file_root / "input" / f"{uuid.uuid4()}.png"
    shutil.copyfile(photos["coffee"], image)
    job = aicsd.new_job("ovms/cell-counter")
    spelled = f"{file_root}/output/"  # a trailing slash, as a person may type it in AiCSD
    body = {"InputFileLocation": str(image), "OutputFileFolder": spelled, "ModelParams": {"Brightness": "0"},
            "JobUpdateUrl": job.job_update_url, "PipelineStatusUrl": job.pipeline_status_url}
    update = client.post(f"{service.url}/classify", json=body).json()
    assert update["Status"] == "PipelineComplete", update["Results"]
    assert [f["DirName"] for f in update["OutputFiles"]] == [spelled]
