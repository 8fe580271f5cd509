"""The service end to end: real `bentoml serve`, real model, real files, AiCSD stand-in.

Each test makes its own job (fresh job and task ids) and its own input file, so tests do not
see each other's callbacks.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from devtools.servers import free_port

from .conftest import copy_into

pytestmark = pytest.mark.integration

CAT = range(281, 286)
COFFEE = (967, 968)


def job_body(aicsd, input_file: Path, output: Path, **params: str):
    """A job of a task whose pipeline is the `Model` parameter's (as a person picks it in AiCSD's UI),
    or the default model's."""
    job = aicsd.new_job(f"ovms/{params.get('Model', 'efficientnet-lite0')}")
    body = {
        "InputFileLocation": str(input_file),
        "OutputFileFolder": str(output),
        "ModelParams": dict(params) or {"Brightness": "0"},
        "JobUpdateUrl": job.job_update_url,
        "PipelineStatusUrl": job.pipeline_status_url,
        "GatewayIP": "127.0.0.1",
    }
    return job, body


def classify(client: httpx.Client, service, body) -> httpx.Response:
    return client.post(f"{service.url}/classify", json=body)


def top(response: httpx.Response) -> list[dict]:
    return json.loads(response.json()["Results"])["top"]


def assert_one_put_then_one_post(aicsd, job, status: str) -> None:
    state = aicsd.wait_for_status(job.job_id, timeout=30)
    methods = [(r.method, r.status_code) for r in aicsd.requests_for(job.job_id)]
    assert methods == [("PUT", 200), ("POST", 200)]
    assert state.stored_status == status


class TestSeedRequest:
    def test_seed_request_runs_the_real_model_and_calls_back_put_then_post(
        self, service, aicsd, client, file_root, photos
    ):
        image = copy_into(file_root, photos["chelsea"], f"{uuid.uuid4()}.png")
        job, body = job_body(aicsd, image, file_root / "output")
        response = classify(client, service, body)
        assert response.status_code == 200, response.text
        data = response.json()
        assert data["Status"] == "PipelineComplete"
        assert (data["JobId"], data["TaskId"]) == (job.job_id, job.task_id)
        assert top(response)[0]["index"] in CAT
        assert len(top(response)) == 5 and all(set(t) == {"label", "index", "score"} for t in top(response))
        assert data["JobUpdate"]["StatusCode"] == 200 and data["PipelineStatus"]["StatusCode"] == 200
        assert_one_put_then_one_post(aicsd, job, "PipelineComplete")

    def test_job_update_body_is_exactly_what_the_job_repository_accepts(
        self, service, aicsd, client, file_root, photos
    ):
        image = copy_into(file_root, photos["coffee"], f"{uuid.uuid4()}.png")
        job, body = job_body(aicsd, image, file_root / "output", TopK="3")
        response = classify(client, service, body)
        put, post = aicsd.requests_for(job.job_id)
        assert set(put.json) == {"Status", "QCFlags", "OutputFiles", "Results"}
        assert put.json["OutputFiles"] == [] and isinstance(put.json["QCFlags"], str)
        assert put.headers.get("content-length") and put.headers.get("content-type") == "application/json"
        assert post.body == b"PipelineComplete" and post.headers.get("content-type") == "text/plain"
        results = json.loads(put.json["Results"])
        assert results["model"] == "efficientnet-lite0" and len(results["top"]) == 3
        assert results["top"][0]["index"] in COFFEE
        assert response.json()["Results"] == put.json["Results"]


class TestInputs:
    def test_16_bit_tiff_is_scaled_by_its_real_range_and_classified(self, service, aicsd, client, file_root, photos):
        rgb = np.asarray(Image.open(photos["chelsea"])).astype(np.uint16)
        image = file_root / "input" / f"{uuid.uuid4()}.tiff"
        tifffile.imwrite(image, rgb * 40 + 3000, photometric="rgb")
        job, body = job_body(aicsd, image, file_root / "output")
        response = classify(client, service, body)
        assert response.json()["Status"] == "PipelineComplete", response.text
        assert top(response)[0]["index"] in CAT
        assert_one_put_then_one_post(aicsd, job, "PipelineComplete")

    def test_multi_page_tiff_is_classified_on_its_first_page(self, service, aicsd, client, file_root, photos):
        cat = np.asarray(Image.open(photos["chelsea"]))
        coffee = np.asarray(Image.open(photos["coffee"]).resize(cat.shape[1::-1]))
        image = file_root / "input" / f"{uuid.uuid4()}.tiff"
        tifffile.imwrite(image, np.stack([cat, coffee]), photometric="rgb")
        _job, body = job_body(aicsd, image, file_root / "output")
        assert top(classify(client, service, body))[0]["index"] in CAT

    def test_grayscale_16_bit_tiff_is_accepted(self, service, aicsd, client, file_root, photos):
        gray = np.asarray(Image.open(photos["coffee"]).convert("L")).astype(np.uint16) * 200
        image = file_root / "input" / f"{uuid.uuid4()}.tif"
        tifffile.imwrite(image, gray)
        job, body = job_body(aicsd, image, file_root / "output")
        assert classify(client, service, body).json()["Status"] == "PipelineComplete"
        assert_one_put_then_one_post(aicsd, job, "PipelineComplete")

    def test_low_confidence_is_flagged(self, service, aicsd, client, file_root):
        image = file_root / "input" / f"{uuid.uuid4()}.png"
        Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(image)
        job, body = job_body(aicsd, image, file_root / "output", MinConfidence="0.99")
        response = classify(client, service, body)
        assert response.json()["QCFlags"] == "LowConfidence"
        assert aicsd.requests_for(job.job_id)[0].json["QCFlags"] == "LowConfidence"

    def test_model_params_pick_the_model(self, service, aicsd, client, file_root):
        image = file_root / "input" / f"{uuid.uuid4()}.png"
        pixels = np.zeros((16, 16, 3), np.uint8)
        pixels[..., 2] = 255
        Image.fromarray(pixels).save(image)
        _job, body = job_body(aicsd, image, file_root / "output", Model="tiny", TopK="2")
        results = json.loads(classify(client, service, body).json()["Results"])
        assert results["model"] == "tiny"
        assert [t["label"] for t in results["top"]] == ["blue", "red"]


def failed_job(aicsd, client, service, body, job) -> str:
    response = classify(client, service, body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["Status"] == "PipelineFailed"
    assert data["OutputFiles"] == [] and data["QCFlags"] == ""
    assert_one_put_then_one_post(aicsd, job, "PipelineFailed")
    put = aicsd.requests_for(job.job_id)[0]
    assert put.json["Status"] == "PipelineFailed" and put.json["Results"] == data["Results"]
    return data["Results"]


class TestJobsThatFailAreReportedAsPipelineFailed:
    def test_missing_input_file(self, service, aicsd, client, file_root):
        job, body = job_body(aicsd, file_root / "input" / "absent.tiff", file_root / "output")
        assert "does not exist" in failed_job(aicsd, client, service, body, job)

    def test_input_file_outside_the_file_roots(self, service, aicsd, client, file_root, photos):
        job, body = job_body(aicsd, photos["chelsea"], file_root / "output")
        assert "outside the allowed file roots" in failed_job(aicsd, client, service, body, job)

    def test_output_folder_that_is_not_a_directory(self, service, aicsd, client, file_root, photos):
        image = copy_into(file_root, photos["chelsea"], f"{uuid.uuid4()}.png")
        job, body = job_body(aicsd, image, image)
        assert "OutputFileFolder" in failed_job(aicsd, client, service, body, job)

    def test_corrupt_image(self, service, aicsd, client, file_root, photos):
        image = file_root / "input" / f"{uuid.uuid4()}.tiff"
        image.write_bytes(photos["chelsea"].read_bytes()[:300])
        job, body = job_body(aicsd, image, file_root / "output")
        reason = failed_job(aicsd, client, service, body, job)
        assert image.name in reason

    def test_file_that_is_not_an_image(self, service, aicsd, client, file_root):
        image = file_root / "input" / f"{uuid.uuid4()}.jpg"
        image.write_text("hello, not an image")
        job, body = job_body(aicsd, image, file_root / "output")
        assert image.name in failed_job(aicsd, client, service, body, job)

    def test_unknown_model(self, service, aicsd, client, file_root, photos):
        image = copy_into(file_root, photos["chelsea"], f"{uuid.uuid4()}.png")
        job, body = job_body(aicsd, image, file_root / "output", Model="no-such-model")
        reason = failed_job(aicsd, client, service, body, job)
        assert "ovms/no-such-model is not served" in reason and "ovms/efficientnet-lite0" in reason

    def test_model_directory_without_a_model(self, service, aicsd, client, file_root, photos):
        image = copy_into(file_root, photos["chelsea"], f"{uuid.uuid4()}.png")
        job, body = job_body(aicsd, image, file_root / "output", Model="empty")
        assert "no model file" in failed_job(aicsd, client, service, body, job)

    def test_model_of_a_type_no_pipeline_serves(self, service, aicsd, client, file_root, photos):
        image = copy_into(file_root, photos["chelsea"], f"{uuid.uuid4()}.png")
        job, body = job_body(aicsd, image, file_root / "output", Model="exotic")
        assert "Segmentation" in failed_job(aicsd, client, service, body, job)

    @pytest.mark.parametrize("params, problem", [({"TopK": "ten"}, "TopK"), ({"MinConfidence": "2"}, "MinConfidence")])
    def test_bad_model_parameter(self, service, aicsd, client, file_root, photos, params, problem):
        image = copy_into(file_root, photos["chelsea"], f"{uuid.uuid4()}.png")
        job, body = job_body(aicsd, image, file_root / "output", **params)
        assert f"ModelParams {problem}" in failed_job(aicsd, client, service, body, job)


class TestRequestsThatCannotBeRunAreRejectedWithoutCallbacks:
    def assert_no_callbacks(self, aicsd, job) -> None:
        assert aicsd.requests_for(job.job_id) == []

    def test_body_that_is_not_json(self, service, aicsd, client):
        response = client.post(f"{service.url}/classify", content=b"{not json",
                               headers={"content-type": "application/json"})
        assert response.status_code == 400 and "Invalid JSON" in response.text

    @pytest.mark.parametrize("field", ["InputFileLocation", "JobUpdateUrl", "PipelineStatusUrl"])
    def test_missing_field_is_named(self, service, aicsd, client, file_root, field):
        job, body = job_body(aicsd, file_root / "input" / "x.png", file_root / "output")
        del body[field]
        response = classify(client, service, body)
        assert response.status_code == 400 and field in response.text
        self.assert_no_callbacks(aicsd, job)

    def test_model_params_of_the_wrong_type_is_named(self, service, aicsd, client, file_root):
        job, body = job_body(aicsd, file_root / "input" / "x.png", file_root / "output")
        body["ModelParams"] = "TopK=3"
        response = classify(client, service, body)
        assert response.status_code == 400 and "ModelParams" in response.text
        self.assert_no_callbacks(aicsd, job)

    def test_malformed_callback_url_is_named(self, service, aicsd, client, file_root):
        job, body = job_body(aicsd, file_root / "input" / "x.png", file_root / "output")
        body["PipelineStatusUrl"] = body["PipelineStatusUrl"].replace("pipelineStatus", "status")
        response = classify(client, service, body)
        assert response.status_code == 400 and "PipelineStatusUrl" in response.text
        self.assert_no_callbacks(aicsd, job)

    def test_callback_host_not_allowed_gets_422_and_is_never_called(self, service, client, file_root, photos):
        from devtools.aicsd_standin import AicsdStandIn

        image = copy_into(file_root, photos["chelsea"], f"{uuid.uuid4()}.png")
        with AicsdStandIn(host="127.0.0.2") as elsewhere:
            job, body = job_body(elsewhere, image, file_root / "output")
            response = classify(client, service, body)
            assert response.status_code == 422
            assert "JobUpdateUrl" in response.text and "PIPELINE_CALLBACK_HOSTS" in response.text
            assert elsewhere.requests_for(job.job_id) == []


class TestCallbacks:
    def test_job_update_answered_500_twice_is_retried_then_the_status_is_sent(
        self, service, aicsd, client, file_root, photos
    ):
        image = copy_into(file_root, photos["chelsea"], f"{uuid.uuid4()}.png")
        job, body = job_body(aicsd, image, file_root / "output")
        aicsd.fail_next(job.job_id, kind="put", status_code=500, times=2)
        response = classify(client, service, body)
        assert response.status_code == 200
        assert response.json()["JobUpdate"]["Attempts"] == 3
        codes = [(r.method, r.status_code) for r in aicsd.requests_for(job.job_id)]
        assert codes == [("PUT", 500), ("PUT", 500), ("PUT", 200), ("POST", 200)]

    def test_job_update_answered_400_is_not_retried_and_no_status_is_sent(
        self, service, aicsd, client, file_root, photos
    ):
        image = copy_into(file_root, photos["chelsea"], f"{uuid.uuid4()}.png")
        job, body = job_body(aicsd, image, file_root / "output")
        aicsd.fail_next(job.job_id, kind="put", status_code=400, times=None)
        response = classify(client, service, body)
        data = response.json()
        assert data["JobUpdate"]["StatusCode"] == 400 and data["JobUpdate"]["Attempts"] == 1
        assert data["PipelineStatus"] is None
        assert [r.method for r in aicsd.requests_for(job.job_id)] == ["PUT"]

    def test_unreachable_aicsd_answers_502_so_the_bridge_retries_later(self, service, client, file_root, photos):
        image = copy_into(file_root, photos["chelsea"], f"{uuid.uuid4()}.png")
        port, job_id, task_id = free_port(), uuid.uuid4(), uuid.uuid4()
        body = {
            "InputFileLocation": str(image),
            "OutputFileFolder": str(file_root / "output"),
            "ModelParams": {},
            "JobUpdateUrl": f"http://127.0.0.1:{port}/api/v1/job/pipeline/{job_id}/{task_id}",
            "PipelineStatusUrl": f"http://127.0.0.1:{port}/api/v1/pipelineStatus/{job_id}/{task_id}",
        }
        response = classify(client, service, body)
        assert response.status_code == 502
        assert response.json()["JobUpdate"] is None and response.json()["Status"] == ""
        assert "task launcher could not tell the task's pipeline" in response.json()["Note"]

    def test_repeated_job_is_answered_from_memory_without_a_second_run_or_callback(
        self, service, aicsd, client, file_root, photos
    ):
        image = copy_into(file_root, photos["chelsea"], f"{uuid.uuid4()}.png")
        job, body = job_body(aicsd, image, file_root / "output")
        first = classify(client, service, body)
        second = classify(client, service, body)
        assert first.json()["Repeated"] is False and second.json()["Repeated"] is True
        assert second.json()["Results"] == first.json()["Results"]
        assert [r.method for r in aicsd.requests_for(job.job_id)] == ["PUT", "POST"]


class TestServiceSurface:
    def test_pipelines_are_listed_in_the_aicsd_format(self, service, client):
        listing = client.post(f"{service.url}/pipelines", json={}).json()
        by_id = {p["id"]: p for p in listing}
        assert set(by_id) == {"ovms/cell-counter", "ovms/efficientnet-lite0", "ovms/empty", "ovms/exotic", "ovms/tiny"}
        assert by_id["ovms/efficientnet-lite0"] == {
            "id": "ovms/efficientnet-lite0",
            "name": "efficientnet-lite0 OVMS Pipeline",
            "description": "efficientnet-lite0 version 1; parameters: TopK=5 (integer, 1..1000), "
            "MinConfidence=0.2 (number, 0.0..1.0)",
            "subscriptionTopic": "ovms/efficientnet-lite0",
            "status": "Running",
        }

    def test_prometheus_metrics_are_on_as_bentoml_yaml_says_and_count_requests(self, service, client):
        # bentoml.yaml turns them on (the default service config of BentoML too); each request to an
        # API is counted under its endpoint and response code.
        def requests_counted() -> float:
            answer = client.get(f"{service.url}/metrics")
            assert answer.status_code == 200
            return sum(
                sample.value
                for family in text_string_to_metric_families(answer.text)
                for sample in family.samples
                if sample.name == "bentoml_service_request_total"
                and sample.labels.get("endpoint") == "/pipelines" and sample.labels.get("http_response_code") == "200"
            )

        before = requests_counted()
        assert client.post(f"{service.url}/pipelines", json={}).status_code == 200
        assert requests_counted() == before + 1

    def test_swagger_spec_offers_the_seed_request_as_the_example(self, service, client):
        from aicsd.job import SEED_EXAMPLE

        spec = client.get(f"{service.url}/docs.json").json()
        body = spec["paths"]["/classify"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["example"] == SEED_EXAMPLE
        assert set(body["required"]) == {"InputFileLocation", "OutputFileFolder", "JobUpdateUrl", "PipelineStatusUrl"}

    def test_every_log_line_about_a_job_names_the_job_and_the_task(self, service, aicsd, client, file_root, photos):
        image = copy_into(file_root, photos["chelsea"], f"{uuid.uuid4()}.png")
        job, body = job_body(aicsd, image, file_root / "output")
        classify(client, service, body)
        lines = [line for line in service.log_text().splitlines() if job.job_id in line]
        assert len(lines) >= 3
        assert all(f"job={job.job_id} task={job.task_id}" in line for line in lines)


class TestCounting:
    def test_multi_page_16_bit_tiff_job_lists_complete_output_files_before_the_status(
        self, service, aicsd, client, file_root
    ):
        from devtools.synthetic_blobs import make_image

        pages = [make_image(seed, bits=16, count=40, touching_pairs=4, size=384).pixels for seed in (21, 22)]
        image = file_root / "input" / f"{uuid.uuid4()}.tiff"
        tifffile.imwrite(image, np.stack(pages), photometric="minisblack")
        job, body = job_body(aicsd, image, file_root / "output", Model="cell-counter")
        response = classify(client, service, body)
        assert response.status_code == 200, response.text
        results = json.loads(response.json()["Results"])
        assert list(results)[:2] == ["CellCount", "Pages"] and len(results["Pages"]) == 2
        assert abs(results["CellCount"] - 80) <= 4
        state = aicsd.wait_for_status(job.job_id, timeout=30)
        # The stand-in checked every listed file on disk when the status arrived.
        assert state.ended == "complete" and state.missing_files == []
        listed = [(f["dirname"], f["name"], f["extension"]) for f in state.output_files]
        assert listed == [(str(file_root / "output"), f"{image.stem}-counted.tiff", ".tiff")]
        assert state.viewable == [f"{image.stem}-counted.jpeg"]

    def test_bad_counting_parameter_fails_the_job_naming_it(self, service, aicsd, client, file_root):
        from devtools.synthetic_blobs import make_image

        image = file_root / "input" / f"{uuid.uuid4()}.tiff"
        tifffile.imwrite(image, make_image(1, bits=8, count=5, touching_pairs=0, size=64).pixels)
        job, body = job_body(aicsd, image, file_root / "output", Model="cell-counter", MaxDiameter="huge")
        assert "ModelParams MaxDiameter" in failed_job(aicsd, client, service, body, job)
