"""Declared settings: a pydantic-settings class per program, read from environment variables.

Each setting is a typed field with a default and a description; the service (`PIPELINE_*`) and
the bridge (`BRIDGE_*`) declare theirs on top of `DeclaredSettings`. Reading them checks every
field at once and turns pydantic's errors into one `SettingsError` that names each variable,
its value and the rule it breaks, so an operator fixes them all in one go.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from .errors import SettingsError

__all__ = ["DeclaredSettings", "split_list"]

S = TypeVar("S", bound="DeclaredSettings")

# The variables `from_env` reads; None means the process environment.
_ENVIRONMENT: ContextVar[Mapping[str, str] | None] = ContextVar("declared_settings_environment", default=None)


class _EnvironmentSource(EnvSettingsSource):
    """Environment variables from a given mapping instead of `os.environ` (tests, CLI overrides)."""

    def __init__(self, settings_cls: type[BaseSettings], environment: Mapping[str, str]) -> None:
        self._environment = environment
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environment, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


class DeclaredSettings(BaseSettings):
    """Settings read only from environment variables, frozen once read."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False, validate_default=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        environment = _ENVIRONMENT.get()
        if environment is None:
            return (init_settings, env_settings)
        return (init_settings, _EnvironmentSource(settings_cls, environment))

    @classmethod
    def from_env(cls: type[S], env: Mapping[str, str] | None = None, **overrides: Any) -> S:
        """Read every setting from `env` (default: the process environment); `overrides` win.

        Raises `SettingsError` listing every bad variable.
        """
        token = _ENVIRONMENT.set(env)
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise SettingsError([cls._problem(error, env) for error in exc.errors()]) from None
        finally:
            _ENVIRONMENT.reset(token)

    @classmethod
    def variable(cls, field: str) -> str:
        """The environment variable that sets `field`."""
        return f"{cls.model_config.get('env_prefix', '')}{field}".upper()

    @classmethod
    def _problem(cls, error: Any, env: Mapping[str, str] | None) -> str:
        import os

        field = str(error["loc"][0]) if error["loc"] else ""
        name = cls.variable(field) if field in cls.model_fields else field
        source = os.environ if env is None else env
        raw = source.get(name)
        shown = f"={raw!r}" if raw is not None else " (default)"
        message = str(error["msg"]).removeprefix("Value error, ")
        description = cls.model_fields[field].description if field in cls.model_fields else None
        hint = f" [{description}]" if description else ""
        return f"{name}{shown}: {message}{hint}"


def split_list(raw: Any, separator: str) -> Any:
    """A `separator`-separated string as a list of its stripped, non-empty parts; others unchanged."""
    if isinstance(raw, str):
        return [part.strip() for part in raw.split(separator) if part.strip()]
    return raw
