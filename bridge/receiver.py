"""Receipt: the MQTT session, and turning each message into a spooled job or a dead letter.

The session is persistent (fixed client id, clean_session off), subscribes at QoS 1 inside
`on_connect` so a reconnect renews the subscription, and acknowledges a message only after it is
committed to the spool (manual acknowledgement). `on_message` stays thin and never raises: an
exception there would stop paho's network loop.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from aicsd.job import JobRequest

from .config import BridgeConfig
from .forwarder import usable_callbacks
from .spool import Spool

__all__ = ["Receipt", "Receiver", "inspect_payload"]

log = logging.getLogger("bridge.receiver")


@dataclass(frozen=True)
class Receipt:
    """What to do with one message: spool it (maybe marked for rejection) or dead-letter it."""

    key: tuple[str, str] | None
    text: str | None
    reject_reason: str | None = None
    dead_reason: str | None = None


def _validation_summary(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "payload"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def inspect_payload(raw: bytes, allowed_hosts: frozenset[str], gateway_ip: str = "") -> Receipt:
    """Decide a message's fate without touching the network. The JSON is parsed here, once: a
    job to forward is spooled as the exact body the service gets, `GatewayIP` included."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Receipt(None, None, dead_reason=f"payload is not UTF-8 text: {exc}")
    try:
        data = json.loads(text)
    except ValueError as exc:
        return Receipt(None, text, dead_reason=f"payload is not JSON: {exc}")
    if not isinstance(data, dict):
        return Receipt(None, text, dead_reason=f"payload is a JSON {type(data).__name__}, not an object")
    callbacks = usable_callbacks(data, allowed_hosts)
    try:
        JobRequest.model_validate(data)
    except ValidationError as exc:
        reason = f"invalid job: {_validation_summary(exc)}"
        if callbacks is None:
            return Receipt(None, text, dead_reason=reason)
        return Receipt((callbacks.job_id, callbacks.task_id), text, reject_reason=reason)
    if callbacks is None:
        return Receipt(None, text, dead_reason="callback host not in bridge.callback_hosts: AiCSD cannot be told")
    body = json.dumps({**data, "GatewayIP": gateway_ip}, separators=(",", ":"), ensure_ascii=False)
    return Receipt((callbacks.job_id, callbacks.task_id), body)


class Receiver:
    """Owns the paho client; stores each message in the spool, then acknowledges it."""

    def __init__(self, config: BridgeConfig, spool: Spool, on_job: Callable[[], None]) -> None:
        self.config = config
        self.spool = spool
        self.on_job = on_job
        self.received = 0
        self.duplicates = 0
        self.connected = False
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=config.client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
            manual_ack=True,
        )
        if config.username:
            client.username_pw_set(config.username, config.password)
        if config.tls is not None:
            client.tls_set(
                ca_certs=str(config.tls.ca_certs) if config.tls.ca_certs else None,
                certfile=str(config.tls.certfile) if config.tls.certfile else None,
                keyfile=str(config.tls.keyfile) if config.tls.keyfile else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self.client = client

    def start(self) -> None:
        """Connect in the background; paho keeps reconnecting with backoff until `stop`."""
        log.info(
            "connecting to %s:%d as %s, subscribing to %s at QoS %d",
            self.config.mqtt_hostname, self.config.mqtt_port, self.config.client_id,
            self.config.subscription, self.config.qos,
        )
        self.client.connect_async(self.config.mqtt_hostname, self.config.mqtt_port, self.config.keepalive)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s", reason)
            return
        sock = client.socket()
        if isinstance(sock, socket.socket):
            # paho leaves Nagle on: acknowledgements would wait ~40 ms for more data.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connected = True
        log.info("connected to the broker (session present: %s)", flags.session_present)
        client.subscribe(self.config.subscription, qos=self.config.qos)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        for reason in reasons:
            if reason.is_failure:
                log.error("subscription to %s refused: %s", self.config.subscription, reason)
            else:
                log.info("subscribed to %s (granted QoS %s)", self.config.subscription, reason.value)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connected = False
        if reason.is_failure:
            log.warning("disconnected from the broker (%s); reconnecting", reason)
        else:
            log.info("disconnected from the broker")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self._store(message)
        except Exception:
            # Not acknowledged: the broker delivers it again after a reconnect.
            log.exception("could not store message %s on %s; not acknowledged", message.mid, message.topic)
            return
        client.ack(message.mid, message.qos)

    def _store(self, message: mqtt.MQTTMessage) -> None:
        self.received += 1
        receipt = inspect_payload(message.payload, self.config.callback_hosts, self.config.gateway_ip)
        if receipt.dead_reason is not None:
            log.error("dead-lettered message on %s: %s", message.topic, receipt.dead_reason)
            self.spool.dead_letter(receipt.dead_reason, message.payload, topic=message.topic, key=receipt.key)
            return
        assert receipt.key is not None and receipt.text is not None
        if self.spool.add(*receipt.key, receipt.text, reject_reason=receipt.reject_reason):
            log.info("job=%s task=%s received%s", *receipt.key, " (invalid, will be failed)" if receipt.reject_reason else "")
            self.on_job()
        else:
            self.duplicates += 1
            log.info("job=%s task=%s received again: already spooled, not queued twice", *receipt.key)
