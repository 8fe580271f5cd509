"""Service settings: `PIPELINE_*` environment variables, declared once and validated at start-up.

Every variable has a documented default (the README's configuration table follows this class).
A bad value stops start-up with one `SettingsError` that lists every problem, so an operator
fixes them all in one go instead of one per restart.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from aicsd.callback_rules import parse_callback_hosts
from aicsd.settings import DeclaredSettings, split_list

__all__ = ["DEVICE_HINTS", "Settings"]

DEVICE_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "aicsd-pipeline" / "openvino"


def _default_ledger() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "aicsd-pipeline" / "ledger.sqlite3"


class Settings(DeclaredSettings):
    """Validated service settings; build with `Settings.from_env()`."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_")

    models_dir: Annotated[tuple[Path, ...], NoDecode] = Field(
        (Path("models"),),
        description="':'-separated model repository folders; a name in several is served from the first",
    )
    model_poll: float = Field(
        2.0, ge=0, allow_inf_nan=False,
        description="seconds between looks for new, changed or removed models; 0 fixes them at start-up",
    )
    default_model: str = Field(
        "efficientnet-lite0", description="model used when neither the task nor ModelParams names one"
    )
    file_roots: Annotated[tuple[Path, ...], NoDecode] = Field(
        (Path("/tmp/files"),), description="':'-separated absolute folders that inputs and outputs must lie in"
    )
    callback_hosts: Annotated[frozenset[str], NoDecode] = Field(
        frozenset({"job-repository", "task-launcher", "localhost", "127.0.0.1"}),
        description="','-separated host or host:port entries allowed in callback URLs, or *",
    )
    device: str = Field("CPU", pattern=r"^[A-Za-z0-9.:,_()-]+$", description="OpenVINO device: CPU, GPU, AUTO, ...")
    performance_hint: Literal["LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT"] = Field(
        "THROUGHPUT", description="OpenVINO performance hint"
    )
    latency_when_alone: bool = Field(
        True,
        description="with THROUGHPUT, also compile our own models for LATENCY and use that for a job that runs "
        "alone (about half the time; a second compiled copy of the model in memory)",
    )
    cache_dir: Path | None = Field(
        default_factory=_default_cache_dir, description="compiled-model cache folder; empty disables it"
    )
    max_pixels: int = Field(100_000_000, gt=0, description="largest image (width x height) a job may bring")
    max_pages: int = Field(1000, gt=0, description="most pages a TIFF may have (more are refused unparsed)")
    image_memory_mb: int = Field(
        4096, gt=0, description="MB of images in flight (decoded pixels + working space); jobs wait for room"
    )
    callback_tries: int = Field(5, gt=0, description="attempts per AiCSD callback")
    callback_backoff: float = Field(2.0, ge=0, allow_inf_nan=False, description="seconds before the 2nd attempt")
    callback_timeout: float = Field(10.0, gt=0, allow_inf_nan=False, description="seconds per callback request")
    repeat_window: float = Field(
        604_800.0, ge=0, allow_inf_nan=False,
        description="seconds the ledger keeps a reported job, so that it is answered, not run, if it comes again",
    )
    ledger: Path = Field(
        default_factory=_default_ledger,
        description="the job ledger (SQLite); put it on a volume that outlives the service",
    )
    task_lookup: bool = Field(
        True, description="ask AiCSD's task launcher for the task's pipeline; off: ModelParams Model or the default"
    )
    shared_topic: bool = Field(
        False, description="several services share the job topic: leave a job whose pipeline is not served here"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="level of the service's own log lines"
    )

    @property
    def any_callback_host(self) -> bool:
        return "*" in self.callback_hosts

    @field_validator("models_dir", mode="before")
    @classmethod
    def _models_dirs(cls, value: Any) -> Any:
        if isinstance(value, Path):
            return (value,)
        parts = split_list(value, ":")
        if isinstance(parts, list) and not parts:
            raise ValueError("must name at least one folder")
        return tuple(Path(p) for p in parts) if isinstance(parts, list) else parts

    @field_validator("default_model")
    @classmethod
    def _model_name(cls, value: str) -> str:
        value = value.strip()
        if not value or "/" in value or value in (".", ".."):
            raise ValueError("must be a model directory name (no '/')")
        return value

    @field_validator("file_roots", mode="before")
    @classmethod
    def _file_roots(cls, value: Any) -> Any:
        parts = split_list(value, ":")
        if not parts:
            raise ValueError("must name at least one absolute folder")
        for part in parts:
            if not Path(part).is_absolute():
                raise ValueError(f"must be ':'-separated absolute folders; {str(part)!r} is not absolute")
        return tuple(Path(p) for p in parts)

    @field_validator("callback_hosts", mode="before")
    @classmethod
    def _callback_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_callback_hosts(value)
        return value

    @field_validator("device", "performance_hint", "log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("cache_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("max_pixels", "max_pages", "image_memory_mb", "callback_tries", mode="before")
    @classmethod
    def _underscores(cls, value: Any) -> Any:
        return value.replace("_", "") if isinstance(value, str) else value
