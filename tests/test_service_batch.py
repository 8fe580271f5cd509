"""`/classify_batch`: several jobs in one request, each answered as `/classify` would answer it alone.

Real `bentoml serve`, real model, real files, the AiCSD stand-in; each test makes its own jobs.
"""

from __future__ import annotations

import json
import uuid
from urllib.parse import urlsplit

import httpx
import pytest

from devtools.servers import free_port

from .conftest import copy_into
from .test_service import CAT, assert_one_put_then_one_post, classify, job_body

pytestmark = pytest.mark.integration


def classify_batch(client: httpx.Client, service, bodies: object) -> httpx.Response:
    return client.post(f"{service.url}/classify_batch", json=bodies)


def test_each_job_of_a_batch_gets_its_own_answer_in_order_and_its_own_callbacks(
    service, aicsd, client, file_root, photos
):
    cat = copy_into(file_root, photos["chelsea"], f"{uuid.uuid4()}.png")
    good, good_body = job_body(aicsd, cat, file_root / "output")
    missing, missing_body = job_body(aicsd, file_root / f"{uuid.uuid4()}-absent.png", file_root / "output")
    _, no_input = job_body(aicsd, cat, file_root / "output")
    del no_input["InputFileLocation"]
    _, elsewhere = job_body(aicsd, cat, file_root / "output")
    elsewhere["JobUpdateUrl"] = elsewhere["JobUpdateUrl"].replace("127.0.0.1", "127.0.0.2")
    elsewhere["PipelineStatusUrl"] = elsewhere["PipelineStatusUrl"].replace("127.0.0.1", "127.0.0.2")

    response = classify_batch(client, service, [good_body, no_input, missing_body, elsewhere])

    assert response.status_code == 200, response.text
    items = response.json()
    assert [item["StatusCode"] for item in items] == [200, 400, 200, 422]
    first, refused, failed, not_allowed = (item["Body"] for item in items)
    assert (first["JobId"], first["Status"]) == (good.job_id, "PipelineComplete")
    assert json.loads(first["Results"])["top"][0]["index"] in CAT
    assert refused["field"] == "InputFileLocation" and "Field required" in refused["error"]
    assert (failed["JobId"], failed["Status"]) == (missing.job_id, "PipelineFailed")
    assert not_allowed["field"] == "JobUpdateUrl" and "not allowed" in not_allowed["error"]
    assert_one_put_then_one_post(aicsd, good, "PipelineComplete")
    assert_one_put_then_one_post(aicsd, missing, "PipelineFailed")


def test_a_job_in_a_batch_is_answered_as_classify_answers_it_alone(service, aicsd, client, file_root, photos):
    image = copy_into(file_root, photos["coffee"], f"{uuid.uuid4()}.png")
    job, body = job_body(aicsd, image, file_root / "output", TopK="2")
    (item,) = classify_batch(client, service, [body]).json()
    alone = classify(client, service, body)  # the same job again: answered from the ledger
    assert item["StatusCode"] == alone.status_code == 200
    assert {**item["Body"], "Repeated": True} == alone.json()
    assert len(aicsd.requests_for(job.job_id)) == 2  # one PUT, one POST: the repeat ran nothing


def test_the_same_job_twice_in_one_batch_runs_and_reports_once(service, aicsd, client, file_root, photos):
    image = copy_into(file_root, photos["chelsea"], f"{uuid.uuid4()}.png")
    job, body = job_body(aicsd, image, file_root / "output")
    items = classify_batch(client, service, [body, body]).json()
    assert [item["StatusCode"] for item in items] == [200, 200]
    assert sorted(item["Body"]["Repeated"] for item in items) == [False, True]
    assert_one_put_then_one_post(aicsd, job, "PipelineComplete")


@pytest.mark.parametrize(
    ("bodies", "problem"),
    [([], "at least 1 item"), ([{}] * 65, "at most 64 items"), ({"InputFileLocation": "/x"}, "list"),
     (["not a job"], "dict")],
    ids=["empty", "too-many", "object-not-array", "item-not-object"],
)
def test_a_batch_that_is_not_an_array_of_1_to_64_objects_is_refused_whole(service, client, bodies, problem):
    response = classify_batch(client, service, bodies)
    assert response.status_code == 400
    assert problem in response.text


def test_a_job_whose_aicsd_is_away_is_a_502_item_to_try_later_and_the_others_complete(
    service, aicsd, client, file_root, photos
):
    cat = copy_into(file_root, photos["chelsea"], f"{uuid.uuid4()}.png")
    good, good_body = job_body(aicsd, cat, file_root / "output")
    _, away = job_body(aicsd, cat, file_root / "output")
    gone = f"127.0.0.1:{free_port()}"  # nothing listens there: AiCSD is away for this job
    for url in ("JobUpdateUrl", "PipelineStatusUrl"):
        away[url] = away[url].replace(urlsplit(away[url]).netloc, gone)

    items = classify_batch(client, service, [away, good_body]).json()

    assert [item["StatusCode"] for item in items] == [502, 200]
    assert items[0]["Body"]["Status"] == "" and items[0]["Body"]["Note"]
    assert_one_put_then_one_post(aicsd, good, "PipelineComplete")
