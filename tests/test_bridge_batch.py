"""Batches: the forwarder sends a backlog to the service's batch API (`<service URL>_batch`), in
process, with a real spool, a loopback server standing in for the service and the AiCSD stand-in.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from aicsd.callbacks import AicsdClient, RetryPolicy
from bridge.config import ConfigError, load_config
from bridge.forwarder import Forwarder
from bridge.spool import Spool
from devtools.servers import free_port

from .test_bridge_forwarder import clock_that_ends_a_worker_once, config, scrape, wait_until
from .test_bridge_republish import StandInService
from .test_bridge_units import GOOD_CONFIG, write

COMPLETE = {"Status": "PipelineComplete", "QCFlags": "", "OutputFiles": []}
WARNINGS = "bridge.forwarder"


def spool_jobs(spool: Spool, aicsd, count: int, source: str = "/x") -> list[tuple[str, str]]:
    """`count` jobs queued in `spool`, each with the AiCSD stand-in's callback URLs and `source` as input."""
    keys = []
    for _ in range(count):
        urls = aicsd.new_job()
        payload = {"InputFileLocation": source, "OutputFileFolder": "/y", "JobUpdateUrl": urls.job_update_url,
                   "PipelineStatusUrl": urls.pipeline_status_url}
        spool.add(urls.job_id, urls.task_id, json.dumps(payload))
        keys.append((urls.job_id, urls.task_id))
    return keys


@contextmanager
def forwarding(service_url: str, spool: Spool, **changes: object) -> Iterator[Forwarder]:
    """A started forwarder over `spool`, stopped at the end."""
    client = AicsdClient(RetryPolicy(tries=1))
    forwarder = Forwarder(config(service_url, spool.path, **changes), spool, client)
    forwarder.start()
    try:
        yield forwarder
    finally:
        forwarder.stop(5)
        client.close()


def batch_sizes(service: StandInService) -> list[int]:
    return [len(sent) for path, sent in service.posts if path == "/classify_batch" and isinstance(sent, list)]


def warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def row(spool_path: Path, key: tuple[str, str]) -> tuple[str, str | None, int, int]:
    """A job's (state, last_error, attempts, service_answered), read from the spool's file."""
    with sqlite3.connect(spool_path) as db:
        return db.execute("SELECT state, last_error, attempts, service_answered FROM jobs"
                          " WHERE job_id = ? AND task_id = ?", key).fetchone()


def test_a_backlog_goes_in_a_few_full_batches_and_each_job_keeps_its_log_line(tmp_path, aicsd, caplog):
    caplog.set_level(logging.INFO, logger="bridge.forwarder")
    with StandInService(200, COMPLETE, batch=True) as service:
        spool = Spool(tmp_path / "s.db")
        keys = spool_jobs(spool, aicsd, 20)
        with forwarding(service.url, spool, concurrency=2, batch=8) as forwarder:
            wait_until(lambda: spool.counts().done == 20)
            figures = scrape(spool, forwarder)
    # One take of 16 (batch x concurrency) shared as 8 + 8, then the 4 left as 2 + 2.
    assert sorted(batch_sizes(service)) == [2, 2, 8, 8]
    assert len(service.posts) == 4 and len(service.requests) == 20
    assert (forwarder.forwarded, forwarder.requests) == (20, 4)
    assert (figures["aicsd_bridge_forwarded_total"], figures["aicsd_bridge_service_requests_total"]) == (20, 4)
    lines = [r.getMessage() for r in caplog.records if " forwarded (attempt 1): PipelineComplete" in r.getMessage()]
    assert sorted(line.split()[0] for line in lines) == sorted(f"job={job_id}" for job_id, _ in keys)
    sent = [job["JobUpdateUrl"] for job in service.requests]
    assert all(any(job_id in url for url in sent) for job_id, _ in keys)


def test_each_item_of_a_batch_answer_ends_its_own_job(tmp_path, aicsd):
    answers = {
        "/ok": (200, COMPLETE),
        "/bad": (400, {"error": "input file /bad does not exist", "field": "InputFileLocation"}),
        "/busy": (503, {"error": "AiCSD unreachable", "field": None}),
    }
    with StandInService(200, COMPLETE, batch=True) as service:
        service.answer = lambda job: answers[job["InputFileLocation"]]
        spool = Spool(tmp_path / "s.db")
        [ok] = spool_jobs(spool, aicsd, 1, "/ok")
        [bad] = spool_jobs(spool, aicsd, 1, "/bad")
        [busy] = spool_jobs(spool, aicsd, 1, "/busy")
        with forwarding(service.url, spool, batch=8, retry_initial=60, retry_max=60) as forwarder:
            state = aicsd.wait_for_status(bad[0])
            wait_until(lambda: spool.counts().queued == 1 and spool.counts().done == 1 and spool.counts().failed == 1)
    assert batch_sizes(service) == [3] and forwarder.requests == 1
    assert row(spool.path, ok)[0] == "done"
    assert state.stored_status == "PipelineFailed" and "input file /bad does not exist" in state.results
    [(_, _, reason)] = spool.dead_letters()
    assert reason.startswith("service refused the job (400): ") and '"field": "InputFileLocation"' in reason
    queued, error, attempts, answered = row(spool.path, busy)
    assert (queued, attempts, answered) == ("queued", 1, 1) and "service answered 503" in (error or "")
    assert aicsd.requests_for(ok[0]) == [] and aicsd.requests_for(busy[0]) == []


def test_a_service_without_the_batch_api_gets_one_warning_and_single_requests_from_then_on(tmp_path, aicsd, caplog):
    with StandInService(200, COMPLETE) as service:  # no batch API: 404 on /classify_batch
        spool = Spool(tmp_path / "s.db")
        spool_jobs(spool, aicsd, 6)
        with forwarding(service.url, spool, concurrency=2, batch=8) as forwarder:
            wait_until(lambda: spool.counts().done == 6)
            tried = service.paths.count("/classify_batch")
            spool_jobs(spool, aicsd, 6)
            forwarder.notify(6)
            wait_until(lambda: spool.counts().done == 12)
    assert 1 <= tried <= 2  # both workers may have sent their first batch before the 404
    assert service.paths.count("/classify_batch") == tried
    assert service.paths.count("/classify") == 12 and len(service.requests) == 12
    [line] = warnings(caplog, "_batch")
    assert f"{service.url}_batch answered 404" in line and "one job per request" in line


@pytest.mark.parametrize("reply, problem", [
    ((200, b"not json"), "not JSON"),
    ((200, b'{"StatusCode": 200, "Body": {}}'), "a JSON dict, not an array"),
    ((200, b'[{"StatusCode": 200, "Body": {}}]'), "1 items for 3 jobs"),
    ((200, json.dumps([{"StatusCode": 200, "Body": {}}] * 4).encode()), "4 items for 3 jobs"),
    ((200, b'[{"StatusCode": 200, "Body": {}}, {"StatusCode": "200", "Body": {}}, 7]'), "item 1 not an object"),
    ((200, b'[{"StatusCode": 200, "Body": {}}, {"StatusCode": 200, "Body": "done"}, 7]'), "item 1 not an object"),
    ((400, b'{"error": "too many jobs", "field": null}'), "answered 400: "),
], ids=["not-json", "object", "short", "long", "status-text", "body-text", "refused"])
def test_an_unusable_batch_answer_sends_that_batchs_jobs_one_by_one(tmp_path, aicsd, caplog, reply, problem):
    with StandInService(200, COMPLETE, batch=True) as service:
        service.batch_reply = reply
        spool = Spool(tmp_path / "s.db")
        spool_jobs(spool, aicsd, 3)
        with forwarding(service.url, spool, batch=8) as forwarder:
            wait_until(lambda: spool.counts().done == 3)
            service.batch_reply = None
            spool_jobs(spool, aicsd, 3)
            forwarder.notify(3)
            wait_until(lambda: spool.counts().done == 6)
    # The failed batch, its 3 jobs alone, then the next backlog as a batch again.
    assert service.paths == ["/classify_batch"] + ["/classify"] * 3 + ["/classify_batch"]
    [line] = warnings(caplog, "_batch")
    assert problem in line and "forwarding the batch's 3 jobs one by one" in line
    assert forwarder.forwarded == 6 and spool.counts().failed == 0


def test_a_batch_the_service_cannot_be_reached_for_is_retried_whole(tmp_path, aicsd, caplog):
    port = free_port()  # nothing listens there at first
    spool = Spool(tmp_path / "s.db")
    keys = spool_jobs(spool, aicsd, 4)
    with forwarding(f"http://127.0.0.1:{port}/classify", spool, batch=8, retry_initial=0.5, retry_max=0.5):
        wait_until(lambda: len(warnings(caplog, "attempt 1 failed")) == 4)
        assert all("service unreachable" in line for line in warnings(caplog, "attempt 1 failed"))
        with StandInService(200, COMPLETE, batch=True, port=port) as service:
            wait_until(lambda: spool.counts().done == 4)
    assert all(row(spool.path, key)[2] >= 2 for key in keys)
    assert batch_sizes(service)[0] == 4 and sum(batch_sizes(service)) == 4
    assert all(aicsd.requests_for(job_id) == [] for job_id, _ in keys)


def test_a_batch_answer_cut_off_halfway_is_retried_whole_and_each_job_ends_once(tmp_path, aicsd, caplog):
    with StandInService(200, COMPLETE, batch=True) as service:
        service.cut_batches = 1
        spool = Spool(tmp_path / "s.db")
        keys = spool_jobs(spool, aicsd, 4)
        with forwarding(service.url, spool, batch=8, retry_initial=0.2, retry_max=0.2) as forwarder:
            wait_until(lambda: spool.counts().done == 4)
    # The first answer was lost with its connection: the service may have run the jobs, and its
    # ledger answers them again from what it stored; the bridge decides nothing from half an answer.
    assert batch_sizes(service) == [4, 4] and forwarder.forwarded == 4
    assert len(warnings(caplog, "attempt 1 failed")) == 4
    assert spool.counts().failed == 0 and spool.dead_letters() == []
    assert all(row(spool.path, key)[2] == 2 for key in keys)
    assert all(aicsd.requests_for(job_id) == [] for job_id, _ in keys)


def test_a_batch_of_one_and_batch_1_use_the_single_url(tmp_path, aicsd):
    with StandInService(200, COMPLETE, batch=True) as service:
        spool = Spool(tmp_path / "s.db")
        spool_jobs(spool, aicsd, 10)
        with forwarding(service.url, spool, concurrency=2, batch=1) as forwarder:
            wait_until(lambda: spool.counts().done == 10)
        assert service.paths == ["/classify"] * 10 and forwarder.requests == 10
        spool_jobs(spool, aicsd, 1)
        with forwarding(service.url, spool, concurrency=2, batch=8):
            wait_until(lambda: spool.counts().done == 11)
    assert service.paths == ["/classify"] * 11


def test_a_batch_answer_larger_than_one_single_answer_is_read(tmp_path, aicsd):
    big = {**COMPLETE, "Note": "x" * 700_000}  # two of them pass the 1 MiB of one answer
    with StandInService(200, big, batch=True) as service:
        spool = Spool(tmp_path / "s.db")
        spool_jobs(spool, aicsd, 2)
        with forwarding(service.url, spool, batch=2) as forwarder:
            wait_until(lambda: spool.counts().done == 2)
    assert batch_sizes(service) == [2] and forwarder.requests == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread ends on purpose
def test_a_worker_that_ends_holding_a_batch_has_every_job_of_it_queued_again(tmp_path, aicsd):
    clock = clock_that_ends_a_worker_once()
    with StandInService(200, COMPLETE, batch=True) as service:
        spool = Spool(tmp_path / "s.db")
        spool_jobs(spool, aicsd, 3)
        forwarder = Forwarder(config(service.url, spool.path, batch=8), spool, AicsdClient(), clock=clock)
        forwarder.start()
        try:
            wait_until(lambda: forwarder.alive == 0)
            assert spool.counts().inflight == 3
            assert forwarder.supervise() == 1
            wait_until(lambda: spool.counts().done == 3)
        finally:
            forwarder.stop(5)
    assert batch_sizes(service) == [3]


class TestBatchConfig:
    def test_batch_defaults_to_8_and_its_url_is_the_service_url_with_batch_appended(self, tmp_path):
        loaded = load_config(write(tmp_path, GOOD_CONFIG), env={})
        assert (loaded.batch, loaded.batch_url) == (8, "http://localhost:3000/classify_batch")
        text = GOOD_CONFIG + "bridge: {batch: 64}\n"
        assert load_config(write(tmp_path, text), env={}).batch == 64
        env = {"BRIDGE_SERVICE_URL": "http://10.0.0.5:3001/api/classify/?x=1"}
        assert load_config(write(tmp_path, GOOD_CONFIG), env=env).batch_url == "http://10.0.0.5:3001/api/classify_batch?x=1"

    @pytest.mark.parametrize("value", [0, 65, "many"])
    def test_batch_outside_1_to_64_is_refused_naming_the_key(self, tmp_path, value):
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, GOOD_CONFIG + f"bridge: {{batch: {value}}}\n"), env={})
        [problem] = info.value.problems
        assert problem.startswith("bridge.batch: ")

    def test_the_shipped_file_says_8(self):
        from .test_bridge_units import REPO

        shipped = load_config(REPO / "pythonClientConfig.yaml", env={"BRIDGE_SERVICE_URL": "http://localhost:3000/classify",
                                                                      "BRIDGE_GATEWAY_IP": "10.0.0.1"})
        assert shipped.batch == 8
