"""`make demo`: the newcomer's one command shows real results and leaves nothing running."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration


def test_demo_shows_real_results_for_every_sample_and_stops_everything(efficientnet_dir, tmp_path):
    workdir = tmp_path / "demo"
    # amqtt: the broker a machine without Mosquitto gets (the bridge tests cover Mosquitto).
    result = subprocess.run(
        [sys.executable, "-m", "devtools.demo", "--broker", "amqtt", "--workdir", str(workdir)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    images = (".jpg", ".png", ".tiff")
    outcome = {line.split()[0]: line for line in lines if line.split() and line.split()[0].endswith(images)}
    assert "espresso" in outcome["coffee.png"] and "PipelineComplete" in outcome["coffee.png"]
    assert "cat" in outcome["chelsea-16bit.tiff"]
    assert "PipelineFailed" in outcome["not-an-image.tiff"]
    # The counting task's job runs the counter, though its message names no model (AiCSD's never do).
    assert "120 cells (task of ovms/cell-counter)" in outcome["cells-16bit.tiff"]
    assert result.stdout.count("AiCSD callbacks: PUT 200 then POST 200") == 6
    left = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True)
    assert left.stdout == "", f"processes left running: {left.stdout}"
