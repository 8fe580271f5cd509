"""`python -m pipeline`: pipeline authors run a pipeline on local files with no service."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "PIPELINE_MODELS_DIR": str(REPO / "models"),
                                            "PIPELINE_CACHE_DIR": ""})


def test_run_prints_real_labels_for_each_image(efficientnet_dir, photos):
    result = run("run", "--model", "efficientnet-lite0", str(photos["chelsea"]), str(photos["coffee"]),
                 "--param", "TopK=2")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["Status"] for line in lines] == ["PipelineComplete", "PipelineComplete"]
    cat, coffee = (json.loads(line["Results"])["top"] for line in lines)
    assert cat[0]["index"] in range(281, 286) and len(cat) == 2
    assert coffee[0]["index"] in (967, 968)


def test_unreadable_image_is_reported_and_the_exit_code_says_so(efficientnet_dir, tmp_path):
    bad = tmp_path / "bad.tiff"
    bad.write_text("nope")
    result = run("run", str(bad))
    assert result.returncode == 1
    line = json.loads(result.stdout)
    assert line["Status"] == "PipelineFailed" and "bad.tiff" in line["Results"]


def test_unknown_model_is_an_error_listing_the_models(efficientnet_dir, tmp_path):
    result = run("run", "--model", "nope", str(tmp_path / "x.png"))
    assert result.returncode == 2 and "unknown model 'nope'" in result.stderr and "efficientnet-lite0" in result.stderr


def test_models_lists_the_repository(efficientnet_dir):
    result = run("models")
    lines = result.stdout.splitlines()
    assert result.returncode == 0
    assert any(line.startswith("efficientnet-lite0\tversion 1\t") for line in lines)
    assert any(line.startswith("cell-counter\tversion 1\t") for line in lines)


def test_counting_prints_the_count_and_writes_both_files(built_models, tmp_path):
    import tifffile

    from devtools.synthetic_blobs import make_image

    image = tmp_path / "cells.tiff"
    tifffile.imwrite(image, make_image(7, bits=16, count=30, touching_pairs=3, size=256).pixels)
    result = run("run", "--model", "cell-counter", str(image), "--output", str(tmp_path))
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout)
    assert abs(json.loads(line["Results"])["CellCount"] - 30) <= 2
    assert sorted(Path(p).name for p in line["OutputFiles"]) == ["cells-counted.tiff"]  # only images are listed
    assert all(Path(p).is_file() for p in line["OutputFiles"]) and (tmp_path / "cells-counts.csv").is_file()


def test_describe_prints_the_kind_and_declared_parameters(efficientnet_dir):
    result = run("describe", "--model", "cell-counter")
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout)
    assert described["model_type"] == "BlobCounting"
    assert [p["name"] for p in described["parameters"]] == ["Polarity", "MinDiameter", "MaxDiameter", "Threshold"]
