"""`/classify_batch`: several jobs in one request, each answered as `/classify` would answer it alone.

Real `bentoml serve`, real model, real files, the AiCSD stand-in; each test makes its own jobs.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


class SlowTaskLauncher(ThreadingHTTPServer):
    """AiCSD on a loopback port whose task launcher takes `delay` seconds to name a task's pipeline
    (each job of its own task, so each job asks), counting the look-ups under way at once; the job
    update and the status are accepted at once."""

    daemon_threads = True

    def __init__(self, delay: float) -> None:
        super().__init__(("127.0.0.1", 0), _SlowAicsd)
        self.delay = delay
        self.lock = threading.Lock()
        self.under_way = 0
        self.most_at_once = 0
        self.statuses: list[str] = []

    def job(self, file_root) -> dict:
        job_id, task_id = uuid.uuid4().hex, uuid.uuid4().hex
        base = f"http://127.0.0.1:{self.server_address[1]}/api/v1"
        return {"InputFileLocation": str(file_root / "input" / f"{job_id}-absent.png"),
                "OutputFileFolder": str(file_root / "output"), "ModelParams": {},
                "JobUpdateUrl": f"{base}/job/pipeline/{job_id}/{task_id}",
                "PipelineStatusUrl": f"{base}/pipelineStatus/{job_id}/{task_id}", "GatewayIP": "127.0.0.1"}


class _SlowAicsd(BaseHTTPRequestHandler):
    server: SlowTaskLauncher

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.under_way += 1
            self.server.most_at_once = max(self.server.most_at_once, self.server.under_way)
        time.sleep(self.server.delay)
        with self.server.lock:
            self.server.under_way -= 1
        self._answer(json.dumps({"Id": self.path.rsplit("/", 1)[-1], "PipelineId": "ovms/efficientnet-lite0"}))

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self._answer("")

    def do_POST(self) -> None:
        status = self.rfile.read(int(self.headers["Content-Length"])).decode()
        with self.server.lock:
            self.server.statuses.append(status)
        self._answer("")

    def _answer(self, body: str) -> None:
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def test_classify_and_batches_together_run_no_more_jobs_at_once_than_the_services_threads(service, file_root):
    aicsd = SlowTaskLauncher(delay=0.4)
    thread = threading.Thread(target=aicsd.serve_forever, daemon=True)
    thread.start()
    try:
        with ThreadPoolExecutor(8) as pool, httpx.Client(timeout=120, trust_env=False) as client:
            batches = [pool.submit(classify_batch, client, service, [aicsd.job(file_root) for _ in range(6)])
                       for _ in range(2)]
            singles = [pool.submit(classify, client, service, aicsd.job(file_root)) for _ in range(6)]
            answers = [f.result() for f in batches + singles]
    finally:
        aicsd.shutdown()
        aicsd.server_close()
        thread.join(5)
    assert [a.status_code for a in answers] == [200] * 8
    assert len(aicsd.statuses) == 18 and set(aicsd.statuses) == {"PipelineFailed"}  # no such input file
    # bentoml.yaml's threads: 4. Each API with its own limit would have run 8 at once.
    assert aicsd.most_at_once == 4
