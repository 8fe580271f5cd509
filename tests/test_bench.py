"""A tiny run of `make bench`, so the benchmark cannot silently rot (no figure is asserted on)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration


def test_quick_benchmark_writes_its_table_json_and_chart_and_stops_everything(built_models, tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    stages = {f["stage"] for f in report["figures"]}
    assert {"benchmark_app", "pipeline alone", "service alone (HTTP)", "end to end (MQTT -> status)",
            "counting 2048x2048 16-bit"} <= stages
    assert report["machine"]["cores"] >= 1 and report["memory"]["service MiB"] > 0
    assert all(f["count"] > 0 for f in report["figures"])
    assert (out / "bench.png").stat().st_size > 10_000
    profile = report["profile"]
    if profile["error"] and re.search(r"permission|not permitted|ptrace", profile["error"], re.I):
        # A machine that forbids attaching to processes: the bench says so and carries on.
        assert f"profile unavailable: {profile['error']}" in result.stdout
    else:
        assert profile["error"] is None, profile["error"]
        assert profile["samples"] > 0 and abs(sum(profile["buckets"].values()) - 100) < 1
        assert "interpreter time of the service worker" in result.stdout
    assert "ratio" in result.stdout and "benchmark_app" in result.stdout
    # Both Prometheus endpoints were on while it measured, and counted what it did.
    service, bridge = report["metrics"]["service"], report["metrics"]["bridge"]
    assert service["status"] == bridge["status"] == 200 and service["present"] and bridge["present"]
    # Read once AiCSD had every status: the service's last answers may still be on their way back.
    assert 0 < bridge["value"] <= sum(f["count"] for f in report["figures"] if f["stage"] == "end to end (MQTT -> status)")
    assert f"metrics, service: {service['url']} answered 200, bentoml_service_request_total = " in result.stdout
    assert f"metrics, bridge: {bridge['url']} answered 200, aicsd_bridge_forwarded_total = " in result.stdout
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True)
    assert left.stdout == "", f"processes left running: {left.stdout}"
