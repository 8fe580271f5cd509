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


class TestThroughTheBrokerAndTheBridge:
    """AiCSD-shaped jobs published on the broker, as EdgeX does, through a real bridge process."""

    @staticmethod
    def payload(job, image: Path, output: Path) -> str:
        body = body_for(job, image, output)
        del body["GatewayIP"]  # AiCSD does not send it; the bridge adds it
        return json.dumps(body)

    def test_jobs_published_for_tasks_of_two_pipelines_with_the_ui_defaults_each_run_their_tasks_model(
        self, broker, service, aicsd, file_root, photos, tmp_path, output
    ):
        from devtools.servers import Bridge, publish

        image = copy_into(file_root, photos["coffee"], f"{uuid.uuid4()}.png")
        classifier = aicsd.new_job("ovms/efficientnet-lite0")
        counter = aicsd.new_job("ovms/cell-counter")
        bridge = Bridge(tmp_path / "bridge", f"{service.url}/classify", broker.port,
                        client_id=f"bridge-{uuid.uuid4().hex[:8]}").start()
        try:
            publish(broker.port, [self.payload(job, image, output) for job in (classifier, counter)])
            classified = aicsd.wait_for_status(classifier.job_id, timeout=60)
            counted = aicsd.wait_for_status(counter.job_id, timeout=60)
        finally:
            bridge.stop()
        assert json.loads(classified.results)["model"] == "efficientnet-lite0" and "espresso" in classified.results
        assert json.loads(counted.results)["Model"] == "cell-counter" and "CellCount" in counted.results
        assert [f["name"] for f in counted.output_files] == [f"{image.stem}-counted.tiff"]

    def test_the_service_killed_three_times_during_a_burst_of_100_jobs_reports_each_exactly_once(
        self, broker, aicsd, service_models, file_root, tmp_path, output
    ):
        import signal

        import numpy as np
        from PIL import Image

        from devtools.servers import REPO, Bridge, free_port, publish, serve_bento, stop_process
        from serving.ledger import JobLedger

        image = file_root / "input" / f"{uuid.uuid4()}.png"
        Image.fromarray(np.full((16, 16, 3), (0, 0, 255), np.uint8)).save(image)
        port, ledger_path = free_port(), tmp_path / "ledger.sqlite3"
        env = {
            "PIPELINE_MODELS_DIR": str(service_models),
            "PIPELINE_DEFAULT_MODEL": "tiny",
            "PIPELINE_FILE_ROOTS": str(file_root),
            "PIPELINE_CALLBACK_HOSTS": "127.0.0.1",
            "PIPELINE_CALLBACK_BACKOFF": "0.05",
            "PIPELINE_CACHE_DIR": str(tmp_path / "cache"),
            "PIPELINE_LEDGER": str(ledger_path),
        }

        def serve(round_: int):
            return serve_bento("service:AicsdPipeline", env=env, cwd=REPO, port=port,
                               log_path=tmp_path / f"service-{round_}.log")

        running = serve(0)
        bridge = Bridge(tmp_path / "bridge", f"http://127.0.0.1:{port}/classify", broker.port,
                        client_id=f"bridge-{uuid.uuid4().hex[:8]}",
                        extra={"bridge": {"retry_initial": 0.1, "retry_max": 0.5}}).start()
        jobs = [aicsd.new_job("ovms/tiny") for _ in range(100)]
        try:
            publish(broker.port, [self.payload(job, image, output) for job in jobs])
            for round_, reported in enumerate((15, 45, 75), start=1):
                while sum(aicsd.job(j.job_id).ended is not None for j in jobs) < reported:
                    import time

                    time.sleep(0.02)
                stop_process(running.process, signal.SIGKILL)
                running = serve(round_)
            for job in jobs:
                aicsd.wait_for_status(job.job_id, timeout=120)
        finally:
            bridge.stop()
            stop_process(running.process)

        ledger = JobLedger(ledger_path, keep_reported=3600)
        from aicsd.job import Job, JobRequest
        from serving.ledger import job_digest

        duplicated = []
        for job in jobs:
            accepted = [r.method for r in aicsd.requests_for(job.job_id) if r.status_code == 200]
            if accepted != ["PUT", "POST"]:
                parsed = Job.from_request(
                    JobRequest.model_validate({**json.loads(self.payload(job, image, output))}), frozenset({"*"})
                )
                resent = ledger.resent((job.job_id, job.task_id, job_digest(parsed)))
                duplicated.append((job.job_id, accepted, resent))
        # Only the documented window may repeat a callback: a process killed after AiCSD accepted
        # it and before the ledger noted the answer. The ledger names each such repeat.
        outside_window = [d for d in duplicated if not d[2] or len(d[1]) - 2 > len(d[2])]
        assert outside_window == [], outside_window
        assert all(aicsd.job(j.job_id).ended == "complete" for j in jobs)

    def test_aicsd_away_longer_than_the_callback_retries_each_job_runs_once_and_leaves_no_orphans(
        self, broker, service, aicsd, file_root, photos, tmp_path, output
    ):
        import time

        from devtools.servers import Bridge, publish

        jobs = [aicsd.new_job("ovms/cell-counter") for _ in range(3)]
        images = [copy_into(file_root, photos["coffee"], f"{uuid.uuid4()}.png") for _ in jobs]
        for job in jobs:
            aicsd.fail_next(job.job_id, kind="put", status_code=503, times=None)
        bridge = Bridge(tmp_path / "bridge", f"{service.url}/classify", broker.port,
                        client_id=f"bridge-{uuid.uuid4().hex[:8]}",
                        extra={"bridge": {"retry_initial": 0.2, "retry_max": 0.5}}).start()
        try:
            publish(broker.port, [self.payload(job, image, output) for job, image in zip(jobs, images, strict=True)])
            # Three bridge attempts per job, each after the service's own five tries of the PUT.
            deadline = time.monotonic() + 120
            while any(len(aicsd.requests_for(j.job_id)) < 15 for j in jobs):
                assert time.monotonic() < deadline, [len(aicsd.requests_for(j.job_id)) for j in jobs]
                time.sleep(0.1)
            for job in jobs:
                aicsd.heal(job.job_id)
            for job in jobs:
                assert aicsd.wait_for_status(job.job_id, timeout=60).ended == "complete"
        finally:
            bridge.stop()
        for job, image in zip(jobs, images, strict=True):
            assert runs_of(service, job.job_id) == 1
            accepted = [r.method for r in aicsd.requests_for(job.job_id) if r.status_code == 200]
            assert accepted == ["PUT", "POST"]
            written = sorted(p.name for p in output.iterdir() if p.name.startswith(image.stem))
            listed = [f["name"] for f in aicsd.job(job.job_id).output_files]
            assert set(listed) <= set(written)
            assert not [name for name in written if "-1." in name or name.endswith(".partial")], written


def test_with_a_shared_topic_a_job_of_a_pipeline_served_elsewhere_is_left_alone(
    aicsd, client, service_models, file_root, photos, tmp_path, output
):
    from devtools.servers import REPO, serve_bento, stop_process

    only_tiny = tmp_path / "models"
    only_tiny.mkdir()
    (only_tiny / "tiny").symlink_to(service_models / "tiny", target_is_directory=True)
    running = serve_bento(
        "service:AicsdPipeline",
        env={"PIPELINE_MODELS_DIR": str(only_tiny), "PIPELINE_DEFAULT_MODEL": "tiny",
             "PIPELINE_FILE_ROOTS": str(file_root), "PIPELINE_CALLBACK_HOSTS": "127.0.0.1",
             "PIPELINE_SHARED_TOPIC": "true", "PIPELINE_CACHE_DIR": "",
             "PIPELINE_LEDGER": str(tmp_path / "ledger.sqlite3")},
        cwd=REPO, log_path=tmp_path / "shared-service.log",
    )
    try:
        image = copy_into(file_root, photos["coffee"], f"{uuid.uuid4()}.png")
        elsewhere = aicsd.new_job("ovms/cell-counter")
        left = client.post(f"{running.url}/classify", json=body_for(elsewhere, image, output))
        assert left.status_code == 200
        assert left.json()["Status"] == "" and "ovms/cell-counter is not served" in left.json()["Note"]
        assert aicsd.requests_for(elsewhere.job_id) == []
        ours = aicsd.new_job("ovms/tiny")
        served = client.post(f"{running.url}/classify", json=body_for(ours, image, output))
        assert served.json()["Status"] == "PipelineComplete"
    finally:
        stop_process(running.process)
    assert "left for the service that serves it" in running.log_text()
