"""The forwarder in process: a real spool, a loopback HTTP server for the service, the AiCSD stand-in.

Faults the bridge does not foresee are injected through the forwarder's clock, the one seam it
has: a clock that raises stands for any bug in a worker's turn.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from aicsd.callbacks import AicsdClient, RetryPolicy
from bridge.config import BridgeConfig
from bridge.forwarder import Forwarder
from bridge.spool import Spool

from .test_bridge_republish import StandInService


def config(service_url: str, spool: Path, **changes: object) -> BridgeConfig:
    values: dict = {
        "service_url": service_url, "gateway_ip": "127.0.0.1", "mqtt_hostname": "127.0.0.1", "mqtt_port": 1883,
        "topic": "t", "qos": 1, "client_id": "c", "username": None, "password": None, "tls": None,
        "shared_group": None, "keepalive": 60, "concurrency": 1, "spool": spool, "request_timeout": 10,
        "retry_initial": 0.01, "retry_max": 0.05, "max_age": 60, "status_interval": 1,
        "callback_hosts": frozenset({"127.0.0.1"}),
    }
    return BridgeConfig(**{**values, **changes})


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def spooled_job(spool: Spool, aicsd) -> tuple[str, str]:
    urls = aicsd.new_job()
    payload = {"InputFileLocation": "/x", "OutputFileFolder": "/y", "JobUpdateUrl": urls.job_update_url,
               "PipelineStatusUrl": urls.pipeline_status_url}
    spool.add(urls.job_id, urls.task_id, json.dumps(payload))
    return urls.job_id, urls.task_id


def clock_that_ends_a_worker_once() -> Callable[[], float]:
    """The forwarder's clock, raising SystemExit (not an Exception: it ends the worker's thread)
    the first time it is read, and telling the time after."""
    faults = [SystemExit("a worker ends")]

    def clock() -> float:
        if faults:
            raise faults.pop()
        return time.time()

    return clock


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread ends on purpose
def test_a_worker_that_ends_is_restarted_and_its_job_still_goes_through(tmp_path, aicsd):
    clock = clock_that_ends_a_worker_once()
    with StandInService(200, {"Status": "PipelineComplete"}) as service:
        spool = Spool(tmp_path / "s.db")
        key = spooled_job(spool, aicsd)
        forwarder = Forwarder(config(service.url, tmp_path / "s.db"), spool, AicsdClient(), clock=clock)
        forwarder.start()
        try:
            wait_until(lambda: forwarder.alive == 0)
            assert spool.counts().inflight == 1
            assert forwarder.supervise() == 1
            wait_until(lambda: spool.counts().done == 1)
            assert forwarder.alive == 1 and len(service.requests) == 1 and key[0] in service.requests[0]["JobUpdateUrl"]
        finally:
            forwarder.stop(5)


def test_a_job_that_keeps_hitting_unexpected_errors_is_failed_after_three_and_aicsd_is_told(tmp_path, aicsd):
    def clock() -> float:
        raise RuntimeError("a bug in the bridge")

    with StandInService(200, {"Status": "PipelineComplete"}) as service:
        spool = Spool(tmp_path / "s.db")
        job_id, _ = spooled_job(spool, aicsd)
        client = AicsdClient(RetryPolicy(tries=1))
        forwarder = Forwarder(config(service.url, tmp_path / "s.db"), spool, client, clock=clock)
        forwarder.start()
        try:
            state = aicsd.wait_for_status(job_id, timeout=30)
            wait_until(lambda: spool.counts().failed == 1)
            assert forwarder.alive == 1  # the worker lived through every error
        finally:
            forwarder.stop(5)
            client.close()
    assert state.stored_status == "PipelineFailed" and "a bug in the bridge" in state.results
    [(_, _, reason)] = spool.dead_letters()
    assert "RuntimeError: a bug in the bridge (3 times, bridge.max_unexpected_errors)" in reason
    assert service.requests == []


def scrape(spool: Spool, forwarder: Forwarder) -> dict[str, float]:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from bridge.metrics import BridgeCollector
    from bridge.receiver import Receiver

    receiver = Receiver(forwarder.config, spool, on_jobs=forwarder.notify)
    registry = CollectorRegistry()
    registry.register(BridgeCollector(spool, receiver, forwarder, forwarder.config.concurrency))
    text = generate_latest(registry).decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.mark.parametrize("batch, expected", [(1, (4, 1)), (2, (3, 2))], ids=["single", "batches"])
def test_jobs_taken_ahead_for_a_worker_count_as_queued_not_in_flight(tmp_path, aicsd, batch, expected):
    with StandInService(200, {"Status": "PipelineComplete"}, batch=True) as service:
        service.gate.clear()  # the service holds the first request
        spool = Spool(tmp_path / "s.db")
        for _ in range(5):
            spooled_job(spool, aicsd)
        forwarder = Forwarder(config(service.url, tmp_path / "s.db", batch=batch), spool, AicsdClient())
        forwarder.start()
        try:
            wait_until(lambda: len(service.posts) == 1)
            counts, figures = forwarder.counts(), scrape(spool, forwarder)
            assert (counts.queued, counts.inflight) == expected
            assert (figures["aicsd_bridge_queue_depth"], figures["aicsd_bridge_in_flight"]) == expected
            service.gate.set()
            wait_until(lambda: spool.counts().done == 5)
            figures = scrape(spool, forwarder)
            assert (figures["aicsd_bridge_queue_depth"], figures["aicsd_bridge_in_flight"]) == (0, 0)
        finally:
            forwarder.stop(5)


def test_jobs_taken_ahead_go_back_to_the_queue_when_the_bridge_stops(tmp_path, aicsd):
    with StandInService(200, {"Status": "PipelineComplete"}) as service:
        service.gate.clear()  # the first job is still at the service when the bridge stops
        spool = Spool(tmp_path / "s.db")
        for _ in range(5):
            spooled_job(spool, aicsd)
        forwarder = Forwarder(config(service.url, tmp_path / "s.db"), spool, AicsdClient())
        forwarder.start()
        wait_until(lambda: len(service.requests) == 1)
        forwarder.stop(0.5)
        counts = spool.counts()
        assert (counts.queued, counts.inflight, counts.done) == (5, 0, 0)


def test_a_job_whose_first_answer_is_a_5xx_after_max_age_is_left_to_the_service_to_report(tmp_path, aicsd):
    with StandInService(503, {"detail": "busy elsewhere"}) as service:
        service.gate.clear()  # the answer comes after the job has grown too old
        spool = Spool(tmp_path / "s.db")
        job_id, _ = spooled_job(spool, aicsd)
        forwarder = Forwarder(config(service.url, tmp_path / "s.db", max_age=1.0), spool, AicsdClient())
        forwarder.start()
        try:
            wait_until(lambda: len(service.requests) == 1)
            time.sleep(1.2)
            service.gate.set()
            wait_until(lambda: spool.counts().failed == 1)
        finally:
            forwarder.stop(5)
    time.sleep(0.5)  # a callback the bridge sent would have arrived by now
    assert aicsd.requests_for(job_id) == []
    (reason,) = [reason for *_, reason in spool.dead_letters()]
    assert "service answered 503" in reason and "the service had the job" in reason
