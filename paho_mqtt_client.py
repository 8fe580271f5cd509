"""The MQTT bridge between AiCSD and the pipeline service.

    python paho_mqtt_client.py pythonClientConfig.yaml

Receives each AiCSD job from the broker, stores it durably (acknowledging it only then), and
forwards it with `GatewayIP` added to the service's API with a fixed pool of workers. A job the
service refuses, or one that cannot be processed in time, is reported to AiCSD as
`PipelineFailed`. SIGTERM or SIGINT stops it cleanly.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from bridge.config import ConfigError, load_config
from bridge.forwarder import Forwarder
from bridge.receiver import Receiver
from bridge.spool import Spool
from helper import AicsdClient
from aicsd.logs import configure_logging

log = logging.getLogger("bridge")

SHUTDOWN_GRACE = 20.0
FINISHED_JOB_MEMORY = 7 * 86400.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="the bridge configuration (pythonClientConfig.yaml)")
    args = parser.parse_args(argv)
    configure_logging("bridge", "aicsd", "helper")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    spool = Spool(config.spool)
    resumed = spool.requeue_inflight()
    pruned = spool.prune(FINISHED_JOB_MEMORY)
    log.info(
        "spool %s: %s (%d resumed from a previous run, %d old finished jobs forgotten)",
        config.spool, spool.counts().line(), resumed, pruned,
    )
    aicsd = AicsdClient()
    forwarder = Forwarder(config, spool, aicsd)
    receiver = Receiver(config, spool, on_job=forwarder.notify)

    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    log.info("forwarding to %s with %d workers, gateway %s", config.service_url, config.concurrency, config.gateway_ip)
    forwarder.start()
    receiver.start()

    def status() -> None:
        counts = spool.counts()
        log.info(
            "status: %s received=%d duplicates=%d broker=%s",
            counts.line(), receiver.received, receiver.duplicates, "connected" if receiver.connected else "down",
        )

    while not stop.wait(config.status_interval):
        status()
    receiver.stop()
    forwarder.stop(SHUTDOWN_GRACE)
    aicsd.close()
    status()
    spool.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
