"""The README's layout section names every module of the packages, so a newcomer can find them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("aicsd", "serving", "pipeline", "bridge")


def layout_section() -> str:
    readme = (REPO / "README.md").read_text()
    return readme.split("## Layout", 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize("package", PACKAGES)
def test_the_readme_layout_names_every_module_of(package):
    row = next(line for line in layout_section().splitlines() if line.startswith(f"| `{package}/`"))
    named = set(re.findall(r"`(\w+)`", row))
    modules = {p.stem for p in (REPO / package).glob("*.py") if not p.stem.startswith("_")}
    assert modules - named == set(), f"README layout does not name {sorted(modules - named)} of {package}/"


@pytest.mark.parametrize("package", PACKAGES[:3])
def test_each_package_docstring_names_its_modules(package):
    import importlib

    doc = importlib.import_module(package).__doc__ or ""
    modules = {p.stem for p in (REPO / package).glob("*.py") if not p.stem.startswith("_")}
    missing = {m for m in modules if not re.search(rf"^\s+{m}\s", doc, re.MULTILINE)}
    assert missing == set(), f"{package}/__init__.py does not describe {sorted(missing)}"
