"""The bridge's Prometheus metrics (`bridge.metrics_port`), read from a real bridge process while
jobs go through a real broker to the real service and the AiCSD stand-in: every counter and gauge
must say what happened."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.spool import Spool
from devtools.servers import REPO, Bridge, Broker, free_port, publish

from .test_bridge import assert_exactly_once, job_payload
from .test_bridge_republish import PortForward

pytestmark = pytest.mark.integration

P = "aicsd_bridge_"


def scrape(url: str) -> dict[str, float]:
    """Every unlabelled sample of the endpoint, by name (counters with their `_total`)."""
    with httpx.Client(timeout=10, trust_env=False) as http:
        answer = http.get(url)
    assert answer.status_code == 200, answer.text
    return {s.name: s.value for f in text_string_to_metric_families(answer.text) for s in f.samples if not s.labels}


def wait_for_metrics(url: str, check: Callable[[dict[str, float]], bool], timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        figures = scrape(url)
        if check(figures):
            return figures
        if time.monotonic() > deadline:
            raise TimeoutError(f"metrics never matched: {figures}")
        time.sleep(0.1)


def listening(process: subprocess.Popen) -> set[tuple[str, int]]:
    """The TCP addresses the process listens on."""
    connections = psutil.Process(process.pid).net_connections(kind="tcp")
    return {(c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN}


def test_counters_and_gauges_say_what_happened_to_the_jobs(
    bridges, broker: Broker, service, aicsd, file_root, image, tmp_path
):
    # The service is reached through a relay started only later, so the first job stays queued.
    relay_port = free_port()
    bridge = Bridge(tmp_path / "bridge", f"http://127.0.0.1:{relay_port}/classify", broker.port,
                    client_id=f"bridge-{uuid.uuid4().hex[:8]}", metrics_port=free_port())
    bridges.append(bridge)
    bridge.start()
    assert listening(bridge.process) == {("127.0.0.1", bridge.metrics_port)}
    before = scrape(bridge.metrics_url)
    assert before[P + "broker_connected"] == 1 and before[P + "workers_alive"] == before[P + "workers"] == 2
    assert before[P + "received_total"] == before[P + "queue_depth"] == before[P + "oldest_job_age_seconds"] == 0
    assert before["process_resident_memory_bytes"] > 0

    first, first_payload = job_payload(aicsd, image, file_root / "output")
    publish(broker.port, [json.dumps(first_payload)])
    bridge.wait_for_log(f"job={first.job_id} task={first.task_id} attempt 1 failed")
    publish(broker.port, [json.dumps(first_payload)])
    bridge.wait_for_log(f"job={first.job_id} task={first.task_id} received again while still queued or in flight")
    waiting = scrape(bridge.metrics_url)
    assert (waiting[P + "received_total"], waiting[P + "spooled_total"], waiting[P + "duplicates_total"]) == (2, 1, 1)
    assert waiting[P + "queue_depth"] + waiting[P + "in_flight"] == 1 and waiting[P + "oldest_job_age_seconds"] > 0
    assert waiting[P + "forwarded_total"] == 0

    relay = PortForward(relay_port, int(urlsplit(service.url).port or 0))
    try:
        jobs, payloads = zip(*(job_payload(aicsd, image, file_root / "output") for _ in range(2)), strict=True)
        # A job AiCSD cannot be told about: a field missing, and ids the job repository does not know.
        _, unknown = job_payload(aicsd, image, file_root / "output")
        ids = f"/{uuid.uuid4().hex}/{uuid.uuid4().hex}"
        for url in ("JobUpdateUrl", "PipelineStatusUrl"):
            unknown[url] = unknown[url].rsplit("/", 2)[0] + ids
        del unknown["InputFileLocation"]
        publish(broker.port, [json.dumps(p) for p in payloads] + [b"{not json", json.dumps(unknown)])
        assert_exactly_once(aicsd, [first, *jobs])
        bridge.wait_for_log("queued=0 in_flight=0 done=3 failed=1 dead_lettered=2")
        publish(broker.port, [json.dumps(first_payload)])  # AiCSD publishes it again: taken again
        bridge.wait_for_log(f"job={first.job_id} task={first.task_id} forwarded", count=2)
        after = wait_for_metrics(bridge.metrics_url, lambda m: m[P + "queue_depth"] + m[P + "in_flight"] == 0)
    finally:
        relay.close()
    counters = {name: after[f"{P}{name}_total"] for name in
                ("received", "spooled", "duplicates", "taken_again", "forwarded", "dead_lettered", "callback_failures")}
    assert counters == {"received": 7, "spooled": 5, "duplicates": 1, "taken_again": 1, "forwarded": 4,
                        "dead_lettered": 2, "callback_failures": 1}
    assert after[P + "oldest_job_age_seconds"] == 0 and after[P + "spool_ok"] == 1
    assert after[P + "broker_connected"] == 1 and after[P + "workers_alive"] == 2
    assert after[P + "unacknowledged_messages"] == after[P + "unrecorded_results"] == 0


def test_broker_connected_falls_to_zero_while_the_broker_is_away(bridges, broker: Broker, tmp_path):
    bridge = Bridge(tmp_path / "bridge", "http://127.0.0.1:9/classify", broker.port,
                    client_id=f"bridge-{uuid.uuid4().hex[:8]}", metrics_port=free_port())
    bridges.append(bridge)
    bridge.start()
    assert scrape(bridge.metrics_url)[P + "broker_connected"] == 1
    broker.stop()
    try:
        wait_for_metrics(bridge.metrics_url, lambda m: m[P + "broker_connected"] == 0)
    finally:
        broker.start()
    wait_for_metrics(bridge.metrics_url, lambda m: m[P + "broker_connected"] == 1)


def test_metrics_port_0_serves_nothing(bridges, broker: Broker, tmp_path):
    bridge = Bridge(tmp_path / "bridge", "http://127.0.0.1:9/classify", broker.port,
                    client_id=f"bridge-{uuid.uuid4().hex[:8]}", metrics_port=0)
    bridges.append(bridge)
    bridge.start()
    assert "metrics off (bridge.metrics_port is 0)" in bridge.log_text()
    assert listening(bridge.process) == set()


def test_a_metrics_port_already_taken_stops_start_up_with_one_line_and_exit_code_2(tmp_path: Path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = tmp_path / "config.yaml"
        config.write_text(
            'service: {POST_url: "http://127.0.0.1", port: "3000"}\ngateway_ip: "127.0.0.1"\n'
            f"mqtt: {{hostname: 127.0.0.1, port: {free_port()}}}\n"
            f"bridge: {{spool: {tmp_path / 'spool.db'}, metrics_address: 127.0.0.1, metrics_port: {port}}}\n"
        )
        result = subprocess.run([sys.executable, "paho_mqtt_client.py", str(config)], capture_output=True,
                                text=True, cwd=REPO, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "[INFO]" not in line]
    assert len(errors) == 1 and errors[0].startswith(f"error: bridge.metrics_port: cannot listen on 127.0.0.1:{port}")


def test_a_backlog_reaches_the_real_service_in_batches_and_every_job_completes_once(
    bridges, broker: Broker, service, aicsd, file_root, image, tmp_path
):
    # A backlog the bridge finds in its spool at start-up (jobs received before a restart): all
    # due at once, whatever pace the broker delivers at.
    bridge = Bridge(tmp_path / "bridge", f"{service.url}/classify", broker.port,
                    client_id=f"bridge-{uuid.uuid4().hex[:8]}", metrics_port=free_port())
    bridge.folder.mkdir(parents=True)
    spool = Spool(bridge.spool)
    jobs = []
    for _ in range(12):
        job, payload = job_payload(aicsd, image, file_root / "output")
        spool.add(job.job_id, job.task_id, json.dumps(payload))
        jobs.append(job)
    spool.close()
    bridges.append(bridge)
    bridge.start()
    assert_exactly_once(aicsd, jobs)
    after = wait_for_metrics(bridge.metrics_url, lambda m: m[P + "forwarded_total"] == 12)
    # Each request carried several jobs: fewer requests than jobs.
    assert after[P + "service_requests_total"] < 12
