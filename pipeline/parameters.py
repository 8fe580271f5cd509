"""Declared ModelParams: one schema per pipeline kind, checked all at once.

A person types a task's parameters in the AiCSD UI, so every value is a string and a typo is
common. Each pipeline kind declares what it understands (name, type, default, range,
description), in the manner of openvino-model-api's `parameters()`; `ParameterSchema.parse`
reads every declared key, collects every problem and raises ONE `InvalidParameters` that
names each bad key. Keys no parameter declares (AiCSD's UI sends `Brightness=0` by default,
`Model` picks the model) are accepted and ignored. `describe()` is what a pipeline listing or
the README shows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from aicsd.errors import ParameterError
from aicsd.job import ModelParams

__all__ = ["InvalidParameters", "Param", "ParameterSchema"]

Kind = Literal["integer", "number", "choice"]


class InvalidParameters(ParameterError):
    """Several ModelParams entries are unusable; the message names every one of them.

    A `ParameterError` like any other, so it is reported the same way (`PipelineFailed`)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        self.keys = [key for key, _ in problems]
        ParameterError.__init__(self, problems[0][0], problems[0][1])
        self.args = ("ModelParams " + "; ".join(f"{key}: {problem}" for key, problem in problems),)


@dataclass(frozen=True)
class Param:
    """One declared parameter: how it is typed in the UI and what it means."""

    name: str
    kind: Kind
    default: int | float | str
    description: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()

    def read(self, params: ModelParams) -> int | float | str:
        """This parameter's value in `params` (its default when absent); `ParameterError` if unusable."""
        if self.kind == "integer":
            return params.integer(self.name, int(self.default), minimum=int(self._low()), maximum=int(self._high()))
        if self.kind == "number":
            return params.number(self.name, float(self.default), minimum=self._low(), maximum=self._high())
        return params.choice(self.name, str(self.default), self.choices)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description: name, type, default, range or choices, description."""
        out: dict[str, Any] = {"name": self.name, "type": self.kind, "default": self.default}
        if self.minimum is not None:
            out["min"] = self.minimum
        if self.maximum is not None:
            out["max"] = self.maximum
        if self.choices:
            out["choices"] = list(self.choices)
        out["description"] = self.description
        return out

    def _low(self) -> float:
        return float("-inf") if self.minimum is None else self.minimum

    def _high(self) -> float:
        return float("inf") if self.maximum is None else self.maximum


class ParameterSchema:
    """The parameters of one pipeline kind, bound to one model's defaults and ranges."""

    def __init__(self, *params: Param) -> None:
        self.params = params
        self._by_name = {p.name: p for p in params}

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.params)

    def with_defaults(self, changes: Mapping[str, Mapping[str, Any]]) -> ParameterSchema:
        """A copy where `changes[name]` replaces fields (default, minimum, maximum) of that parameter,
        e.g. a model's own confidence threshold as the default."""
        unknown = set(changes) - set(self._by_name)
        if unknown:
            raise KeyError(f"no such parameters: {', '.join(sorted(unknown))}")
        return ParameterSchema(*(dataclasses.replace(p, **changes.get(p.name, {})) for p in self.params))

    def parse(self, params: ModelParams) -> dict[str, Any]:
        """Every declared parameter's value, or one `InvalidParameters` naming every bad key."""
        values: dict[str, Any] = {}
        problems: list[tuple[str, str]] = []
        for param in self.params:
            try:
                values[param.name] = param.read(params)
            except ParameterError as exc:
                problems.append((param.name, str(exc).removeprefix(f"ModelParams {exc.key}: ")))
        if problems:
            raise InvalidParameters(problems)
        return values

    def describe(self) -> list[dict[str, Any]]:
        return [p.describe() for p in self.params]
