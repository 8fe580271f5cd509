"""Packaging as the guide promises: make targets, the built bento on its own, the compose file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from devtools.servers import serve_bento, stop_process

REPO = Path(__file__).resolve().parent.parent
GUIDE_TARGETS = [
    "build", "serve", "docker-build-bento", "docker-build-mqtt-client", "docker-build", "run",
    "run-mqtt-client", "docker-down-bento", "docker-down-mqtt-client", "down",
    "setup", "models", "demo", "test", "bench", "clean", "help",
]


def make(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_help_lists_every_target_the_guide_and_the_project_name():
    listed = {line.split()[0] for line in make("help").stdout.splitlines() if line.strip()}
    assert set(GUIDE_TARGETS) <= listed, set(GUIDE_TARGETS) - listed


@pytest.mark.parametrize("target", ["docker-build", "docker-build-bento", "run", "docker-down-bento", "down"])
def test_targets_that_need_a_bento_tag_fail_with_the_reference_usage_message(target):
    result = make(target)
    shown = "docker-build" if target == "docker-build-bento" else target
    assert result.returncode != 0
    assert (f"BENTO_TAG is not set, correct usage - make {shown} BENTO_TAG=<bento_image_name>:<bento_image_tag>"
            in result.stderr)


def test_run_mounts_aicsd_models_folder_and_serves_both(tmp_path):
    planned = make("-n", "run", "BENTO_TAG=aicsd_pipeline:x", f"AICSD_MODELS={tmp_path}")
    assert f"-v {tmp_path}:/aicsd-models:ro -e PIPELINE_MODELS_DIR=models:/aicsd-models" in planned.stdout
    missing = make("run", "BENTO_TAG=aicsd_pipeline:x", f"AICSD_MODELS={tmp_path / 'nope'}")
    assert missing.returncode == 2 and "is not a folder: give the AiCSD project's models/ folder" in missing.stderr


def test_the_bridge_container_publishes_its_metrics_port():
    assert "-p 9464:9464 " in make("-n", "run-mqtt-client").stdout
    assert "-p 19464:9464 " in make("-n", "run-mqtt-client", "BRIDGE_METRICS_HOST_PORT=19464").stdout


def test_down_succeeds_quietly_when_nothing_is_running():
    result = make("down", "BENTO_TAG=aicsd_pipeline:nothing")
    assert result.returncode == 0, result.stderr
    assert "Error" not in result.stdout + result.stderr


@pytest.fixture(scope="module")
def built_bento(built_models, tmp_path_factory) -> tuple[str, Path]:
    home = tmp_path_factory.mktemp("bentoml-home")
    result = make("build", env={"BENTOML_HOME": str(home)})
    assert result.returncode == 0, result.stdout + result.stderr
    [tag] = [line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("Built bento: ")]
    assert f"make docker-build BENTO_TAG={tag}" in result.stdout
    return tag, home


def test_bento_carries_its_models_and_nothing_from_tests_or_the_venv(built_bento):
    tag, home = built_bento
    name, version = tag.split(":")
    src = home / "bentos" / name / version / "src"
    files = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    assert {"service.py", "helper.py", "bentoml.yaml", "pipeline/counting.py",
            "models/efficientnet-lite0/1/model.xml", "models/efficientnet-lite0/1/model.bin",
            "models/cell-counter/1/model.xml"} <= files
    assert not [f for f in files if f.startswith(("tests/", "devtools/", ".venv/", "model_builders/"))]
    bento = yaml.safe_load((home / "bentos" / name / version / "bento.yaml").read_text())
    assert {e["name"]: e["value"] for e in bento["envs"]}["PIPELINE_FILE_ROOTS"] == "/tmp/files"


def test_built_bento_served_on_its_own_answers_the_seed_request_with_real_results(
    built_bento, aicsd, photos, tmp_path
):
    tag, home = built_bento
    files = tmp_path / "files"
    (files / "input").mkdir(parents=True)
    (files / "output").mkdir()
    image = files / "input" / "1.tiff"
    shutil.copyfile(photos["coffee"], image)
    elsewhere = tmp_path / "elsewhere"  # not the source tree: the bento must stand alone
    elsewhere.mkdir()
    env = {"BENTOML_HOME": str(home), "PIPELINE_FILE_ROOTS": str(files), "PIPELINE_CALLBACK_HOSTS": "127.0.0.1",
           "PIPELINE_CACHE_DIR": str(tmp_path / "cache"),
           "PIPELINE_LEDGER": str(tmp_path / "ledger.sqlite3")}
    served = serve_bento(tag, env=env, cwd=elsewhere, log_path=tmp_path / "bento.log")
    try:
        job = aicsd.new_job()
        body = {
            "InputFileLocation": str(image),
            "OutputFileFolder": str(files / "output"),
            "ModelParams": {"Brightness": "0"},
            "JobUpdateUrl": job.job_update_url,
            "PipelineStatusUrl": job.pipeline_status_url,
            "GatewayIP": "192.168.0.20",
        }
        with httpx.Client(timeout=120, trust_env=False) as client:
            response = client.post(f"{served.url}/classify", json=body)
        assert response.status_code == 200, response.text
        assert json.loads(response.json()["Results"])["top"][0]["index"] in (967, 968)
        assert aicsd.wait_for_status(job.job_id, timeout=30).ended == "complete"
        assert str(home / "bentos") in served.log_text()  # models came from the bento
    finally:
        stop_process(served.process)


class TestComposeFile:
    def compose(self) -> dict:
        return yaml.safe_load((REPO / "docker-compose.yml").read_text())

    def test_stack_wires_broker_service_and_bridge_together(self):
        services = self.compose()["services"]
        assert set(services) == {"mosquitto", "pipeline", "bridge"}
        assert any(v.endswith(":/tmp/files") for v in services["pipeline"]["volumes"])
        assert services["pipeline"]["image"].startswith("${BENTO_TAG")
        bridge = services["bridge"]["environment"]
        assert bridge["BRIDGE_SERVICE_URL"] == "http://pipeline:3000/classify"
        assert bridge["BRIDGE_MQTT_HOSTNAME"] == "mosquitto"
        config = services["mosquitto"]["volumes"][0].split(":")[0]
        assert (REPO / config).is_file()

    def test_service_serves_its_own_models_and_aicsd_models_folder(self):
        pipeline = self.compose()["services"]["pipeline"]
        assert pipeline["environment"]["PIPELINE_MODELS_DIR"] == "models:/aicsd-models"
        assert any(v.endswith(":/aicsd-models:ro") for v in pipeline["volumes"])

    def test_docker_compose_validates_the_file(self, capsys):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if shutil.which("docker") is None or probe.returncode != 0:
            with capsys.disabled():
                print("\n  docker compose config: skipped, the docker CLI has no compose plugin here")
            pytest.skip("the docker CLI has no compose plugin on this machine")
        result = subprocess.run(["docker", "compose", "config", "--quiet"], cwd=REPO, capture_output=True, text=True,
                                env={**os.environ, "BENTO_TAG": f"aicsd_pipeline:{uuid.uuid4().hex[:8]}"})
        assert result.returncode == 0, result.stderr


def test_bentoml_build_in_a_fresh_clone_without_make_models_stops_and_names_make_models(tmp_path):
    # The guide's own steps: clone, then `bentoml build`, without `make models`.
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, capture_output=True, timeout=120)
    assert not any((clone / "models").glob("*/1/model.xml")), "the clone must not hold built models"
    home = tmp_path / "bentoml-home"
    bentoml = Path(sys.executable).parent / "bentoml"
    result = subprocess.run([str(bentoml), "build"], cwd=clone, capture_output=True, text=True, timeout=600, check=False,
                            env={**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"})
    built = list((home / "bentos").glob("*/*/src/models/efficientnet-lite0/1/model.bin"))
    if result.returncode == 0:
        assert built, "a bento was built without its models"
    else:
        assert "make models" in result.stdout + result.stderr
        assert "models/efficientnet-lite0 holds no built model" in result.stdout + result.stderr
        assert not list((home / "bentos").glob("*/*/bento.yaml"))


def test_a_symlinked_model_directory_counts_as_missing_from_the_bento(tmp_path):
    from serving.bundle import missing_models

    from .tiny_models import channel_mean_classifier, write_model

    write_model(tmp_path / "real" / "m" / "1", channel_mean_classifier())
    models = tmp_path / "models"
    models.mkdir()
    (models / "m").symlink_to(tmp_path / "real" / "m", target_is_directory=True)
    write_model(models / "built" / "1", channel_mean_classifier())
    (models / "empty" / "1").mkdir(parents=True)
    assert missing_models(models, ["built", "m", "empty", "absent"]) == [
        "models/m is a symbolic link, which the bento would carry without its files",
        "models/empty holds no built model",
        "models/absent holds no built model",
    ]
