"""Real servers on free loopback ports: an MQTT broker, `bentoml serve`, bridge processes."""

from __future__ import annotations

import getpass
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
_log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Stop a process started in its own session, and every process it started.

    `bentoml serve` runs its worker in a process group of its own, so signalling the group alone
    leaves the worker alive (and serving the port) after a SIGKILL. The whole tree is collected
    before the signal, since a killed parent's children are re-parented and can no longer be
    found from it; each one is signalled, and anything still alive after `timeout` is killed.
    """
    family = _descendants(process.pid)
    if process.poll() is None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
    for child in family:
        _signal(child, sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        _signal(process, signal.SIGKILL)
        process.wait(10)
    _, alive = psutil.wait_procs(family, timeout=timeout)
    for child in alive:
        _signal(child, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=10)
    return process.returncode


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _signal(target: psutil.Process | subprocess.Popen, sig: int) -> None:
    try:
        if isinstance(target, subprocess.Popen):
            if target.poll() is None:
                os.killpg(target.pid, sig)
        else:
            target.send_signal(sig)
    except (ProcessLookupError, psutil.NoSuchProcess):
        pass


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if _usable("/usr/sbin/mosquitto") else None)
    if found is None:
        raise RuntimeError("mosquitto is not installed: `apt-get install mosquitto` (.ci/run does it)")
    return found


def _usable(path: str) -> bool:
    """An executable file with content (`devtools/fresh_machine.sh` hides programs behind empty files)."""
    candidate = Path(path)
    return candidate.is_file() and os.access(candidate, os.X_OK) and candidate.stat().st_size > 0


def have_program(name: str) -> bool:
    """Whether `name` can run here: on PATH (or in /usr/sbin) as a real, non-empty executable."""
    found = shutil.which(name) or (f"/usr/sbin/{name}" if _usable(f"/usr/sbin/{name}") else None)
    return found is not None and _usable(found)


def broker_kind(preferred: str = "auto") -> str:
    """`mosquitto` when installed (or asked for), else the embedded Python broker `amqtt`."""
    if preferred != "auto":
        return preferred
    return "mosquitto" if have_program("mosquitto") else "amqtt"


@dataclass(frozen=True)
class BrokerTls:
    """A TLS listener's server certificate chain and key (PEM files)."""

    certfile: Path
    keyfile: Path


@dataclass
class Broker:
    """An MQTT broker on a loopback port: Mosquitto with persistence (restartable on the same
    port, optionally TLS or with a password file), or amqtt from PyPI where Mosquitto is not
    installed (no persistence across restarts, no TLS, no passwords)."""

    folder: Path
    port: int = field(default_factory=free_port)
    kind: str = field(default_factory=broker_kind)
    process: subprocess.Popen | None = None
    tls: BrokerTls | None = None
    passwords: dict[str, str] | None = None

    @property
    def keeps_sessions(self) -> bool:
        """Whether a persistent session gets QoS 1 messages sent while its client was away, unacknowledged
        ones again on reconnect, and both across a broker restart: Mosquitto does, amqtt 0.12 does not."""
        return self.kind == "mosquitto"

    @property
    def shares_subscriptions(self) -> bool:
        """Whether `$share/<group>/<topic>` splits messages between subscribers: Mosquitto does, amqtt 0.12 not."""
        return self.kind == "mosquitto"

    def start(self) -> Broker:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.kind != "mosquitto" and (self.tls or self.passwords):
            raise RuntimeError("TLS listeners and password files need Mosquitto")
        command = self._mosquitto() if self.kind == "mosquitto" else self._amqtt()
        log = (self.folder / f"{self.kind}.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        log.close()
        wait_for_port(self.port)
        return self

    def _mosquitto(self) -> list[str]:
        config = self.folder / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "persistence true",
            f"persistence_location {self.folder}/",
            "max_queued_messages 100000",
            "log_dest stderr",
            # Started as root, mosquitto would switch to user 'mosquitto', who cannot write here.
            f"user {getpass.getuser()}",
        ]
        if self.tls is not None:
            lines += [f"certfile {self.tls.certfile}", f"keyfile {self.tls.keyfile}"]
        if self.passwords:
            password_file = self.folder / "passwords"
            password_file.write_text("")
            for user, password in self.passwords.items():
                subprocess.run(["mosquitto_passwd", "-b", str(password_file), user, password], check=True,
                               capture_output=True, timeout=30)
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines.append("allow_anonymous true")
        config.write_text("\n".join(lines) + "\n")
        return [mosquitto_binary(), "-c", str(config)]

    def _amqtt(self) -> list[str]:
        config = self.folder / "amqtt.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
                    "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
                }
            )
        )
        return [str(Path(sys.executable).parent / "amqtt"), "-c", str(config)]

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


def publish(port: int, payloads: list[bytes | str], topic: str = "mqtt-export/pipeline/params",
            interval: float = 0.0) -> None:
    """Publish each payload at QoS 1, as EdgeX's export does once set to QoS 1, and wait for the broker."""
    import uuid

    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"publisher-{uuid.uuid4().hex[:8]}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for payload in payloads:
            data = payload if isinstance(payload, bytes) else payload.encode()
            client.publish(topic, data, qos=1).wait_for_publish(10)
            if interval:
                time.sleep(interval)
    finally:
        client.disconnect()
        client.loop_stop()


@dataclass
class Bridge:
    """`python paho_mqtt_client.py <config>` as a real process.

    `prefix` runs it under another command (e.g. `unshare --mount ...`); `env` adds variables.
    `metrics_port` serves its Prometheus metrics on 127.0.0.1 (0, the default here: none).
    """

    folder: Path
    service_url: str
    broker_port: int
    client_id: str
    extra: dict = field(default_factory=dict)
    process: subprocess.Popen | None = None
    prefix: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    spool_path: Path | None = None
    broker_host: str = "127.0.0.1"
    metrics_port: int = 0

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def spool(self) -> Path:
        return self.spool_path or self.folder / "spool.sqlite3"

    @property
    def log_path(self) -> Path:
        return self.folder / "bridge.log"

    def write_config(self) -> Path:
        config = {
            "service": {"POST_url": "http://##.##.##.##", "port": "3000", "service_func": "classify"},
            "gateway_ip": "127.0.0.1",
            "mqtt": {
                "topic": "mqtt-export/pipeline/params",
                "hostname": self.broker_host,
                "port": self.broker_port,
                "qos": 1,
                "client_id": self.client_id,
                **self.extra.get("mqtt", {}),
            },
            "bridge": {
                "concurrency": 2,
                "spool": str(self.spool),
                "retry_initial": 0.2,
                "retry_max": 2,
                "status_interval": 1,
                "callback_hosts": "127.0.0.1",
                "metrics_address": "127.0.0.1",
                "metrics_port": self.metrics_port,
                **self.extra.get("bridge", {}),
            },
        }
        path = self.folder / "pythonClientConfig.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def start(self, wait_for: str | None = "subscribed to") -> Bridge:
        """Start the process; wait until its log shows `wait_for` (one more time than before)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.write_config()
        env = {**os.environ, "BRIDGE_SERVICE_URL": self.service_url, **self.env}
        before = self.log_text().count(wait_for) if wait_for else 0
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*self.prefix, sys.executable, str(REPO / "paho_mqtt_client.py"), str(config)],
            cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True,
        )
        log.close()
        if wait_for:
            self.wait_for_log(wait_for, timeout=20, count=before + 1)
        return self

    def wait_for_log(self, text: str, timeout: float = 20, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_text().count(text) >= count:
                return
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"bridge exited with {self.process.returncode}:\n{self.log_text()}")
            time.sleep(0.05)
        raise TimeoutError(f"{text!r} not in the bridge log after {timeout}s:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.process is not None:
            stop_process(self.process, signal.SIGKILL)
            self.process = None

    def stop(self) -> int:
        code = stop_process(self.process) if self.process is not None else 0
        self.process = None
        return code


@dataclass
class Service:
    url: str
    log_path: Path
    process: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


START_ATTEMPTS = 3
"""Starts of `bentoml serve` tried when a port it was to bind was taken meanwhile."""


def serve_bento(
    target: str,
    *,
    env: dict[str, str],
    cwd: Path,
    log_path: Path,
    timeout: float = 120,
    port: int | None = None,
    wait_for: str = "/readyz",
) -> Service:
    """Start `bentoml serve TARGET` on a loopback port and wait until `wait_for` answers 200.

    Each service gets a BentoML home of its own next to its log (unless `env` names one): BentoML
    keeps its Prometheus files in `$BENTOML_HOME/prometheus_multiproc_dir` and every `bentoml
    serve` empties that folder at start, so a second service in a shared home would stop the
    first one's `/metrics` from counting.

    A port is free when it is picked and bound a moment later, by BentoML (the HTTP port) or by
    circus inside it (ports of its own it picks the same way), so another process may take it in
    between. A start that ends on "Address already in use" is tried again, up to
    `START_ATTEMPTS` times (on the same port when the caller chose it); any other failure is raised
    at once.
    """
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            return _serve_bento_once(target, env, cwd, log_path, timeout, port or free_port(), wait_for)
        except _PortTaken as taken:
            if attempt == START_ATTEMPTS:
                raise RuntimeError(f"bentoml serve found a port taken {attempt} times:\n{taken}") from None
            _log.warning("bentoml serve found a port taken (start %d of %d); starting it again", attempt,
                         START_ATTEMPTS)
            time.sleep(0.5)
    raise AssertionError("unreachable")


class _PortTaken(Exception):
    """`bentoml serve` ended at start-up because a port it was to bind was taken."""


def _serve_bento_once(target: str, env: dict[str, str], cwd: Path, log_path: Path, timeout: float, port: int,
                      wait_for: str) -> Service:
    home = log_path.with_name(f"{log_path.stem}-bentoml-home")
    full_env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", "BENTOML_HOME": str(home), **env}
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "bentoml"), "serve", target, "--host", "127.0.0.1", "--port", str(port)],
        cwd=cwd,
        env=full_env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log_file.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                text = log_path.read_text(errors="replace")
                if "Address already in use" in text:
                    raise _PortTaken(text)
                raise RuntimeError(f"bentoml serve exited with {process.returncode}:\n{text}")
            try:
                if client.get(f"{url}{wait_for}", timeout=2).status_code == 200:
                    return Service(url, log_path, process)
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
    stop_process(process)
    raise RuntimeError(f"bentoml serve not ready after {timeout}s:\n{log_path.read_text()}")
