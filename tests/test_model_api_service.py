"""Model API models through the real service: a model directory copied into the models folder of a
running `bentoml serve` becomes a pipeline, and AiCSD's stand-in gets its Results and picture.

The service here has its own models folder (empty at start), so that copying models into it
changes no other test's pipeline list.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from devtools.servers import Service, serve_bento, stop_process

from . import model_api_models as models
from .conftest import ARTIFACTS, REPO

pytestmark = pytest.mark.integration

RED, GREEN, YELLOW = (255, 0, 0), (0, 255, 0), (255, 255, 0)


@pytest.fixture(scope="module")
def model_api_service(tmp_path_factory: pytest.TempPathFactory, file_root: Path) -> Iterator[tuple[Service, Path]]:
    models_dir = tmp_path_factory.mktemp("model-api-service-models")
    ARTIFACTS.mkdir(exist_ok=True)
    env = {
        "PIPELINE_MODELS_DIR": str(models_dir),
        "PIPELINE_FILE_ROOTS": str(file_root),
        "PIPELINE_CALLBACK_HOSTS": "127.0.0.1,localhost",
        "PIPELINE_CALLBACK_BACKOFF": "0.05",
        "PIPELINE_CALLBACK_TIMEOUT": "5",
        "PIPELINE_CACHE_DIR": str(tmp_path_factory.mktemp("ov-cache-model-api")),
        "PIPELINE_LEDGER": str(tmp_path_factory.mktemp("ledger-model-api") / "ledger.sqlite3"),
    }
    # It starts with no model at all, so it is alive but not ready until the first one is copied in.
    running = serve_bento("service:AicsdPipeline", env=env, cwd=REPO, log_path=ARTIFACTS / "service-model-api.log",
                          wait_for="/livez")
    try:
        yield running, models_dir
    finally:
        stop_process(running.process)


def copy_model(service: Service, models_dir: Path, tmp_path: Path, name: str, write, *, loads: bool = True) -> None:
    """Build the model elsewhere, copy its directory into the served folder, as a person would,
    and wait until the service lists it as served (its watcher loads it within two looks)."""
    import time

    write(tmp_path / name / "1")
    shutil.copytree(tmp_path / name, models_dir / name)
    deadline = time.monotonic() + 90
    with httpx.Client(timeout=10, trust_env=False) as client:
        while True:
            listing = {p["id"]: p["description"] for p in client.get(f"{service.url}/api/v1/pipelines").json()}
            described = listing.get(f"ovms/{name}", "").split("; parameters: ")[0]
            if described == f"{name} version 1" or (not loads and "cannot be loaded" in described):
                return
            assert time.monotonic() < deadline, listing
            time.sleep(0.2)


def post_job(aicsd, service: Service, file_root: Path, pipeline: str, rgb: np.ndarray, **params: str):
    image = file_root / "input" / f"{uuid.uuid4()}.png"
    Image.fromarray(rgb).save(image)
    job = aicsd.new_job(f"ovms/{pipeline}")
    body = {
        "InputFileLocation": str(image),
        "OutputFileFolder": str(file_root / "output"),
        "ModelParams": {"Brightness": "0", **params},
        "JobUpdateUrl": job.job_update_url,
        "PipelineStatusUrl": job.pipeline_status_url,
        "GatewayIP": "127.0.0.1",
    }
    with httpx.Client(timeout=120, trust_env=False) as client:
        response = client.post(f"{service.url}/classify", json=body)
    assert response.status_code == 200, response.text
    aicsd.wait_for_status(job.job_id, timeout=30)
    put, post = aicsd.requests_for(job.job_id)
    assert (put.method, put.status_code, post.method, post.status_code) == ("PUT", 200, "POST", 200)
    return put.json, json.loads(put.json["Results"]) if put.json["Status"] == "PipelineComplete" else None


def assert_one_png_listed(update: dict, suffix: str) -> Image.Image:
    (listed,) = update["OutputFiles"]
    path = Path(listed["DirName"]) / listed["Name"]
    assert listed["Name"].endswith(f"-{suffix}.png") and path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.copy()


def test_a_copied_detection_model_returns_its_boxes_and_lists_an_annotated_image(
    model_api_service, aicsd, file_root, tmp_path
):
    service, models_dir = model_api_service
    copy_model(service, models_dir, tmp_path, "colour-boxes", models.write_detector)
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[4:20, 6:30] = RED
    rgb[30:50, 40:60] = GREEN
    update, results = post_job(aicsd, service, file_root, "colour-boxes", rgb)
    assert update["Status"] == "PipelineComplete" and update["QCFlags"] == ""
    assert results == {"Count": 2, "Objects": [{"Label": "red", "Score": 1.0, "Box": [6, 4, 30, 20]},
                                               {"Label": "green", "Score": 1.0, "Box": [40, 30, 60, 50]}],
                       "Model": "colour-boxes"}
    assert assert_one_png_listed(update, "detected").size == (64, 64)


def test_a_copied_segmentation_model_returns_class_areas_and_lists_a_picture(
    model_api_service, aicsd, file_root, tmp_path
):
    service, models_dir = model_api_service
    copy_model(service, models_dir, tmp_path, "colour-regions", models.write_segmenter)
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[0:8, 0:16] = RED
    update, results = post_job(aicsd, service, file_root, "colour-regions", rgb)
    assert results["Count"] == 1
    assert results["Classes"] == [{"Label": "red", "Index": 1, "Pixels": 128, "Fraction": round(128 / 4096, 4),
                                   "Regions": 1}]
    assert_one_png_listed(update, "segmented")


def test_a_copied_multi_label_model_returns_its_labels_and_bad_params_are_all_named(
    model_api_service, aicsd, file_root, tmp_path
):
    service, models_dir = model_api_service
    copy_model(service, models_dir, tmp_path, "colour-tags", models.write_multilabel)
    yellow = np.full((32, 32, 3), YELLOW, np.uint8)
    update, results = post_job(aicsd, service, file_root, "colour-tags", yellow)
    assert results["Count"] == 2 and [item["Label"] for item in results["Labels"]] == ["red", "green"]
    assert update["OutputFiles"] == [] and update["QCFlags"] == ""

    update, _ = post_job(aicsd, service, file_root, "colour-tags", yellow, ConfidenceThreshold="2", Other="x")
    assert update["Status"] == "PipelineFailed"
    assert update["Results"] == "ModelParams ConfidenceThreshold: must be between 0.05 and 1, got 2"


def test_a_copied_model_without_model_type_fails_saying_what_to_add(model_api_service, aicsd, file_root, tmp_path):
    service, models_dir = model_api_service
    copy_model(service, models_dir, tmp_path, "bare", lambda version: models.write_model(version, models.colour_segmenter()),
               loads=False)
    update, _ = post_job(aicsd, service, file_root, "bare", np.zeros((8, 8, 3), np.uint8))
    assert update["Status"] == "PipelineFailed" and update["OutputFiles"] == []
    assert "model_type" in update["Results"] and "model_info.json" in update["Results"]
