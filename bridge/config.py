"""Bridge configuration: `pythonClientConfig.yaml` plus environment overrides, checked all at once.

The reference demo's keys keep their meaning (`service.POST_url` + `service.port` +
`service.service_func` make the API URL, `gateway_ip`, `mqtt.topic`, `mqtt.hostname`,
`mqtt.port`); new keys have defaults. `BRIDGE_SERVICE_URL`, `BRIDGE_GATEWAY_IP`,
`BRIDGE_MQTT_HOSTNAME`, `BRIDGE_MQTT_PORT` and `BRIDGE_SPOOL` override the file. Every problem
is collected into one `ConfigError`, so a broken file is fixed in one go, before any job is
in flight.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from aicsd.callback_rules import parse_callback_hosts

__all__ = ["BridgeConfig", "ConfigError", "TlsConfig", "load_config"]

PLACEHOLDER = "##.##.##.##"
DEFAULT_CALLBACK_HOSTS = "job-repository,task-launcher,localhost,127.0.0.1"


class ConfigError(Exception):
    """The configuration cannot be used; the message lists every problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source} is not usable:\n  - " + "\n  - ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class TlsConfig:
    ca_certs: Path | None
    certfile: Path | None
    keyfile: Path | None


@dataclass(frozen=True)
class BridgeConfig:
    """Everything the bridge needs, validated."""

    service_url: str
    gateway_ip: str
    mqtt_hostname: str
    mqtt_port: int
    topic: str
    qos: int
    client_id: str
    username: str | None
    password: str | None
    tls: TlsConfig | None
    shared_group: str | None
    keepalive: int
    concurrency: int
    spool: Path
    request_timeout: float
    retry_initial: float
    retry_max: float
    max_age: float
    status_interval: float
    callback_hosts: frozenset[str]

    @property
    def subscription(self) -> str:
        """The topic filter: `$share/<group>/<topic>` when a shared group splits jobs between bridges."""
        return f"$share/{self.shared_group}/{self.topic}" if self.shared_group else self.topic


class _Reader:
    """Reads typed values out of nested YAML mappings, noting problems instead of raising."""

    def __init__(self, data: Mapping[str, Any], env: Mapping[str, str]) -> None:
        self.data = data
        self.env = env
        self.problems: list[str] = []

    def raw(self, dotted: str, env_name: str | None = None) -> Any:
        if env_name and self.env.get(env_name, "").strip():
            return self.env[env_name].strip()
        node: Any = self.data
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return None
            node = node[part]
        return node

    def text(self, dotted: str, default: str | None = None, env_name: str | None = None) -> str | None:
        value = self.raw(dotted, env_name)
        if value is None or (isinstance(value, str) and not value.strip()):
            if default is None:
                self.problems.append(f"{dotted}: missing")
            return default
        if isinstance(value, (dict, list)):
            self.problems.append(f"{dotted}: must be a single value, got {type(value).__name__}")
            return default
        return str(value).strip()

    def number(
        self, dotted: str, default: float, minimum: float, maximum: float, env_name: str | None = None,
        whole: bool = False,
    ) -> float:
        value = self.raw(dotted, env_name)
        if value is None or value == "":
            return default
        try:
            number = int(str(value)) if whole else float(value)
        except (TypeError, ValueError):
            kind = "a whole number" if whole else "a number"
            self.problems.append(f"{dotted}: must be {kind}, got {value!r}")
            return default
        if not minimum <= number <= maximum:
            self.problems.append(f"{dotted}: must be between {minimum:g} and {maximum:g}, got {value!r}")
            return default
        return number

    def path(self, dotted: str, must_exist: bool) -> Path | None:
        value = self.text(dotted, default="")
        if not value:
            return None
        path = Path(value).expanduser()
        if must_exist and not path.is_file():
            self.problems.append(f"{dotted}: file {value!r} does not exist")
        return path


def _service_url(reader: _Reader) -> str:
    whole = reader.env.get("BRIDGE_SERVICE_URL", "").strip()
    if whole:
        url = whole
        where = "BRIDGE_SERVICE_URL"
    else:
        base = reader.text("service.POST_url") or ""
        port = reader.text("service.port", default="")
        func = reader.text("service.service_func", default="classify") or "classify"
        if PLACEHOLDER in base:
            reader.problems.append(
                f"service.POST_url: still the placeholder {base!r}; set it to the pipeline service's address "
                "(e.g. http://localhost or the gateway IP), or set BRIDGE_SERVICE_URL"
            )
            return ""
        parts = urlsplit(base)
        netloc = parts.netloc
        if port:
            if not port.isdigit():
                reader.problems.append(f"service.port: must be a port number, got {port!r}")
                return ""
            netloc = f"{parts.hostname}:{port}" if parts.hostname else netloc
        url = f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}/{func.strip('/')}"
        where = "service.POST_url"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        reader.problems.append(f"{where}: must be an http(s) URL with a host, got {url!r}")
    return url


def load_config(path: Path, env: Mapping[str, str] | None = None) -> BridgeConfig:
    """Read and check `path`; raise `ConfigError` listing every problem."""
    env = os.environ if env is None else env
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(str(path), ["file does not exist"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [f"cannot be read: {exc}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"is not valid YAML: {exc}"]) from None
    if not isinstance(data, Mapping):
        raise ConfigError(str(path), ["must be a YAML mapping of keys"])

    r = _Reader(data, env)
    service_url = _service_url(r)
    gateway_ip = r.text("gateway_ip", env_name="BRIDGE_GATEWAY_IP") or ""
    if PLACEHOLDER in gateway_ip:
        r.problems.append("gateway_ip: still the placeholder '##.##.##.##'; set the gateway's address "
                          "(`hostname -I`) or BRIDGE_GATEWAY_IP")
    hostname = r.text("mqtt.hostname", env_name="BRIDGE_MQTT_HOSTNAME") or ""
    if PLACEHOLDER in hostname:
        r.problems.append("mqtt.hostname: still the placeholder '##.##.##.##'")
    port = int(r.number("mqtt.port", 1883, 1, 65535, env_name="BRIDGE_MQTT_PORT", whole=True))
    topic = r.text("mqtt.topic", default="mqtt-export/pipeline/params") or ""
    if any(c in topic for c in "+#") or topic.startswith("$share/"):
        r.problems.append(f"mqtt.topic: must be a plain topic (use mqtt.shared_group to share), got {topic!r}")
    qos = int(r.number("mqtt.qos", 1, 0, 2, whole=True))
    shared = r.text("mqtt.shared_group", default="") or None
    if shared and any(c in shared for c in "/+#"):
        r.problems.append(f"mqtt.shared_group: must not contain '/', '+' or '#', got {shared!r}")
    tls = None
    if r.raw("mqtt.tls") not in (None, False, "", {}):
        if not isinstance(r.raw("mqtt.tls"), Mapping) and r.raw("mqtt.tls") is not True:
            r.problems.append("mqtt.tls: must be a mapping with ca_certs, certfile, keyfile (or true)")
        else:
            tls = TlsConfig(
                r.path("mqtt.tls.ca_certs", True), r.path("mqtt.tls.certfile", True), r.path("mqtt.tls.keyfile", True)
            )
    spool_raw = r.text("bridge.spool", default="spool/bridge.sqlite3", env_name="BRIDGE_SPOOL") or ""
    hosts_raw = r.text("bridge.callback_hosts", default=DEFAULT_CALLBACK_HOSTS) or DEFAULT_CALLBACK_HOSTS
    try:
        callback_hosts = parse_callback_hosts(hosts_raw)
    except ValueError as exc:
        r.problems.append(f"bridge.callback_hosts: {exc}")
        callback_hosts = frozenset()
    config = BridgeConfig(
        service_url=service_url,
        gateway_ip=gateway_ip,
        mqtt_hostname=hostname,
        mqtt_port=port,
        topic=topic,
        qos=qos,
        client_id=r.text("mqtt.client_id", default="aicsd-pipeline-bridge") or "aicsd-pipeline-bridge",
        username=r.text("mqtt.username", default="") or None,
        password=r.text("mqtt.password", default="") or None,
        tls=tls,
        shared_group=shared,
        keepalive=int(r.number("mqtt.keepalive", 60, 5, 3600, whole=True)),
        concurrency=int(r.number("bridge.concurrency", 2, 1, 64, whole=True)),
        spool=Path(spool_raw).expanduser(),
        request_timeout=r.number("bridge.request_timeout", 600, 1, 86400),
        retry_initial=r.number("bridge.retry_initial", 1, 0.01, 3600),
        retry_max=r.number("bridge.retry_max", 30, 0.01, 3600),
        max_age=r.number("bridge.max_age", 3600, 1, 30 * 86400),
        status_interval=r.number("bridge.status_interval", 30, 0.1, 86400),
        callback_hosts=callback_hosts,
    )
    if r.problems:
        raise ConfigError(str(path), r.problems)
    return config
