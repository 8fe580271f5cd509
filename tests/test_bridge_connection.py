"""The bridge and its broker connection: the cause of every failed connection is in the log, and
the bridge announces itself on its status topic (retained `online`, `offline` on a clean stop,
`offline` as its last will). Real broker processes on loopback, the real bridge process.

TLS and password tests need Mosquitto (amqtt has neither here); the DNS test needs root, to
give the bridge a resolver of its own that answers nothing and sends no query anywhere.
"""

from __future__ import annotations

import os
import queue
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from devtools.servers import Bridge, Broker, BrokerTls, free_port, have_program

pytestmark = pytest.mark.integration

NOWHERE = "http://127.0.0.1:9/classify"  # the service is not needed: no job is published


def new_bridge(folder: Path, broker_port: int, **extra) -> Bridge:
    return Bridge(folder, NOWHERE, broker_port, client_id=f"bridge-{uuid.uuid4().hex[:8]}", extra=extra)


def needs_mosquitto() -> None:
    if not have_program("mosquitto"):
        pytest.skip("needs Mosquitto for a TLS listener or a password file (amqtt is set up without them)")


def test_refused_connection_is_logged_with_its_cause(bridges, tmp_path):
    port = free_port()
    bridge = new_bridge(tmp_path / "bridge", port)
    bridges.append(bridge)
    bridge.start(wait_for=None)
    bridge.wait_for_log(f"broker connection failed: refused: nothing accepts connections on 127.0.0.1:{port}")
    bridge.wait_for_log("broker=down (refused: ")


def test_broker_name_that_does_not_resolve_is_logged_as_dns(bridges, tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare, to give the bridge a resolver of its own")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")  # nothing listens there: no query leaves the machine
    bridge = new_bridge(tmp_path / "bridge", 1883)
    bridge.broker_host = "broker.invalid"
    bridge.prefix = ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"',
                     str(resolv)]
    bridges.append(bridge)
    bridge.start(wait_for=None)
    bridge.wait_for_log("broker connection failed: DNS: the broker name 'broker.invalid' does not resolve")
    bridge.wait_for_log("broker=down (DNS: ")


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[Broker, object]]:
    """Mosquitto with a TLS listener whose certificate names 127.0.0.1, and the CA that signed it."""
    needs_mosquitto()
    import trustme

    ca = trustme.CA()
    folder = tmp_path / "tls-broker"
    folder.mkdir()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))
    server.private_key_pem.write_to_path(str(folder / "server.key"))
    broker = Broker(folder, kind="mosquitto", tls=BrokerTls(folder / "server.pem", folder / "server.key")).start()
    try:
        yield broker, ca
    finally:
        broker.stop()


def test_tls_broker_with_the_right_ca_is_connected(bridges, tls_broker, tmp_path):
    broker, _ = tls_broker
    bridge = new_bridge(tmp_path / "bridge", broker.port, mqtt={"tls": {"ca_certs": str(broker.folder / "ca.pem")}})
    bridges.append(bridge)
    bridge.start()
    bridge.wait_for_log("broker=connected")


def test_tls_broker_signed_by_another_ca_is_logged_as_a_tls_failure(bridges, tls_broker, tmp_path):
    import trustme

    broker, _ = tls_broker
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    bridge = new_bridge(tmp_path / "bridge", broker.port, mqtt={"tls": {"ca_certs": str(other)}})
    bridges.append(bridge)
    bridge.start(wait_for=None)
    bridge.wait_for_log("broker connection failed: TLS: the broker's certificate is not accepted for '127.0.0.1'")
    assert "certificate verify failed" in bridge.log_text() or "local issuer" in bridge.log_text()
    bridge.wait_for_log("broker=down (TLS: ")


def test_tls_certificate_for_another_name_is_logged_as_a_tls_failure(bridges, tmp_path):
    needs_mosquitto()
    import trustme

    ca = trustme.CA()
    folder = tmp_path / "tls-broker"
    folder.mkdir()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    server = ca.issue_cert("broker.example")
    server.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))
    server.private_key_pem.write_to_path(str(folder / "server.key"))
    broker = Broker(folder, kind="mosquitto", tls=BrokerTls(folder / "server.pem", folder / "server.key")).start()
    try:
        bridge = new_bridge(tmp_path / "bridge", broker.port, mqtt={"tls": {"ca_certs": str(folder / "ca.pem")}})
        bridges.append(bridge)
        bridge.start(wait_for=None)
        bridge.wait_for_log("broker connection failed: TLS: the broker's certificate is not accepted")
        assert "mismatch" in bridge.log_text()
    finally:
        broker.stop()


def test_wrong_password_is_logged_as_an_auth_failure(bridges, tmp_path):
    needs_mosquitto()
    broker = Broker(tmp_path / "broker", kind="mosquitto", passwords={"bridge": "right"}).start()
    try:
        bridge = new_bridge(tmp_path / "bridge", broker.port, mqtt={"username": "bridge", "password": "wrong"})
        bridges.append(bridge)
        bridge.start(wait_for=None)
        bridge.wait_for_log("auth: the broker refused the credentials")
        bridge.wait_for_log("broker=down (auth: ")
    finally:
        broker.stop()


@contextmanager
def watch(port: int, topic: str) -> Iterator[queue.Queue]:
    """Messages on `topic` (retained ones first) as (payload, retain) pairs."""
    seen: queue.Queue = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"watcher-{uuid.uuid4().hex[:8]}")
    client.on_connect = lambda c, u, f, r, p: c.subscribe(topic, qos=1)
    client.on_message = lambda c, u, m: seen.put((m.payload.decode(), m.retain))
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        yield seen
    finally:
        client.disconnect()
        client.loop_stop()


def test_bridge_says_online_retained_and_offline_when_stopped_with_sigterm(broker, bridges, tmp_path):
    bridge = new_bridge(tmp_path / "bridge", broker.port)
    bridges.append(bridge)
    topic = f"aicsd-pipeline/bridge/{bridge.client_id}/status"
    bridge.start()
    with watch(broker.port, topic) as seen:  # subscribed after the fact: the retained message
        assert seen.get(timeout=10) == ("online", True)
        assert bridge.stop() == 0
        assert seen.get(timeout=10)[0] == "offline"
    with watch(broker.port, topic) as seen:
        assert seen.get(timeout=10) == ("offline", True)


def test_killed_bridge_is_announced_offline_by_its_last_will(broker, bridges, tmp_path):
    bridge = new_bridge(tmp_path / "bridge", broker.port,
                        mqtt={"keepalive": 2, "status_topic": "pipelines/{client_id}"})
    bridges.append(bridge)
    topic = f"pipelines/{bridge.client_id}"
    bridge.start()
    with watch(broker.port, topic) as seen:
        assert seen.get(timeout=10) == ("online", True)
        bridge.kill()
        assert seen.get(timeout=30)[0] == "offline"  # the broker notices after 1.5 keepalives
    with watch(broker.port, topic) as seen:
        assert seen.get(timeout=10) == ("offline", True)
