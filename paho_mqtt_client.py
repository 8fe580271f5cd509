"""The MQTT bridge between AiCSD and the pipeline service.

    python paho_mqtt_client.py pythonClientConfig.yaml

Receives each AiCSD job from the broker, stores it durably (acknowledging it only then), and
forwards it with `GatewayIP` added to the service's API with a fixed pool of workers. A job the
service refuses, or one it never received in time, is reported to AiCSD as `PipelineFailed`.
Its Prometheus metrics are served on `bridge.metrics_port` (bridge/metrics.py). SIGTERM or SIGINT
stops it cleanly. A start-up problem (bad configuration, a spool that cannot be written, a metrics
port that cannot be listened on) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from aicsd.callbacks import AicsdClient
from aicsd.logs import configure_logging
from bridge.config import BridgeConfig, ConfigError, load_config
from bridge.forwarder import Forwarder
from bridge.metrics import bridge_registry, serve_metrics
from bridge.receiver import Receiver
from bridge.spool import Spool, SpoolError

log = logging.getLogger("bridge")

SHUTDOWN_GRACE = 20.0
FINISHED_JOB_MEMORY = 7 * 86400.0
EXIT_START_UP = 2


def open_spool(config: BridgeConfig) -> Spool:
    """The spool, with jobs a stopped bridge left in flight queued again; raises `SpoolError`."""
    spool = Spool(config.spool)
    try:
        resumed = spool.requeue_inflight()
        pruned = spool.prune(FINISHED_JOB_MEMORY)
        counts = spool.counts()
    except SpoolError:
        spool.close()
        raise
    log.info("spool %s: %s (%d resumed from a previous run, %d old finished jobs forgotten)",
             config.spool, counts.line(), resumed, pruned)
    return spool


def status_line(spool: Spool, receiver: Receiver, forwarder: Forwarder, workers: int) -> str:
    """The whole truth in one line: jobs, the broker, the spool, the workers."""
    try:
        counts = forwarder.counts().line()
    except SpoolError as exc:
        counts = f"counts unavailable ({exc})"
    broker = "connected" if receiver.connected else f"down ({receiver.problem or 'connecting'})"
    store = "ok" if spool.failing is None else f"failing ({spool.failing})"
    return (
        f"status: {counts} received={receiver.received} duplicates={receiver.duplicates} again={receiver.again}"
        f" broker={broker} spool={store} unacknowledged={receiver.unstored} unrecorded={forwarder.unrecorded}"
        f" workers={forwarder.alive}/{workers}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="the bridge configuration (pythonClientConfig.yaml)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_START_UP
    configure_logging("bridge", "aicsd", "helper", level=config.log_level)
    # The log format names no caller, thread or process: logging need not find them for every
    # line (the logging HOWTO's "Optimization"); a job's line then costs a third less.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    try:
        spool = open_spool(config)
    except SpoolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_START_UP

    aicsd = AicsdClient()
    forwarder = Forwarder(config, spool, aicsd)
    try:
        receiver = Receiver(config, spool, on_jobs=forwarder.notify)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError: unusable TLS files
        print(f"error: mqtt.tls: the certificate or key files cannot be used: {exc}", file=sys.stderr)
        spool.close()
        return EXIT_START_UP
    try:
        metrics = serve_metrics(config, bridge_registry(spool, receiver, forwarder, config.concurrency))
    except OSError as exc:
        print(f"error: bridge.metrics_port: cannot listen on {config.metrics_address}:{config.metrics_port}: {exc}",
              file=sys.stderr)
        spool.close()
        return EXIT_START_UP

    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    log.info("forwarding to %s with %d workers, gateway %s", config.service_url, config.concurrency, config.gateway_ip)
    forwarder.start()
    receiver.start()

    while not stop.wait(config.status_interval):
        forwarder.supervise()
        log.info("%s", status_line(spool, receiver, forwarder, config.concurrency))
    receiver.stop()
    forwarder.stop(SHUTDOWN_GRACE)
    aicsd.close()
    log.info("%s", status_line(spool, receiver, forwarder, config.concurrency))
    if metrics is not None:
        metrics.stop()
    spool.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
