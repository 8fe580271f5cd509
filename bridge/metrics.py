"""The bridge's Prometheus metrics, served on a port of its own (`bridge.metrics_port`).

Nothing is counted twice: every value is read when Prometheus scrapes, from the counts the
receiver and the forwarder keep for the status line and from the spool, so a gauge is never
stale and the metrics never disagree with the log. The registry is the bridge's own, not
prometheus_client's global one, so an imported library cannot add to it. The endpoint is
prometheus_client's own HTTP server on a daemon thread; it answers every path, `/metrics` included.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .config import BridgeConfig
from .forwarder import Forwarder
from .receiver import Receiver
from .spool import Spool, SpoolError

__all__ = ["BridgeCollector", "MetricsServer", "bridge_registry", "serve_metrics"]

PREFIX = "aicsd_bridge_"

log = logging.getLogger("bridge.metrics")


class BridgeCollector:
    """Reads the bridge's counts and state at each scrape (a prometheus_client custom collector)."""

    def __init__(
        self, spool: Spool, receiver: Receiver, forwarder: Forwarder, workers: int,
        *, clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool = spool
        self.receiver = receiver
        self.forwarder = forwarder
        self.workers = workers
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        receiver, forwarder = self.receiver, self.forwarder
        counters = (
            ("received", "MQTT messages received from the broker, redeliveries included", receiver.received),
            ("spooled", "jobs queued in the spool: new ones and ones taken again", receiver.spooled),
            ("duplicates", "redeliveries of a job still queued or in flight, collapsed into it", receiver.duplicates),
            ("taken_again", "jobs published again after the bridge had finished them, queued afresh", receiver.again),
            ("forwarded", "jobs the service answered 200 for", forwarder.forwarded),
            ("service_requests", "HTTP requests sent to the service, each one job or a batch of up to bridge.batch",
             forwarder.requests),
            ("dead_lettered", "payloads and jobs kept in the dead-letter table: not jobs, or given up on",
             receiver.dead_lettered + forwarder.dead_lettered),
            ("callback_failures", "PipelineFailed reports the bridge had to send and could not deliver",
             forwarder.callback_failures),
        )
        for name, text, value in counters:
            yield CounterMetricFamily(PREFIX + name, text, value=value)
        yield GaugeMetricFamily(PREFIX + "broker_connected", "1 while connected to the broker, else 0",
                                value=int(receiver.connected))
        yield GaugeMetricFamily(PREFIX + "workers_alive", "forwarding worker threads running", value=forwarder.alive)
        yield GaugeMetricFamily(PREFIX + "workers", "forwarding worker threads configured (bridge.concurrency)",
                                value=self.workers)
        yield GaugeMetricFamily(PREFIX + "unacknowledged_messages",
                                "messages held, unacknowledged, for a spool that cannot store them",
                                value=receiver.unstored)
        yield GaugeMetricFamily(PREFIX + "unrecorded_results", "results held for a spool that cannot record them",
                                value=forwarder.unrecorded)
        try:
            backlog = self.forwarder.backlog()
        except SpoolError as exc:
            # Left out rather than made up: an absent series is what an alert can see.
            log.warning("metrics: spool figures left out of this scrape: %s", exc)
            readable = False
        else:
            readable = True
            age = 0.0 if backlog.oldest_received_at is None else max(0.0, self._clock() - backlog.oldest_received_at)
            yield GaugeMetricFamily(PREFIX + "queue_depth", "jobs in the spool waiting for a worker or a retry",
                                    value=backlog.queued)
            yield GaugeMetricFamily(PREFIX + "in_flight", "jobs a worker is forwarding now", value=backlog.inflight)
            yield GaugeMetricFamily(PREFIX + "oldest_job_age_seconds",
                                    "seconds since the oldest job queued or in flight arrived; 0 when none",
                                    value=age)
        yield GaugeMetricFamily(PREFIX + "spool_ok", "1 while the spool can be read and its last write worked, else 0",
                                value=int(readable and self.spool.failing is None))


def bridge_registry(spool: Spool, receiver: Receiver, forwarder: Forwarder, workers: int) -> CollectorRegistry:
    """A registry of the bridge's own: its figures, and the process's CPU, memory and open files."""
    registry = CollectorRegistry()
    registry.register(BridgeCollector(spool, receiver, forwarder, workers))
    ProcessCollector(registry=registry)
    return registry


class MetricsServer:
    """prometheus_client's HTTP server for one registry, on its own thread until `stop`."""

    def __init__(self, registry: CollectorRegistry, address: str, port: int) -> None:
        self._server: WSGIServer
        self._server, self._thread = start_http_server(port, address, registry=registry)
        self.address = address
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve_metrics(config: BridgeConfig, registry: CollectorRegistry) -> MetricsServer | None:
    """Serve `registry` on `bridge.metrics_address`:`bridge.metrics_port`; None when the port is 0.
    Raises OSError when the address cannot be listened on (taken, unknown, not this machine's)."""
    if config.metrics_port == 0:
        log.info("metrics off (bridge.metrics_port is 0)")
        return None
    server = MetricsServer(registry, config.metrics_address, config.metrics_port)
    log.info("metrics on %s", server.url)
    return server
