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
    result = subprocess.run([sys.executable, "-m", "bench", "--quick", "--soak", "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    stages = {f["stage"] for f in report["figures"]}
    assert {"benchmark_app", "pipeline alone", "service alone (HTTP)", "end to end (MQTT -> status)",
            "counting 2048x2048 16-bit"} <= stages
    assert report["machine"]["cores"] >= 1 and report["memory"]["service MiB"] > 0
    assert all(f["count"] > 0 for f in report["figures"])
    assert [f["setting"] for f in report["figures"] if f["stage"] == "benchmark_app"] == [
        "-hint throughput, best of 2", "-hint latency"]
    # Each stage a target is read from is the best of 2 runs, as the reference is the best of its runs.
    best = {f["setting"] for f in report["figures"] if f["setting"].endswith(", best of 2")}
    assert {"jpeg512, 4 threads, best of 2", "jpeg512, concurrency 1, best of 2",
            "saturation (all published at once), best of 2"} <= best
    assert any("batches of 8" in f["setting"] for f in report["figures"] if f["stage"] == "service alone (HTTP)")
    assert (out / "bench.png").stat().st_size > 10_000
    profile = report["profile"]
    attachable = not (profile["error"] and re.search(r"permission|not permitted|ptrace", profile["error"], re.I))
    if not attachable:
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
    assert report["metrics"]["bridge requests"]["value"] >= 1 and "jobs per request to the service" in result.stdout
    # Every stage of the chain says what each process cost per job, and how busy the cores were.
    chain = {"load generator", "service", "bridge", "AiCSD stand-in", f"broker ({report['machine']['broker']})",
             "all named"}
    for figure in report["figures"]:
        if figure["stage"] in ("service alone (HTTP)", "end to end (MQTT -> status)"):
            cpu = figure["cpu"]
            wanted = chain if figure["stage"].startswith("end") else {"load generator", "service", "AiCSD stand-in",
                                                                       "all named"}
            assert set(cpu["core_ms_per_job"]) == wanted, (figure["setting"], cpu)
            assert cpu["core_ms_per_job"]["service"] > 0 and 0 < cpu["busy_cores"] <= report["machine"]["cores"] + 0.1
            assert 0 <= cpu["stolen_cores"] <= report["machine"]["cores"] - cpu["busy_cores"] + 0.1
            # The service worker's CPU told by kind of thread: inference, the event loop, the job threads.
            threads = cpu["core_ms_per_job_by_thread"]
            if attachable:
                assert set(threads) == {"inference (native)", "event loop (HTTP)", "job threads (Python)"}, threads
                assert threads["inference (native)"] > 0 and threads["job threads (Python)"] > 0, threads
                # The worker is part of the service's process tree; each thread's and each process's CPU
                # is read in 10 ms ticks, so allow 10 of them spread over the stage's jobs.
                slack = 100 / cpu["jobs"]
                assert sum(threads.values()) <= cpu["core_ms_per_job"]["service"] + slack, (threads, cpu)
        elif figure["stage"] == "benchmark_app":
            assert figure["cpu"]["core_ms_per_job"]["benchmark_app"] > 0
    if attachable:
        assert "service core-ms per job        by thread" in result.stdout
    else:
        assert "service core-ms per job by thread: not measured" in result.stdout
    assert "core-ms per job" in result.stdout and "busy cores" in result.stdout and "stolen" in result.stdout
    # Every target of issue 10 is printed with its verdict, the soak's memory among them.
    names = [target["name"] for target in report["targets"]]
    assert len(names) == 10 and any("bridge core-ms" in n for n in names) and any("memory growth" in n for n in names)
    for target in report["targets"]:
        verdict = "met" if target["met"] else "MISSED"
        assert re.search(rf"{verdict} +{re.escape(target['name'])} ", result.stdout), target
    assert all(len(values) == 3 for values in report["soak_memory_mib"].values())
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True)
    assert left.stdout == "", f"processes left running: {left.stdout}"
