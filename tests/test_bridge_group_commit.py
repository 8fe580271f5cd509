"""Group commit on arrival: the spool writer stores every message waiting in one transaction synced
to disk and acknowledges them only then. A real broker; the real bridge process, or the real
receiver in process over the real spool that a test holds at its commit.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from bridge.receiver import Receiver
from bridge.spool import Arrival, DeadLetter, NewJob, Spool
from devtools.servers import Bridge, Broker, publish

from .test_bridge_forwarder import config, wait_until

pytestmark = pytest.mark.integration

TOPIC = "mqtt-export/pipeline/params"
NOWHERE = "http://127.0.0.1:9/classify"  # jobs are stored; none needs to be forwarded


def job(run: str, name: object) -> tuple[str, bytes]:
    """A valid AiCSD job message: its job id and its payload."""
    job_id = f"{run}-{name}"
    payload = {
        "InputFileLocation": "/tmp/files/input/1.tiff",
        "OutputFileFolder": "/tmp/files/output",
        "JobUpdateUrl": f"http://127.0.0.1:59784/api/v1/job/pipeline/{job_id}/task",
        "PipelineStatusUrl": f"http://127.0.0.1:59785/api/v1/pipelineStatus/{job_id}/task",
    }
    return job_id, json.dumps(payload).encode()


def job_id_of(payload: bytes) -> str:
    return str(json.loads(payload)["JobUpdateUrl"].rsplit("/", 2)[1])


def publish_at_once(port: int, payloads: Sequence[bytes]) -> None:
    """Publish every payload at QoS 1 without waiting for each; return once the broker has them all."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"burst-{uuid.uuid4().hex[:8]}")
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for sent in [client.publish(TOPIC, payload, qos=1) for payload in payloads]:
            sent.wait_for_publish(60)
    finally:
        client.disconnect()
        client.loop_stop()


def stored_job_ids(spool: Path) -> set[str]:
    db = sqlite3.connect(spool)
    try:
        return {row[0] for row in db.execute("SELECT job_id FROM jobs")}
    except sqlite3.OperationalError:  # the bridge has not created the table yet
        return set()
    finally:
        db.close()


def test_bridge_killed_mid_burst_has_stored_every_job_it_acknowledged(broker: Broker, bridges, tmp_path):
    """Whatever the broker no longer holds for the bridge's session, the bridge acknowledged: it
    must be in the spool. A kill -9 in the middle of a burst is the moment to look."""
    if not broker.keeps_sessions:
        pytest.skip(f"needs Mosquitto: {broker.kind} does not keep a persistent session's messages")
    bridge = Bridge(tmp_path / "bridge", NOWHERE, broker.port, client_id=f"bridge-{uuid.uuid4().hex[:8]}")
    bridges.append(bridge)
    bridge.start()
    run = uuid.uuid4().hex[:12]
    jobs = dict(job(run, n) for n in range(3000))
    publisher = threading.Thread(target=publish_at_once, args=(broker.port, list(jobs.values())))
    publisher.start()
    wait_until(lambda: len(stored_job_ids(bridge.spool)) >= 300, timeout=60)
    bridge.kill()
    publisher.join(60)
    stored = stored_job_ids(bridge.spool) & set(jobs)
    assert 0 < len(stored) < len(jobs), "the kill came before or after the burst: nothing was shown"

    # The broker sends the bridge's session what it holds: the unacknowledged and the queued.
    missing = set(jobs) - stored
    assert missing <= held_by_broker(broker.port, bridge.client_id, missing)


class HeldSpool(Spool):
    """The real spool; a test holds its commits of arrivals (`gate`), sees each one's size, and
    names a job id the spool fails on for a reason of its own (not a `SpoolError`)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = threading.Event()
        self.committing = threading.Event()
        self.commits: list[int] = []
        self.fails_on: str | None = None

    def store(self, arrivals: Sequence[NewJob | DeadLetter]) -> list[Arrival | None]:
        self.commits.append(len(arrivals))
        self.committing.set()
        assert self.gate.wait(30)
        if any(isinstance(item, NewJob) and item.job_id == self.fails_on for item in arrivals):
            raise TypeError("a bug in storing this one")
        return super().store(arrivals)


@pytest.fixture
def held(broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[tuple[Receiver, HeldSpool]]:
    """The receiver in process, subscribed, over a HeldSpool."""
    spool = HeldSpool(tmp_path / "spool.sqlite3")
    settings = config(NOWHERE, spool.path, mqtt_port=broker.port, topic=TOPIC,
                      client_id=f"bridge-{uuid.uuid4().hex[:8]}")
    receiver = Receiver(settings, spool, on_jobs=lambda count: None)
    caplog.set_level("INFO", logger="bridge")
    receiver.start()
    try:
        wait_until(lambda: "subscribed to" in caplog.text)
        yield receiver, spool
    finally:
        spool.gate.set()
        receiver.stop()
        # The receiver and its paho client refer to each other, and paho closes its socket pair
        # only when the client is collected: close it now rather than in a garbage collection.
        receiver.client.reinitialise()
        spool.close()


def held_by_broker(port: int, client_id: str, wanted: set[str]) -> set[str]:
    """The job ids the broker sends a session, once all of `wanted` came (or a minute passed)."""
    held: set[str] = set()
    checker = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
                          protocol=mqtt.MQTTv311)
    checker.on_message = lambda client, userdata, message: held.add(job_id_of(message.payload))
    checker.connect("127.0.0.1", port)
    checker.loop_start()
    try:
        wait_until(lambda: wanted <= held, timeout=60)
    finally:
        checker.disconnect()
        checker.loop_stop()
    return held


def test_a_message_is_not_acknowledged_before_its_commit_is_done(held, broker):
    if not broker.keeps_sessions:
        pytest.skip(f"needs Mosquitto: {broker.kind} does not keep a persistent session's messages")
    receiver, spool = held
    job_id, payload = job(uuid.uuid4().hex[:12], "held")
    publish(broker.port, [payload])
    assert spool.committing.wait(20)
    # The commit is held. Leave: an acknowledgement queued so far goes out before the DISCONNECT.
    receiver.client.disconnect()
    receiver.client.loop_stop()
    assert job_id in held_by_broker(broker.port, receiver.config.client_id, {job_id})


def test_a_lone_job_is_committed_at_once_and_jobs_arriving_during_a_commit_share_the_next(held, broker):
    receiver, spool = held
    run = uuid.uuid4().hex[:12]
    publish(broker.port, [job(run, "lone")[1]])
    assert spool.committing.wait(20), "a lone job waited for company"
    others = dict(job(run, n) for n in range(10))
    publish(broker.port, list(others.values()))
    wait_until(lambda: receiver.received == 11)  # the ten wait behind the lone job's commit
    spool.gate.set()
    wait_until(lambda: spool.counts().queued == 11)
    assert spool.commits[0] == 1 and spool.commits[1] >= 9, spool.commits
    assert receiver.spooled == 11 and receiver.unstored == 0


def test_a_message_the_spool_fails_on_does_not_hold_back_those_committed_with_it(held, broker):
    receiver, spool = held
    run = uuid.uuid4().hex[:12]
    publish(broker.port, [job(run, "lone")[1]])
    assert spool.committing.wait(20)
    spool.fails_on = f"{run}-bad"
    publish(broker.port, [job(run, "first")[1], job(run, "bad")[1], job(run, "last")[1]])
    wait_until(lambda: receiver.received == 4)
    spool.gate.set()
    wait_until(lambda: spool.counts().queued == 3)
    assert stored_job_ids(spool.path) == {f"{run}-lone", f"{run}-first", f"{run}-last"}
