"""Receipt: the MQTT session, and turning each message into a spooled job or a dead letter.

The session is persistent (fixed client id, clean_session off), subscribes at QoS 1 inside
`on_connect` so a reconnect renews the subscription, and acknowledges a message only after it is
committed to the spool and synced to disk (manual acknowledgement). `on_message` stays thin and
never raises (an exception there would stop paho's network loop): it reads the message
(`inspect_payload`) and hands it to the spool writer, a thread of its own. The writer stores every
message waiting in one transaction, one sync to disk for all of them, and then acknowledges them:
under a burst one sync covers many jobs, and a job that comes alone is stored at once, in a
transaction of its own, never held back to wait for company.

A message the spool cannot take (a full disk) is not acknowledged: it is kept in memory and
stored again every second, and acknowledged once stored, so jobs flow again by themselves when
space returns. Should more wait than `MAX_UNSTORED`, the rest are left to the broker and the
connection is renewed once the spool works, which makes the broker send them again.

The bridge announces itself on `mqtt.status_topic`: a retained `online` on connect, `offline` on
a clean stop, and `offline` as its last will for the broker to publish when it vanishes. Every
failed connection attempt is logged with its cause (DNS, refused, TLS, authentication).
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

from aicsd.callback_rules import host_allowed
from aicsd.job import JobRequest
from aicsd.logs import shown, validation_problems

from .config import BridgeConfig
from .forwarder import usable_callbacks
from .spool import Arrival, DeadLetter, NewJob, Spool, SpoolError

__all__ = ["Receipt", "Receiver", "connection_failure", "inspect_payload"]

MAX_UNSTORED = 1000
RETRY_CHUNK = 64  # messages per transaction when stored again: a nearly full disk still takes some
ONLINE = b"online"
OFFLINE = b"offline"

log = logging.getLogger("bridge.receiver")

# The service's request body: compact, and ASCII so that any JSON a job holds can be stored, even a
# lone surrogate (an escaped "\ud800" decodes to a str that UTF-8 cannot encode).
_BODY = json.JSONEncoder(separators=(",", ":"))


@dataclass(frozen=True)
class Receipt:
    """What to do with one message: spool it (maybe marked for rejection) or dead-letter it."""

    key: tuple[str, str] | None
    text: str | None
    reject_reason: str | None = None
    dead_reason: str | None = None


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
    try:
        request = JobRequest.model_validate(data)
    except ValidationError as exc:
        reason = f"invalid job: {validation_problems(exc, 'payload')}"
        callbacks = usable_callbacks(data, allowed_hosts)  # the URLs alone may still be usable
        if callbacks is None:
            return Receipt(None, text, dead_reason=reason)
        return Receipt((callbacks.job_id, callbacks.task_id), text, reject_reason=reason)
    # Job.from_request's host rule, without the typed job it builds: the bridge only needs the key.
    update, status = request.callback_urls()
    if not (host_allowed(update, allowed_hosts) and host_allowed(status, allowed_hosts)):
        return Receipt(None, text, dead_reason="callback host not in bridge.callback_hosts: AiCSD cannot be told")
    return Receipt((update.job_id, update.task_id), _BODY.encode({**data, "GatewayIP": gateway_ip}))


@dataclass(frozen=True)
class _Message:
    """A message received and read, not stored yet, hence not acknowledged."""

    mid: int
    qos: int
    topic: str
    payload: bytes
    session: int  # the connection it came on: acknowledged on that one only
    receipt: Receipt

    def arrival(self) -> NewJob | DeadLetter:
        receipt = self.receipt
        if receipt.dead_reason is not None:
            return DeadLetter(receipt.dead_reason, self.payload, self.topic, receipt.key)
        assert receipt.key is not None and receipt.text is not None
        return NewJob(*receipt.key, receipt.text, receipt.reject_reason)


def connection_failure(exc: BaseException | None, host: str, port: int) -> str:
    """One line naming why a connection to the broker failed: DNS, refused, TLS, timeout, other."""
    where = f"{host}:{port}"
    if exc is None:
        return f"cannot connect to {where} (cause unknown)"
    if isinstance(exc, socket.gaierror):
        return f"DNS: the broker name {host!r} does not resolve ({exc.strerror or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return f"refused: nothing accepts connections on {where}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: the broker's certificate is not accepted for {host!r}: {exc.verify_message or exc}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: handshake with {where} failed: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):
        return f"timeout: no answer from {where}"
    return f"cannot connect to {where}: {type(exc).__name__}: {exc}"


def refusal(reason: Any) -> str:
    """One line for a CONNACK that refused the connection, naming authentication failures."""
    text = str(reason)
    if "password" in text.lower() or "authori" in text.lower():
        return f"auth: the broker refused the credentials ({text}); check mqtt.username and mqtt.password"
    return f"the broker refused the connection: {text}"


class Receiver:
    """Owns the paho client and the spool writer: stores each message in the spool, then acknowledges it."""

    def __init__(self, config: BridgeConfig, spool: Spool, on_jobs: Callable[[int], None]) -> None:
        self.config = config
        self.spool = spool
        self.on_jobs = on_jobs  # told how many jobs were just queued in the spool
        # Counts since start, for the status line and the metrics (bridge.metrics). Each has one
        # writer: `received` paho's thread, the others the spool writer.
        self.received = 0       # messages from the broker, redeliveries included
        self.spooled = 0        # jobs queued in the spool: new ones and ones taken again
        self.duplicates = 0     # redeliveries of a job still queued or in flight, collapsed
        self.again = 0          # jobs published again after the bridge had finished them
        self.dead_lettered = 0  # payloads kept in the dead-letter table instead of the queue
        self.connected = False
        self.problem: str | None = None  # why the broker is down, for the status line
        self._session = 0
        self._waiting: queue.SimpleQueue[_Message | None] = queue.SimpleQueue()  # None: stop
        self._unstored: list[_Message] = []  # the spool writer's alone
        self._overflowed = False
        self._stopping = threading.Event()
        self._writer: threading.Thread | None = None
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
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
        client.will_set(config.status_topic, OFFLINE, qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self.client = client

    def start(self) -> None:
        """Connect in the background; paho keeps reconnecting with backoff until `stop`."""
        log.info(
            "connecting to %s:%d as %s, subscribing to %s at QoS %d, announcing on %s",
            self.config.mqtt_hostname, self.config.mqtt_port, self.config.client_id,
            self.config.subscription, self.config.qos, self.config.status_topic,
        )
        self._writer = threading.Thread(target=self._write, name="spool-writer", daemon=True)
        self._writer.start()
        self.client.connect_async(self.config.mqtt_hostname, self.config.mqtt_port, self.config.keepalive)
        self.client.loop_start()

    def stop(self) -> None:
        """Store and acknowledge what was received, say `offline` (retained) while still
        connected, then disconnect cleanly. Messages that come meanwhile are left to the broker."""
        self._stopping.set()
        self._waiting.put(None)
        if self._writer is not None:
            self._writer.join(10)
        if self.connected:
            try:
                self.client.publish(self.config.status_topic, OFFLINE, qos=1, retain=True).wait_for_publish(5)
            except (RuntimeError, ValueError, OSError) as exc:
                log.warning("could not announce offline: %s", exc)
        self.client.disconnect()
        self.client.loop_stop()

    @property
    def unstored(self) -> int:
        return len(self._unstored)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self.problem = refusal(reason)
            log.error("%s", self.problem)
            return
        sock = client.socket()
        if isinstance(sock, socket.socket):
            # paho leaves Nagle on: acknowledgements would wait ~40 ms for more data.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._session += 1
        self.connected = True
        self.problem = None
        log.info("connected to the broker (session present: %s)", flags.session_present)
        client.subscribe(self.config.subscription, qos=self.config.qos)
        client.publish(self.config.status_topic, ONLINE, qos=1, retain=True)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this from inside its `except OSError` around the connection attempt.
        self.problem = connection_failure(sys.exc_info()[1], self.config.mqtt_hostname, self.config.mqtt_port)
        log.error("broker connection failed: %s; retrying", self.problem)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        for reason in reasons:
            if reason.is_failure:
                log.error("subscription to %s refused: %s", self.config.subscription, reason)
            else:
                log.info("subscribed to %s (granted QoS %s)", self.config.subscription, reason.value)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        was_connected, self.connected = self.connected, False
        if not was_connected:
            return  # a refused attempt: its cause is logged and kept already
        if reason.is_failure:
            self.problem = f"connection lost: {reason}"
            log.warning("disconnected from the broker (%s); reconnecting", reason)
        else:
            log.info("disconnected from the broker")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.received += 1
        if self._stopping.is_set():
            return  # not acknowledged: the broker keeps it for the next start
        try:
            payload = bytes(message.payload)
            receipt = inspect_payload(payload, self.config.callback_hosts, self.config.gateway_ip)
            self._waiting.put(_Message(message.mid, message.qos, message.topic, payload, self._session, receipt))
        except Exception:
            # Not acknowledged: the broker delivers it again after a reconnect.
            log.exception("could not handle message %s on %s; not acknowledged", message.mid, shown(message.topic))

    def _write(self) -> None:
        """The spool writer: stores every message waiting in one transaction, then acknowledges them;
        stores the messages the spool could not take again every second. Ends at `stop`."""
        retry_at = 0.0
        stop = False
        while not stop:
            try:
                first = self._waiting.get(timeout=1.0 if self._unstored else None)
            except queue.Empty:
                first = None
            else:
                stop = first is None
            batch = [] if first is None else [first]
            while not stop:
                try:
                    item = self._waiting.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    batch.append(item)
            try:
                if self._unstored and time.monotonic() >= retry_at:
                    retry_at = time.monotonic() + 1.0
                    self._store_unstored()
                if batch:
                    self._store(batch)
            except Exception:
                # Not acknowledged: the broker delivers them again after a reconnect.
                log.exception("could not store %d message(s); not acknowledged", len(batch))

    def _store(self, batch: list[_Message]) -> None:
        try:
            arrivals = self.spool.store([message.arrival() for message in batch])
        except SpoolError as exc:
            self._keep_unstored(batch, exc)
            return
        except Exception:
            if len(batch) == 1:
                # Not acknowledged: the broker delivers it again after a reconnect.
                log.exception("could not store message %s on %s; not acknowledged", batch[0].mid,
                              shown(batch[0].topic))
                return
            for message in batch:  # one at a time: only the message at fault is left out
                self._store([message])
            return
        self._acknowledge(batch)
        self._stored(batch, arrivals)

    def _acknowledge(self, messages: Sequence[_Message], late: bool = False) -> None:
        """Acknowledge stored messages that came on the current connection. One that came on an
        earlier connection is sent again by the broker, and collapsed then."""
        for message in messages:
            current = message.session == self._session and self.connected
            if current:
                self.client.ack(message.mid, message.qos)
            if late:
                log.info("message %s stored at last%s", message.mid, "" if current else
                         " (its connection is gone: the broker sends it again, and it is collapsed then)")

    def _keep_unstored(self, messages: Sequence[_Message], exc: SpoolError) -> None:
        for message in messages:
            if len(self._unstored) < MAX_UNSTORED:
                self._unstored.append(message)
                kept = True
            else:
                self._overflowed = True
                kept = False
            log.error(
                "cannot store message %s on %s, not acknowledged; %s: %s", message.mid, shown(message.topic),
                "storing it again every second" if kept else "left to the broker until the spool works", exc,
            )

    def _store_unstored(self) -> None:
        """Store kept messages once the spool takes them again, acknowledging each one stored."""
        while self._unstored:
            chunk = self._unstored[:RETRY_CHUNK]
            try:
                arrivals = self.spool.store([message.arrival() for message in chunk])
            except SpoolError:
                return
            del self._unstored[:len(chunk)]
            self._acknowledge(chunk, late=True)
            self._stored(chunk, arrivals)
        if self._overflowed:
            self._renew_connection()

    def _renew_connection(self) -> None:
        """Drop the connection so that paho reconnects and the broker sends unacknowledged messages again."""
        if self.spool.failing is not None:
            return
        self._overflowed = False
        log.warning("the spool works again: reconnecting so that the broker sends the messages left with it")
        sock = self.client.socket()
        if isinstance(sock, socket.socket):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _stored(self, messages: Sequence[_Message], arrivals: Sequence[Arrival | None]) -> None:
        """Count and log what the spool did with each message; wake the forwarder for new jobs.
        New jobs stored together are logged in one line that names each of them."""
        new: list[tuple[str, str]] = []
        queued = 0
        for message, arrival in zip(messages, arrivals, strict=True):
            receipt = message.receipt
            if arrival is None:
                self.dead_lettered += 1
                log.error("dead-lettered message on %s: %s (payload %s)", shown(message.topic), receipt.dead_reason,
                          shown(message.payload, 120))
                continue
            assert receipt.key is not None
            ids = f"job={shown(receipt.key[0])} task={shown(receipt.key[1])}"
            invalid = " (invalid, will be failed)" if receipt.reject_reason else ""
            if arrival is Arrival.DUPLICATE:
                self.duplicates += 1
                log.info("%s received again while still queued or in flight: collapsed", ids)
                continue
            self.spooled += 1
            queued += 1
            if arrival is Arrival.AGAIN:
                self.again += 1
                log.info("%s published again after the bridge had finished it: taken again%s", ids, invalid)
            else:
                new.append((ids, invalid))
        if len(new) == 1:
            log.info("%s received%s", *new[0])
        elif new:
            log.info("received %d jobs: %s", len(new), ", ".join(ids + invalid for ids, invalid in new))
        if queued:
            self.on_jobs(queued)
