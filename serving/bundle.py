"""The models a bento must carry, checked where `bentoml build` can see the answer.

`bentofile.yaml` names them in its `args` (`bundled_models`). BentoML sets those arguments
before it imports `service.py` to build the bento (and again whenever it loads the service from
the project folder or from the built bento), so `service.py` calls `check_bundled_models` at
import: a plain `bentoml build` in a fresh clone, before `make models`, stops with a message
that says what to run, instead of producing a bento that says ready and fails every job.
`bentoml serve service:AicsdPipeline` and tests pass no such arguments and are not checked.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

__all__ = ["BundleIncomplete", "check_bundled_models", "missing_models"]


class BundleIncomplete(RuntimeError):
    """A model the bento must carry is not built in the project's `models/` folder."""


def missing_models(models_dir: Path, names: Iterable[str]) -> list[str]:
    """Each named model that `bentoml build` would not pack as files, with the reason.

    BentoML packs a symbolic link as a link (its target stays behind), so a linked model
    directory counts as missing.
    """
    problems = []
    for name in names:
        directory = models_dir / name
        if directory.is_symlink():
            problems.append(f"models/{name} is a symbolic link, which the bento would carry without its files")
            continue
        versions = [p for p in directory.iterdir() if p.is_dir() and p.name.isdigit()] if directory.is_dir() else []
        if not any(_has_model(v) for v in versions):
            problems.append(f"models/{name} holds no built model")
    return problems


def _has_model(version_dir: Path) -> bool:
    if version_dir.is_symlink():
        return False
    if any(version_dir.glob("*.onnx")):
        return True
    return any(xml.with_suffix(".bin").is_file() for xml in version_dir.glob("*.xml"))


def check_bundled_models(project_dir: Path, arguments: object) -> None:
    """Raise `BundleIncomplete` when the bento arguments name models `models/` does not hold."""
    raw = getattr(arguments, "bundled_models", None)
    if not raw:
        return
    names = [n.strip() for n in (raw.split(",") if isinstance(raw, str) else raw) if n.strip()]
    problems = missing_models(project_dir / "models", names)
    if problems:
        raise BundleIncomplete(
            "the bento would carry no usable copy of its models (" + "; ".join(problems) + "). "
            "Run `make models` before `bentoml build`, or run `make build`, which builds them first."
        )
