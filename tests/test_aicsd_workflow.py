"""The service inside AiCSD's workflow: the task's pipeline picks the model, and a job that comes
again is resumed from the ledger, never run twice nor reported twice (AICSD_CONTRACT.md §1, §6).

Real `bentoml serve`, real models, the AiCSD stand-in answering the task launcher's
`GET /api/v1/task/<taskid>` as the Go handler does.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from .conftest import copy_into
from .test_service import assert_one_put_then_one_post, classify

pytestmark = pytest.mark.integration

UI_DEFAULT_PARAMS = {"Brightness": "0"}  # what AiCSD's web UI fills in when creating a task


def body_for(job, image: Path, output: Path, params: dict[str, str] | None = None) -> dict:
    return {
        "InputFileLocation": str(image),
        "OutputFileFolder": str(output),
        "ModelParams": dict(UI_DEFAULT_PARAMS if params is None else params),
        "JobUpdateUrl": job.job_update_url,
        "PipelineStatusUrl": job.pipeline_status_url,
        "GatewayIP": "127.0.0.1",
    }


@pytest.fixture
def output(file_root: Path) -> Path:
    folder = file_root / "output" / uuid.uuid4().hex
    folder.mkdir()
    return folder


def runs_of(service, job_id: str) -> int:
    return sum(1 for line in service.log_text().splitlines() if f"job={job_id}" in line and "running model" in line)


class TestTheTasksPipelinePicksTheModel:
    def test_two_tasks_of_different_pipelines_with_the_ui_default_params_each_run_their_model(
        self, service, aicsd, client, file_root, photos, output
    ):
        image = copy_into(file_root, photos["coffee"], f"{uuid.uuid4()}.png")
        classifier = aicsd.new_job("ovms/efficientnet-lite0")
        counter = aicsd.new_job("ovms/cell-counter")
        classified = classify(client, service, body_for(classifier, image, output)).json()
        counted = classify(client, service, body_for(counter, image, output)).json()
        assert json.loads(classified["Results"])["model"] == "efficientnet-lite0"
        assert "espresso" in classified["Results"]
        assert json.loads(counted["Results"])["Model"] == "cell-counter"
        assert "CellCount" in json.loads(counted["Results"])
        assert_one_put_then_one_post(aicsd, classifier, "PipelineComplete")
        assert_one_put_then_one_post(aicsd, counter, "PipelineComplete")

    def test_a_model_parameter_that_disagrees_with_the_task_fails_the_job_naming_both(
        self, service, aicsd, client, file_root, photos, output
    ):
        image = copy_into(file_root, photos["coffee"], f"{uuid.uuid4()}.png")
        job = aicsd.new_job("ovms/cell-counter")
        data = classify(client, service, body_for(job, image, output, {"Model": "efficientnet-lite0"})).json()
        assert data["Status"] == "PipelineFailed"
        assert "ovms/cell-counter" in data["Results"] and "'efficientnet-lite0'" in data["Results"]
        assert_one_put_then_one_post(aicsd, job, "PipelineFailed")

    def test_a_model_parameter_that_agrees_with_the_task_is_fine(
        self, service, aicsd, client, file_root, photos, output
    ):
        image = copy_into(file_root, photos["coffee"], f"{uuid.uuid4()}.png")
        job = aicsd.new_job("ovms/efficientnet-lite0")
        data = classify(client, service, body_for(job, image, output, {"Model": "efficientnet-lite0"})).json()
        assert data["Status"] == "PipelineComplete"

    def test_a_pipeline_this_service_does_not_serve_fails_the_job_with_the_pipelines_it_serves(
        self, service, aicsd, client, file_root, photos, output
    ):
        image = copy_into(file_root, photos["coffee"], f"{uuid.uuid4()}.png")
        job = aicsd.new_job("ovms/someone-elses-model")
        data = classify(client, service, body_for(job, image, output)).json()
        assert data["Status"] == "PipelineFailed"
        assert "ovms/someone-elses-model is not served by this service" in data["Results"]
        assert "ovms/cell-counter" in data["Results"]
        assert_one_put_then_one_post(aicsd, job, "PipelineFailed")

    def test_the_task_launcher_is_asked_once_per_task(self, service, aicsd, client, file_root, photos, output):
        image = copy_into(file_root, photos["coffee"], f"{uuid.uuid4()}.png")
        first = aicsd.new_job("ovms/efficientnet-lite0")
        second = aicsd.register(str(uuid.uuid4()), first.task_id, "ovms/efficientnet-lite0")
        for job in (first, second):
            assert classify(client, service, body_for(job, image, output)).json()["Status"] == "PipelineComplete"
        assert [r.status_code for r in aicsd.task_lookups(first.task_id)] == [200]

    def test_a_task_launcher_that_cannot_answer_gets_502_and_the_job_runs_once_it_can(
        self, service, aicsd, client, file_root, photos, output
    ):
        image = copy_into(file_root, photos["coffee"], f"{uuid.uuid4()}.png")
        job = aicsd.new_job("ovms/efficientnet-lite0")
        aicsd.fail_next(job.task_id, kind="task", status_code=500, times=None)
        first = classify(client, service, body_for(job, image, output))
        assert first.status_code == 502
        assert first.json()["Status"] == "" and "task launcher" in first.json()["Note"]
        assert aicsd.requests_for(job.job_id) == []  # no callback: AiCSD is told nothing yet
        assert runs_of(service, job.job_id) == 0
        aicsd.heal(job.task_id)
        second = classify(client, service, body_for(job, image, output))
        assert second.status_code == 200 and second.json()["Status"] == "PipelineComplete"
        assert second.json()["Repeated"] is False
        assert_one_put_then_one_post(aicsd, job, "PipelineComplete")


class TestAJobThatComesAgain:
    def test_aicsd_away_longer_than_the_callback_retries_runs_the_pipeline_once_and_writes_files_once(
        self, service, aicsd, client, file_root, photos, output
    ):
        image = copy_into(file_root, photos["coffee"], f"{uuid.uuid4()}.png")
        job = aicsd.new_job("ovms/cell-counter")
        aicsd.fail_next(job.job_id, kind="put", status_code=503, times=None)
        body = body_for(job, image, output)
        first = classify(client, service, body)
        assert first.status_code == 502 and first.json()["Status"] == "PipelineComplete"
        files = sorted(p.name for p in output.iterdir())
        assert files, "the counter writes its annotated image"
        again = classify(client, service, body)
        assert again.status_code == 502 and again.json()["Repeated"] is True
        aicsd.heal(job.job_id)
        last = classify(client, service, body)
        assert last.status_code == 200 and last.json()["Repeated"] is True
        assert last.json()["Results"] == first.json()["Results"]
        assert sorted(p.name for p in output.iterdir()) == files
        assert runs_of(service, job.job_id) == 1
        state = aicsd.wait_for_status(job.job_id)
        assert state.ended == "complete" and state.puts == 1 and state.statuses == 1

    def test_a_status_refused_for_a_while_is_sent_again_without_a_second_job_update(
        self, service, aicsd, client, file_root, photos, output
    ):
        image = copy_into(file_root, photos["coffee"], f"{uuid.uuid4()}.png")
        job = aicsd.new_job()
        aicsd.fail_next(job.job_id, kind="status", status_code=503, times=None)
        body = body_for(job, image, output)
        assert classify(client, service, body).status_code == 502
        aicsd.heal(job.job_id)
        last = classify(client, service, body)
        assert last.status_code == 200 and last.json()["PipelineStatus"]["StatusCode"] == 200
        methods = [(r.method, r.status_code) for r in aicsd.requests_for(job.job_id)]
        assert methods.count(("PUT", 200)) == 1 and methods[-1] == ("POST", 200)
        assert runs_of(service, job.job_id) == 1

    def test_a_reported_job_that_comes_again_gets_its_stored_answer_and_aicsd_hears_nothing_more(
        self, service, aicsd, client, file_root, photos, output
    ):
        image = copy_into(file_root, photos["coffee"], f"{uuid.uuid4()}.png")
        job = aicsd.new_job()
        body = body_for(job, image, output)
        first = classify(client, service, body).json()
        second = classify(client, service, body).json()
        assert second["Repeated"] is True and second["Results"] == first["Results"]
        assert second["JobUpdate"] == first["JobUpdate"] and second["PipelineStatus"] == first["PipelineStatus"]
        assert [r.method for r in aicsd.requests_for(job.job_id)] == ["PUT", "POST"]

    def test_a_hand_sent_request_reusing_the_ids_with_another_input_file_is_a_new_job(
        self, service, aicsd, client, file_root, photos, output
    ):
        cat = copy_into(file_root, photos["chelsea"], f"{uuid.uuid4()}.png")
        coffee = copy_into(file_root, photos["coffee"], f"{uuid.uuid4()}.png")
        job = aicsd.new_job()
        first = classify(client, service, body_for(job, cat, output)).json()
        second = classify(client, service, body_for(job, coffee, output)).json()
        assert second["Repeated"] is False and "espresso" in second["Results"]
        assert "espresso" not in first["Results"]
