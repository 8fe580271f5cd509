"""Service settings from environment variables, validated once at start-up.

Every variable has a documented default (see the README's configuration table). A bad value
stops start-up with one `SettingsError` that lists every problem, so an operator fixes them
all in one go instead of one per restart.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from aicsd.callback_rules import parse_callback_hosts
from aicsd.errors import SettingsError

__all__ = ["DEVICE_HINTS", "Settings"]

T = TypeVar("T")

DEVICE_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "aicsd-pipeline" / "openvino")


@dataclass(frozen=True)
class Settings:
    """Validated service settings; build with `Settings.from_env()`."""

    models_dir: Path
    default_model: str
    file_roots: tuple[Path, ...]
    callback_hosts: frozenset[str]
    device: str
    performance_hint: str
    cache_dir: Path | None
    max_pixels: int
    callback_tries: int
    callback_backoff: float
    callback_timeout: float
    repeat_window: float

    @property
    def any_callback_host(self) -> bool:
        return "*" in self.callback_hosts

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read every `PIPELINE_*` variable, collecting all problems before failing."""
        env = os.environ if env is None else env
        problems: list[str] = []

        def get(name: str, default: str, convert: Callable[[str], T], rule: str) -> T | None:
            raw = env.get(name, default).strip()
            try:
                return convert(raw)
            except (ValueError, TypeError) as exc:
                detail = f" ({exc})" if str(exc) else ""
                problems.append(f"{name}={raw!r}: {rule}{detail}")
                return None

        settings = dict(
            models_dir=get("PIPELINE_MODELS_DIR", "models", _non_empty_path, "must be a directory path"),
            default_model=get("PIPELINE_DEFAULT_MODEL", "efficientnet-lite0", _model_name,
                              "must be a model directory name"),
            file_roots=get("PIPELINE_FILE_ROOTS", "/tmp/files", _file_roots,
                           "must be ':'-separated absolute directory paths"),
            callback_hosts=get("PIPELINE_CALLBACK_HOSTS",
                               "job-repository,task-launcher,localhost,127.0.0.1",
                               parse_callback_hosts, "must be ','-separated host or host:port entries, or *"),
            device=get("PIPELINE_DEVICE", "CPU", _device, "must be an OpenVINO device name such as CPU, GPU or AUTO"),
            performance_hint=get("PIPELINE_PERFORMANCE_HINT", "THROUGHPUT", _hint,
                                 "must be one of " + ", ".join(DEVICE_HINTS)),
            cache_dir=get("PIPELINE_CACHE_DIR", _default_cache_dir(), _optional_path,
                          "must be a directory path, or empty to disable the compiled-model cache"),
            max_pixels=get("PIPELINE_MAX_PIXELS", "100000000", _positive_int, "must be a whole number above 0"),
            callback_tries=get("PIPELINE_CALLBACK_TRIES", "5", _positive_int, "must be a whole number above 0"),
            callback_backoff=get("PIPELINE_CALLBACK_BACKOFF", "2", _non_negative_float,
                                 "must be a number of seconds, 0 or more"),
            callback_timeout=get("PIPELINE_CALLBACK_TIMEOUT", "10", _positive_float,
                                 "must be a number of seconds above 0"),
            repeat_window=get("PIPELINE_REPEAT_WINDOW", "900", _non_negative_float,
                              "must be a number of seconds, 0 to disable"),
        )
        if problems:
            raise SettingsError(problems)
        return cls(**settings)  # type: ignore[arg-type]


def _non_empty_path(raw: str) -> Path:
    if not raw:
        raise ValueError("empty")
    return Path(raw)


def _optional_path(raw: str) -> Path | None:
    return Path(raw) if raw else None


def _model_name(raw: str) -> str:
    if not raw or "/" in raw or raw in (".", ".."):
        raise ValueError("not a plain directory name")
    return raw


def _file_roots(raw: str) -> tuple[Path, ...]:
    parts = [p for p in raw.split(":") if p.strip()]
    if not parts:
        raise ValueError("no root given")
    roots = []
    for part in parts:
        path = Path(part.strip())
        if not path.is_absolute():
            raise ValueError(f"{part!r} is not absolute")
        roots.append(path)
    return tuple(roots)


def _device(raw: str) -> str:
    if not raw or not all(c.isalnum() or c in ".:,_-()" for c in raw):
        raise ValueError("not a device name")
    return raw.upper()


def _hint(raw: str) -> str:
    if raw.upper() not in DEVICE_HINTS:
        raise ValueError("unknown hint")
    return raw.upper()


def _positive_int(raw: str) -> int:
    value = int(raw.replace("_", ""))
    if value <= 0:
        raise ValueError("not above 0")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("not above 0")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0:
        raise ValueError("negative")
    return value
