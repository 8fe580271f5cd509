"""The bridge end to end: a real broker (Mosquitto, or amqtt where Mosquitto is missing), real
`bentoml serve`, the AiCSD stand-in.

Jobs use the small `tiny` model so that what is measured is the bridge, not the model.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.servers import Bridge, Broker, free_port, publish, serve_bento, stop_process

pytestmark = pytest.mark.integration

TOPIC = "mqtt-export/pipeline/params"


@pytest.fixture
def bridges(tmp_path: Path, broker: Broker, service) -> Iterator[list[Bridge]]:
    """Bridges a test starts are stopped at its end; the first one is started here."""
    started: list[Bridge] = []
    yield started
    for bridge in started:
        bridge.stop()


def start_bridge(started: list[Bridge], folder: Path, service_url: str, broker: Broker, **extra) -> Bridge:
    bridge = Bridge(folder, f"{service_url}/classify", broker.port, client_id=f"bridge-{uuid.uuid4().hex[:8]}",
                    extra=extra)
    started.append(bridge)
    return bridge.start()


def job_payload(aicsd, image: Path, output: Path, **changes) -> tuple[object, dict]:
    """A job of a task of the `tiny` pipeline, as AiCSD publishes it."""
    job = aicsd.new_job("ovms/tiny")
    payload = {
        "InputFileLocation": str(image),
        "OutputFileFolder": str(output),
        "ModelParams": {"Model": "tiny"},
        "JobUpdateUrl": job.job_update_url,
        "PipelineStatusUrl": job.pipeline_status_url,
        **changes,
    }
    return job, payload


def assert_exactly_once(aicsd, jobs, status: str = "PipelineComplete", timeout: float = 60) -> None:
    for job in jobs:
        aicsd.wait_for_status(job.job_id, timeout=timeout)
    for job in jobs:
        accepted = [(r.method, r.status_code) for r in aicsd.requests_for(job.job_id) if r.status_code == 200]
        assert accepted == [("PUT", 200), ("POST", 200)], (job.job_id, accepted)
        assert aicsd.job(job.job_id).stored_status == status


def test_published_jobs_reach_aicsd_as_one_update_then_one_status_each(
    bridges, broker, service, aicsd, file_root, image, tmp_path
):
    bridge = start_bridge(bridges, tmp_path / "bridge", service.url, broker)
    jobs, payloads = zip(*(job_payload(aicsd, image, file_root / "output") for _ in range(5)), strict=False)
    publish(broker.port, [json.dumps(p) for p in payloads])
    assert_exactly_once(aicsd, jobs)
    put = aicsd.requests_for(jobs[0].job_id)[0]
    assert json.loads(put.json["Results"])["top"][0]["label"] == "blue"
    bridge.wait_for_log("status: queued=0 in_flight=0 done=5")


def test_seed_message_without_gateway_ip_gets_the_bridge_gateway_ip_and_completes(
    bridges, broker, service, aicsd, file_root, image, tmp_path
):
    bridge = start_bridge(bridges, tmp_path / "bridge", service.url, broker)
    job, payload = job_payload(aicsd, image, file_root / "output", ModelParams={"Brightness": "0", "Model": "tiny"})
    assert "GatewayIP" not in payload
    publish(broker.port, [json.dumps(payload)], topic=TOPIC)
    assert_exactly_once(aicsd, [job])
    assert f"job={job.job_id} task={job.task_id} received from gateway 127.0.0.1" in service.log_text()
    bridge.wait_for_log(f"job={job.job_id} task={job.task_id} forwarded")


def test_same_job_published_again_after_it_completed_is_taken_again_and_the_service_answers_from_its_record(
    bridges, broker, service, aicsd, file_root, image, tmp_path
):
    bridge = start_bridge(bridges, tmp_path / "bridge", service.url, broker)
    job, payload = job_payload(aicsd, image, file_root / "output")
    publish(broker.port, [json.dumps(payload)])
    aicsd.wait_for_status(job.job_id, timeout=30)
    # AiCSD has the status before the bridge has the service's answer: until the bridge records the
    # job done, the same message again is a redelivery of a job in flight and is collapsed.
    bridge.wait_for_log(" forwarded (")
    publish(broker.port, [json.dumps(payload)])
    bridge.wait_for_log("published again after the bridge had finished it: taken again")
    bridge.wait_for_log(" forwarded (", count=2)
    time.sleep(0.5)
    assert [r.method for r in aicsd.requests_for(job.job_id)] == ["PUT", "POST"]


def test_malformed_payloads_are_dead_lettered_and_the_bridge_keeps_running(
    bridges, broker, service, aicsd, file_root, image, tmp_path
):
    from bridge.spool import Spool

    bridge = start_bridge(bridges, tmp_path / "bridge", service.url, broker)
    invalid_job, invalid = job_payload(aicsd, image, file_root / "output")
    del invalid["InputFileLocation"]
    payloads = [b"\xff\xfe\x00", b"{not json", b"[1,2,3]", b"42", json.dumps({"JobUpdateUrl": "x"}).encode(),
                json.dumps(invalid).encode()]
    publish(broker.port, payloads)
    good_job, good = job_payload(aicsd, image, file_root / "output")
    publish(broker.port, [json.dumps(good)])
    assert_exactly_once(aicsd, [good_job])
    # The job with usable callback URLs but a missing field is reported failed to AiCSD.
    state = aicsd.wait_for_status(invalid_job.job_id, timeout=30)
    assert state.stored_status == "PipelineFailed" and "InputFileLocation" in state.results
    bridge.wait_for_log("dead_lettered=6")
    reasons = [reason for _, _, reason in Spool(bridge.spool).dead_letters()]
    assert any("not UTF-8" in r for r in reasons) and any("not JSON" in r for r in reasons)
    assert any("JSON list, not an object" in r for r in reasons) and any("JSON int" in r for r in reasons)
    assert bridge.process.poll() is None


def test_service_refusing_a_job_with_422_makes_the_bridge_report_pipeline_failed(
    bridges, broker, service, file_root, image, tmp_path
):
    from devtools.aicsd_standin import AicsdStandIn

    # The service allows callbacks to 127.0.0.1 only; the bridge also to 127.0.0.2.
    bridge = start_bridge(bridges, tmp_path / "bridge", service.url, broker,
                          bridge={"callback_hosts": "127.0.0.1,127.0.0.2"})
    with AicsdStandIn(host="127.0.0.2") as elsewhere:
        job, payload = job_payload(elsewhere, image, file_root / "output")
        publish(broker.port, [json.dumps(payload)])
        state = elsewhere.wait_for_status(job.job_id, timeout=30)
        assert state.stored_status == "PipelineFailed"
        assert "service refused the job (422)" in state.results and "PIPELINE_CALLBACK_HOSTS" in state.results
    bridge.wait_for_log("dead_lettered=1")


def test_job_the_service_cannot_take_within_max_age_is_failed(bridges, broker, aicsd, file_root, image, tmp_path):
    nowhere = f"http://127.0.0.1:{free_port()}"
    bridge = start_bridge(bridges, tmp_path / "bridge", nowhere, broker, bridge={"max_age": 2})
    job, payload = job_payload(aicsd, image, file_root / "output")
    publish(broker.port, [json.dumps(payload)])
    state = aicsd.wait_for_status(job.job_id, timeout=30)
    assert state.stored_status == "PipelineFailed" and "bridge.max_age" in state.results
    assert "service unreachable" in state.results
    assert bridge.process.poll() is None


def test_bridge_killed_mid_stream_and_restarted_processes_all_50_jobs_exactly_once(
    bridges, broker, service, aicsd, file_root, image, tmp_path
):
    if not broker.keeps_sessions:
        pytest.skip(f"needs Mosquitto: {broker.kind} does not keep a persistent session's messages"
                    " (unacknowledged ones are not sent again)")
    folder = tmp_path / "bridge"
    bridge = start_bridge(bridges, folder, service.url, broker)
    jobs, payloads = zip(*(job_payload(aicsd, image, file_root / "output") for _ in range(50)), strict=False)
    publisher = threading.Thread(target=publish, args=(broker.port, [json.dumps(p) for p in payloads]),
                                 kwargs={"interval": 0.02})
    publisher.start()
    bridge.wait_for_log("forwarded", count=8, timeout=60)
    bridge.kill()
    time.sleep(0.5)
    bridge.start()  # same client id, same spool
    publisher.join(60)
    assert_exactly_once(aicsd, jobs, timeout=120)
    assert "resumed from a previous run" in bridge.log_text()


def test_broker_restarted_mid_stream_the_bridge_reconnects_and_jobs_flow(
    bridges, broker, service, aicsd, file_root, image, tmp_path
):
    if not broker.keeps_sessions:
        pytest.skip(f"needs Mosquitto: {broker.kind} does not keep a persistent session's messages"
                    " across a broker restart")
    bridge = start_bridge(bridges, tmp_path / "bridge", service.url, broker)
    first, payloads = zip(*(job_payload(aicsd, image, file_root / "output") for _ in range(10)), strict=False)
    publish(broker.port, [json.dumps(p) for p in payloads])
    broker.restart()
    bridge.wait_for_log("subscribed to", count=2, timeout=60)
    second, payloads = zip(*(job_payload(aicsd, image, file_root / "output") for _ in range(10)), strict=False)
    publish(broker.port, [json.dumps(p) for p in payloads])
    assert_exactly_once(aicsd, first + second, timeout=90)


def test_jobs_published_while_the_bridge_is_away_are_kept_by_the_broker(
    bridges, broker, service, aicsd, file_root, image, tmp_path
):
    if not broker.keeps_sessions:
        pytest.skip(f"needs Mosquitto: {broker.kind} does not keep a persistent session's messages"
                    " while its client is away")
    bridge = start_bridge(bridges, tmp_path / "bridge", service.url, broker)
    bridge.stop()
    jobs, payloads = zip(*(job_payload(aicsd, image, file_root / "output") for _ in range(5)), strict=False)
    publish(broker.port, [json.dumps(p) for p in payloads])
    bridge.start()
    assert_exactly_once(aicsd, jobs)


def test_service_down_for_20_seconds_jobs_are_delivered_when_it_returns(
    bridges, broker, aicsd, file_root, service_models, image, tmp_path
):
    port = free_port()
    bridge = start_bridge(bridges, tmp_path / "bridge", f"http://127.0.0.1:{port}", broker)
    jobs, payloads = zip(*(job_payload(aicsd, image, file_root / "output") for _ in range(5)), strict=False)
    publish(broker.port, [json.dumps(p) for p in payloads])
    bridge.wait_for_log("service unreachable", timeout=20)
    time.sleep(20)
    assert all(aicsd.requests_for(job.job_id) == [] for job in jobs)
    env = {
        "PIPELINE_MODELS_DIR": str(service_models),
        "PIPELINE_DEFAULT_MODEL": "tiny",
        "PIPELINE_FILE_ROOTS": str(file_root),
        "PIPELINE_CALLBACK_HOSTS": "127.0.0.1",
        "PIPELINE_CACHE_DIR": "",
        "PIPELINE_LEDGER": str(tmp_path / "late-ledger.sqlite3"),
    }
    late = serve_bento("service:AicsdPipeline", env=env, cwd=Path(__file__).resolve().parent.parent,
                 log_path=tmp_path / "late-service.log", port=port)
    try:
        assert_exactly_once(aicsd, jobs, timeout=90)
    finally:
        stop_process(late.process)


def test_two_bridges_in_a_shared_group_process_40_jobs_exactly_once_between_them(
    bridges, broker, service, aicsd, file_root, image, tmp_path
):
    if not broker.shares_subscriptions:
        pytest.skip(f"needs Mosquitto: {broker.kind} has no shared subscriptions ($share/<group>/<topic>)")
    shared = {"mqtt": {"shared_group": "pipelines"}}
    one = start_bridge(bridges, tmp_path / "one", service.url, broker, **shared)
    two = start_bridge(bridges, tmp_path / "two", service.url, broker, **shared)
    jobs, payloads = zip(*(job_payload(aicsd, image, file_root / "output") for _ in range(40)), strict=False)
    publish(broker.port, [json.dumps(p) for p in payloads])
    assert_exactly_once(aicsd, jobs, timeout=120)
    deadline = time.monotonic() + 10
    while True:  # the bridges log after the service answered, a moment after AiCSD heard
        handled = [bridge.log_text().count(" forwarded (") for bridge in (one, two)]
        if sum(handled) >= 40 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert sum(handled) == 40 and min(handled) > 0, handled


def test_sigterm_stops_the_bridge_cleanly_with_a_final_status_line(bridges, broker, service, tmp_path):
    bridge = start_bridge(bridges, tmp_path / "bridge", service.url, broker)
    assert bridge.stop() == 0
    text = bridge.log_text()
    assert "signal SIGTERM: stopping" in text and text.rstrip().endswith("stopped")
    assert text.count("status: ") >= 1


def test_bad_config_exits_non_zero_listing_every_problem(tmp_path):
    import subprocess
    import sys

    config = tmp_path / "config.yaml"
    config.write_text('service: {POST_url: "http://##.##.##.##", port: "3000"}\ngateway_ip: "##.##.##.##"\n'
                      "mqtt: {hostname: broker, port: 0}\n")
    result = subprocess.run([sys.executable, "paho_mqtt_client.py", str(config)], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent, timeout=60, check=False)
    assert result.returncode == 2
    for key in ("service.POST_url", "gateway_ip", "mqtt.port"):
        assert key in result.stderr
