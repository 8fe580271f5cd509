"""The bridge's container image holds only what the bridge imports: no OpenVINO, no BentoML."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("openvino", "bentoml", "numpy", "PIL", "tifffile")


def test_bridge_starts_without_the_service_dependencies():
    code = (
        "import sys\n"
        f"for name in {HEAVY!r}: sys.modules[name] = None\n"
        "import paho_mqtt_client\n"
        "print('\\n'.join(sorted(m.__file__ for m in list(sys.modules.values())"
        f" if getattr(m, '__file__', None) and m.__file__.startswith({str(REPO)!r})"
        " and not m.__file__.startswith(sys.prefix))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    used = {Path(f).relative_to(REPO).as_posix() for f in result.stdout.split()}
    dockerfile = (REPO / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (.+) \S+$", dockerfile, re.MULTILINE))
    copied = {part for line in copied for part in line.split()}
    missing = [f for f in used if f not in copied and not any(f.startswith(d) for d in copied if d.endswith("/"))]
    assert missing == [], f"the bridge imports files the Dockerfile does not copy: {missing}"


def test_bridge_requirements_are_pinned_like_the_runtime_ones():
    runtime = dict(
        line.split("==") for line in (REPO / "requirements.txt").read_text().splitlines() if "==" in line
    )
    for line in (REPO / "requirements-bridge.txt").read_text().splitlines():
        if "==" in line and line.split("==")[0] in runtime:
            name, version = line.split("==")
            assert runtime[name] == version, name
