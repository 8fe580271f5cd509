"""Choosing a job's model from its task (AICSD_CONTRACT.md §1), against the AiCSD stand-in over HTTP."""

from __future__ import annotations

import logging

import pytest

from aicsd.callbacks import AicsdClient, RetryPolicy
from aicsd.errors import AicsdUnreachable, ModelError, NotServedHere
from aicsd.job import Job, JobRequest
from aicsd.logs import JobLog
from devtools.aicsd_standin import AicsdStandIn
from serving.task_pipeline import TaskPipelines

SERVED = ["efficientnet-lite0", "cell-counter"]


@pytest.fixture(scope="module")
def standin():
    with AicsdStandIn() as running:
        yield running


@pytest.fixture
def aicsd_client():
    with AicsdClient(RetryPolicy(tries=2, backoff=0.01, timeout=5)) as client:
        yield client


def chooser(client: AicsdClient, *, lookup: bool = True, shared_topic: bool = False) -> TaskPipelines:
    return TaskPipelines(client, lookup=lookup, default_model="efficientnet-lite0", shared_topic=shared_topic,
                         served=lambda: SERVED, capacity=2)


def job_of(urls, **params: str) -> tuple[Job, JobLog]:
    request = JobRequest.model_validate({
        "InputFileLocation": "/tmp/files/input/1.tiff", "OutputFileFolder": "/tmp/files/output",
        "ModelParams": params or {"Brightness": "0"},
        "JobUpdateUrl": urls.job_update_url, "PipelineStatusUrl": urls.pipeline_status_url,
    })
    job = Job.from_request(request, frozenset({"127.0.0.1"}))
    return job, JobLog(logging.getLogger("test"), job.job_id, job.task_id)


def test_the_task_launchers_pipeline_id_picks_the_model(standin, aicsd_client):
    job, job_log = job_of(standin.new_job("ovms/cell-counter"))
    assert chooser(aicsd_client).choose(job, job_log) == "cell-counter"


def test_with_the_look_up_off_model_params_or_the_default_decide_and_nothing_is_asked(standin, aicsd_client):
    urls = standin.new_job("ovms/cell-counter")
    job, job_log = job_of(urls)
    assert chooser(aicsd_client, lookup=False).choose(job, job_log) == "efficientnet-lite0"
    named, _ = job_of(urls, Model="tiny")
    assert chooser(aicsd_client, lookup=False).choose(named, job_log) == "tiny"
    assert standin.task_lookups(urls.task_id) == []


def test_a_pipeline_served_elsewhere_is_left_alone_when_services_share_the_topic(standin, aicsd_client):
    job, job_log = job_of(standin.new_job("ovms/other-model"))
    with pytest.raises(NotServedHere, match="ovms/other-model is not served"):
        chooser(aicsd_client, shared_topic=True).choose(job, job_log)
    with pytest.raises(ModelError, match="ovms/other-model is not served"):
        chooser(aicsd_client).choose(job, job_log)


def test_a_pipeline_that_is_not_an_ovms_pipeline_is_not_served(standin, aicsd_client):
    job, job_log = job_of(standin.new_job("geti/123"))
    with pytest.raises(ModelError, match="'geti/123' is not an OVMS pipeline"):
        chooser(aicsd_client).choose(job, job_log)


def test_an_unknown_task_is_a_500_from_the_task_launcher_so_aicsd_counts_as_unreachable(standin, aicsd_client):
    urls = standin.new_job()
    other = standin.register(urls.job_id, "task-nobody-created", "ovms/cell-counter")
    standin.fail_next("task-nobody-created", kind="task", status_code=500, times=None)
    job, job_log = job_of(other)
    with pytest.raises(AicsdUnreachable, match="answered 500"):
        chooser(aicsd_client).choose(job, job_log)
    assert len(standin.task_lookups("task-nobody-created")) == 2  # retried like the callbacks


def test_a_task_answer_without_a_pipeline_id_fails_the_job(standin, aicsd_client):
    urls = standin.new_job("   ")
    job, job_log = job_of(urls)
    with pytest.raises(ModelError, match="has no PipelineId"):
        chooser(aicsd_client).choose(job, job_log)


def test_the_memory_of_tasks_is_bounded_and_asks_again_for_a_forgotten_task(standin, aicsd_client):
    pipelines = chooser(aicsd_client)
    jobs = [job_of(standin.new_job("ovms/cell-counter")) for _ in range(3)]
    for job, job_log in jobs:
        pipelines.choose(job, job_log)
    pipelines.choose(*jobs[0])  # capacity 2: the first task was forgotten
    assert len(standin.task_lookups(jobs[0][0].task_id)) == 2
    pipelines.choose(*jobs[2])
    assert len(standin.task_lookups(jobs[2][0].task_id)) == 1
