"""helper.py against the AiCSD stand-in: the seed's function names send what AiCSD accepts."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from aicsd.job import CallbackUrls
from aicsd.outcome import OutputFile, PipelineOutcome
from helper import (
    AicsdClient,
    RetryPolicy,
    create_inference_response,
    send_pipeline_inference_results,
    send_pipeline_status,
)


def test_seed_functions_update_the_job_then_report_the_status(aicsd, tmp_path):
    job = aicsd.new_job()
    result = tmp_path / "out.png"
    Image.new("L", (4, 4)).save(result)  # the file sender opens every listed file as an image
    body = create_inference_response({"CellCount": 3}, "PipelineComplete", output_files=[result])
    assert send_pipeline_inference_results(job.job_update_url, body, "10.0.0.1").ok
    assert send_pipeline_status(job.pipeline_status_url, "PipelineComplete", "10.0.0.1").ok
    state = aicsd.wait_for_status(job.job_id, timeout=5)
    assert state.ended == "complete" and state.results == '{"CellCount":3}'
    assert state.output_files[0]["name"] == "out.png" and state.viewable == ["out.jpeg"]


def test_status_sent_without_a_job_update_is_refused_by_aicsd(aicsd):
    job = aicsd.new_job()
    answer = send_pipeline_status(job.pipeline_status_url, "PipelineComplete")
    assert answer.status_code == 400 and answer.attempts == 1


def test_report_retries_a_failing_status_and_never_sends_a_status_after_a_refused_update(aicsd):
    sleeps: list[float] = []
    with AicsdClient(RetryPolicy(tries=3, backoff=0.5), sleep=sleeps.append) as client:
        job = aicsd.new_job()
        aicsd.fail_next(job.job_id, kind="status", status_code=503, times=2)
        report = client.report(CallbackUrls(job.job_id, job.task_id, job.job_update_url, job.pipeline_status_url),
                               PipelineOutcome.complete("ok", output_files=()))
        assert report.delivered and report.pipeline_status.attempts == 3 and sleeps == [0.5, 1.0]

        refused = aicsd.new_job()
        aicsd.fail_next(refused.job_id, kind="put", status_code=400, times=None)
        report = client.report(
            CallbackUrls(refused.job_id, refused.task_id, refused.job_update_url, refused.pipeline_status_url),
            PipelineOutcome.failed("boom"),
        )
        assert report.pipeline_status is None and not report.retryable
        assert [r.method for r in aicsd.requests_for(refused.job_id)] == ["PUT"]


def test_output_files_listed_in_the_update_exist_when_the_status_arrives(aicsd, tmp_path):
    image = tmp_path / "x-counted.tiff"
    Image.new("RGB", (4, 4)).save(image)  # the file sender opens every listed file as an image
    job = aicsd.new_job()
    with AicsdClient(RetryPolicy(tries=1)) as client:
        client.report(CallbackUrls(job.job_id, job.task_id, job.job_update_url, job.pipeline_status_url),
                      PipelineOutcome.complete("{}", output_files=(OutputFile(Path(image)),)))
    state = aicsd.wait_for_status(job.job_id, timeout=5)
    assert state.ended == "complete" and state.missing_files == []
