"""Bridge configuration: `pythonClientConfig.yaml` plus environment overrides, declared and checked at once.

The file's sections are pydantic models (`_ServiceSection`, `_MqttSection`, `_BridgeSection`):
each key is a typed field with its default and its rule. The reference demo's keys keep their
meaning (`service.POST_url` + `service.port` + `service.service_func` make the API URL,
`gateway_ip`, `mqtt.topic`, `mqtt.hostname`, `mqtt.port`). The environment variables of
`BridgeEnvironment` (pydantic-settings, `BRIDGE_*`) override the file: `BRIDGE_SERVICE_URL` (the
whole API URL), `BRIDGE_GATEWAY_IP`, `BRIDGE_MQTT_HOSTNAME`, `BRIDGE_MQTT_PORT`, `BRIDGE_SPOOL`,
`BRIDGE_LOG_LEVEL`, `BRIDGE_METRICS_PORT`. Every problem is collected into one `ConfigError`, so a broken file is fixed
in one go, before any job is in flight.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import SettingsConfigDict

from aicsd.callback_rules import parse_callback_hosts
from aicsd.errors import SettingsError
from aicsd.job import MAX_BATCH
from aicsd.settings import DeclaredSettings

__all__ = ["BridgeConfig", "BridgeEnvironment", "ConfigError", "TlsConfig", "load_config"]

PLACEHOLDER = "##.##.##.##"
DEFAULT_CALLBACK_HOSTS = "job-repository,task-launcher,localhost,127.0.0.1"
DEFAULT_STATUS_TOPIC = "aicsd-pipeline/bridge/{client_id}/status"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_METRICS_PORT = 9464
DEFAULT_METRICS_ADDRESS = "0.0.0.0"
DEFAULT_BATCH = 8
_HOST_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$")


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
    status_topic: str = "aicsd-pipeline/bridge/aicsd-pipeline-bridge/status"
    log_level: str = "INFO"
    max_unexpected_errors: int = 3
    metrics_port: int = DEFAULT_METRICS_PORT  # 0: no metrics endpoint
    metrics_address: str = DEFAULT_METRICS_ADDRESS
    batch: int = DEFAULT_BATCH  # most jobs in one request; 1: every job alone to `service_url`

    @property
    def batch_url(self) -> str:
        """The service's batch API: `service_url` with `_batch` appended to its path
        (`http://host:3000/classify` -> `http://host:3000/classify_batch`)."""
        parts = urlsplit(self.service_url)
        return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "_batch"))

    @property
    def subscription(self) -> str:
        """The topic filter: `$share/<group>/<topic>` when a shared group splits jobs between bridges."""
        return f"$share/{self.shared_group}/{self.topic}" if self.shared_group else self.topic


class BridgeEnvironment(DeclaredSettings):
    """The environment variables that override `pythonClientConfig.yaml` (empty means unset)."""

    model_config = SettingsConfigDict(env_prefix="BRIDGE_")

    service_url: str | None = Field(None, description="the whole API URL, instead of service.*")
    gateway_ip: str | None = Field(None, description="overrides gateway_ip")
    mqtt_hostname: str | None = Field(None, description="overrides mqtt.hostname")
    mqtt_port: str | None = Field(None, description="overrides mqtt.port")
    spool: str | None = Field(None, description="overrides bridge.spool")
    log_level: str | None = Field(None, description="overrides bridge.log_level")
    metrics_port: str | None = Field(None, description="overrides bridge.metrics_port (0: no metrics)")

    def overrides(self) -> dict[str, tuple[str, str]]:
        """Dotted file key -> (variable, value) for each variable that is set and not blank."""
        keys = {"gateway_ip": "gateway_ip", "mqtt_hostname": "mqtt.hostname", "mqtt_port": "mqtt.port",
                "spool": "bridge.spool", "log_level": "bridge.log_level", "metrics_port": "bridge.metrics_port"}
        chosen = {}
        for field, dotted in keys.items():
            value = getattr(self, field)
            if value is not None and value.strip():
                chosen[dotted] = (self.variable(field), value.strip())
        return chosen


def _no_placeholder(value: str, hint: str) -> str:
    if PLACEHOLDER in value:
        raise ValueError(f"still the placeholder {PLACEHOLDER!r}; {hint}")
    return value


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http(s) URL with a host, got {value!r}")
    return value


def _plain_topic(value: str, what: str) -> str:
    if not value or any(c in value for c in "+#") or value.startswith("$"):
        raise ValueError(f"must be a plain topic without '+', '#' or a leading '$' ({what}), got {value!r}")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class _ServiceSection(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True, coerce_numbers_to_str=True)

    POST_url: str = Field(min_length=1)
    port: str = "3000"
    service_func: str = "classify"

    @field_validator("POST_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        _no_placeholder(value, "set it to the pipeline service's address (e.g. http://localhost or the "
                               "gateway IP), or set BRIDGE_SERVICE_URL")
        return _http_url(value)

    @field_validator("port")
    @classmethod
    def _port(cls, value: str) -> str:
        if value and not (value.isdigit() and 1 <= int(value) <= 65535):
            raise ValueError(f"must be a port number, got {value!r}")
        return value

    def url(self) -> str:
        parts = urlsplit(self.POST_url)
        netloc = f"{parts.hostname}:{self.port}" if self.port else parts.netloc
        func = self.service_func.strip("/") or "classify"
        return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}/{func}"


class _TlsSection(_Section):
    ca_certs: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None

    @field_validator("ca_certs", "certfile", "keyfile", mode="before")
    @classmethod
    def _existing_file(cls, value: Any) -> Any:
        if value in (None, ""):
            return None
        path = Path(str(value)).expanduser()
        if not path.is_file():
            raise ValueError(f"file {str(value)!r} does not exist")
        return path


class _MqttSection(_Section):
    topic: str = "mqtt-export/pipeline/params"
    hostname: str = Field("external-mqtt-broker", min_length=1)
    port: int = Field(1883, ge=1, le=65535)
    qos: int = Field(1, ge=0, le=2)
    client_id: str = Field("aicsd-pipeline-bridge", min_length=1)
    username: str = ""
    password: str = ""
    tls: _TlsSection | None = None
    shared_group: str = ""
    keepalive: int = Field(60, ge=2, le=3600)
    status_topic: str = DEFAULT_STATUS_TOPIC

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        return _plain_topic(value, "use mqtt.shared_group to share")

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str) -> str:
        return _no_placeholder(value, "set the broker's address")

    @field_validator("tls", mode="before")
    @classmethod
    def _tls(cls, value: Any) -> Any:
        if value in (None, False, "", {}):
            return None
        if value is True:
            return {}
        if not isinstance(value, Mapping):
            # pydantic turns only ValueError into a validation problem
            raise ValueError("must be a mapping with ca_certs, certfile, keyfile (or true)")
        return value

    @field_validator("shared_group")
    @classmethod
    def _group(cls, value: str) -> str:
        if any(c in value for c in "/+#"):
            raise ValueError(f"must not contain '/', '+' or '#', got {value!r}")
        return value

    @field_validator("status_topic")
    @classmethod
    def _status_topic(cls, value: str) -> str:
        return _plain_topic(value, "{client_id} is replaced by mqtt.client_id")


class _BridgeSection(_Section):
    concurrency: int = Field(2, ge=1, le=64)
    spool: Path = Path("spool/bridge.sqlite3")
    request_timeout: float = Field(600, ge=1, le=86400)
    retry_initial: float = Field(1, ge=0.01, le=3600)
    retry_max: float = Field(30, ge=0.01, le=3600)
    max_age: float = Field(3600, ge=1, le=30 * 86400)
    status_interval: float = Field(30, ge=0.1, le=86400)
    callback_hosts: frozenset[str] = Field(default_factory=lambda: parse_callback_hosts(DEFAULT_CALLBACK_HOSTS))
    log_level: str = "INFO"
    max_unexpected_errors: int = Field(3, ge=1, le=100)
    metrics_port: int = Field(DEFAULT_METRICS_PORT, ge=0, le=65535)
    metrics_address: str = Field(DEFAULT_METRICS_ADDRESS, min_length=1)
    batch: int = Field(DEFAULT_BATCH, ge=1, le=MAX_BATCH)

    @field_validator("metrics_address")
    @classmethod
    def _address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if not _HOST_NAME.match(value) or len(value) > 253:
                raise ValueError(f"must be an IP address or a host name to listen on (0.0.0.0: every interface), "
                                 f"got {value!r}") from None
        return value

    @field_validator("callback_hosts", mode="before")
    @classmethod
    def _hosts(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return parse_callback_hosts(DEFAULT_CALLBACK_HOSTS)
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        return parse_callback_hosts(str(value))

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
        return value.upper()


class _File(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True, coerce_numbers_to_str=True)

    service: _ServiceSection | None = None
    gateway_ip: str = Field(min_length=1)
    mqtt: _MqttSection = Field(default_factory=lambda: _MqttSection.model_validate({}))
    bridge: _BridgeSection = Field(default_factory=lambda: _BridgeSection.model_validate({}))

    @field_validator("gateway_ip")
    @classmethod
    def _gateway(cls, value: str) -> str:
        return _no_placeholder(value, "set the gateway's address (`hostname -I`) or BRIDGE_GATEWAY_IP")

    @field_validator("mqtt", "bridge", mode="before")
    @classmethod
    def _empty_section(cls, value: Any) -> Any:
        return {} if value is None else value


def _place(data: dict[str, Any], dotted: str, value: str) -> None:
    node = data
    *parents, last = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[last] = value


def _problem(error: Any, overridden: Mapping[str, tuple[str, str]]) -> str:
    dotted = ".".join(str(p) for p in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "missing":
        message = "missing"
    elif error["type"] == "extra_forbidden":
        message = "unknown key (a typo?)"
    elif error["type"] != "value_error":
        message = f"{message}, got {error['input']!r}"[:300]
    source = f" (from {overridden[dotted][0]})" if dotted in overridden else ""
    return f"{dotted}{source}: {message}"


def load_config(path: Path, env: Mapping[str, str] | None = None) -> BridgeConfig:
    """Read and check `path` with the `BRIDGE_*` overrides from `env`; raise `ConfigError` listing every problem."""
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
    try:
        environment = BridgeEnvironment.from_env(env)
    except SettingsError as exc:
        raise ConfigError("the environment", exc.problems) from None

    data = {key: (dict(value) if isinstance(value, Mapping) else value) for key, value in data.items()}
    overridden = environment.overrides()
    for dotted, (_, value) in overridden.items():
        _place(data, dotted, value)
    service_url = (environment.service_url or "").strip()
    if service_url:
        data.pop("service", None)

    problems: list[str] = []
    try:
        parsed = _File.model_validate(data)
    except ValidationError as exc:
        problems = [_problem(error, overridden) for error in exc.errors()]
        parsed = None
    if service_url:
        try:
            _http_url(service_url)
        except ValueError as exc:
            problems.insert(0, f"BRIDGE_SERVICE_URL: {exc}")
    elif parsed is not None and parsed.service is None:
        problems.insert(0, "service.POST_url: missing (or set BRIDGE_SERVICE_URL)")
    if problems or parsed is None:
        raise ConfigError(str(path), problems)

    mqtt, bridge = parsed.mqtt, parsed.bridge
    tls = None if mqtt.tls is None else TlsConfig(mqtt.tls.ca_certs, mqtt.tls.certfile, mqtt.tls.keyfile)
    return BridgeConfig(
        service_url=service_url or (parsed.service.url() if parsed.service else ""),
        gateway_ip=parsed.gateway_ip,
        mqtt_hostname=mqtt.hostname,
        mqtt_port=mqtt.port,
        topic=mqtt.topic,
        qos=mqtt.qos,
        client_id=mqtt.client_id,
        username=mqtt.username or None,
        password=mqtt.password or None,
        tls=tls,
        shared_group=mqtt.shared_group or None,
        keepalive=mqtt.keepalive,
        concurrency=bridge.concurrency,
        spool=bridge.spool.expanduser(),
        request_timeout=bridge.request_timeout,
        retry_initial=bridge.retry_initial,
        retry_max=bridge.retry_max,
        max_age=bridge.max_age,
        status_interval=bridge.status_interval,
        callback_hosts=bridge.callback_hosts,
        status_topic=mqtt.status_topic.replace("{client_id}", mqtt.client_id),
        log_level=bridge.log_level,
        max_unexpected_errors=bridge.max_unexpected_errors,
        metrics_port=bridge.metrics_port,
        metrics_address=bridge.metrics_address,
        batch=bridge.batch,
    )
