"""Session fixtures: real servers on free loopback ports, started once and stopped at the end."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devtools.aicsd_standin import AicsdStandIn
from devtools.servers import Bridge, Broker, Service, serve_bento, stop_process

from .tiny_models import channel_mean_classifier, write_model

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="session")
def built_models() -> Path:
    """The bundled models as `make models` builds them (built here if missing or out of date)."""
    from model_builders.__main__ import BUILDERS

    for name, build in BUILDERS.items():
        build(MODELS / name / "1")
    return MODELS


@pytest.fixture(scope="session")
def efficientnet_dir(built_models: Path) -> Path:
    """The real EfficientNet-Lite0 IR."""
    return built_models / "efficientnet-lite0"


@pytest.fixture(scope="session")
def file_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The gateway file root the service allows: input/ and output/ inside."""
    root = tmp_path_factory.mktemp("gateway-files")
    (root / "input").mkdir()
    (root / "output").mkdir()
    return root


@pytest.fixture(scope="session")
def service_models(tmp_path_factory: pytest.TempPathFactory, efficientnet_dir: Path) -> Path:
    """A model repository for the service: the real model plus small ones that show edge cases."""
    models = tmp_path_factory.mktemp("models")
    (models / "efficientnet-lite0").symlink_to(efficientnet_dir, target_is_directory=True)
    (models / "cell-counter").symlink_to(efficientnet_dir.parent / "cell-counter", target_is_directory=True)
    (models / "empty" / "1").mkdir(parents=True)
    write_model(models / "tiny" / "1", channel_mean_classifier(8), {"model_type": "Classification",
                                                                     "aicsd_pipeline": "Classification",
                                                                     "labels": "red green blue"})
    write_model(models / "exotic" / "1", channel_mean_classifier(8), {"model_type": "Segmentation"})
    return models


@pytest.fixture(scope="session")
def service(
    tmp_path_factory: pytest.TempPathFactory, file_root: Path, service_models: Path
) -> Iterator[Service]:
    """The real service under `bentoml serve`, allowed to call back 127.0.0.1 only."""
    ARTIFACTS.mkdir(exist_ok=True)
    log_path = ARTIFACTS / "service.log"
    env = {
        "PIPELINE_MODELS_DIR": str(service_models),
        "PIPELINE_FILE_ROOTS": str(file_root),
        "PIPELINE_CALLBACK_HOSTS": "127.0.0.1,localhost",
        "PIPELINE_CALLBACK_BACKOFF": "0.05",
        "PIPELINE_CALLBACK_TIMEOUT": "5",
        "PIPELINE_CACHE_DIR": str(tmp_path_factory.mktemp("ov-cache")),
        "PIPELINE_LEDGER": str(tmp_path_factory.mktemp("ledger") / "ledger.sqlite3"),
    }
    running = serve_bento("service:AicsdPipeline", env=env, cwd=REPO, log_path=log_path)
    try:
        yield running
    finally:
        stop_process(running.process)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=120, trust_env=False) as http:
        yield http


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real photos nobody here made, from scikit-image's bundled data, as PNG files."""
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    out = {}
    for name in ("chelsea", "coffee"):
        path = folder / f"{name}.png"
        Image.fromarray(getattr(data, name)()).save(path)
        out[name] = path
    return out


def copy_into(root: Path, source: Path, name: str | None = None) -> Path:
    target = root / "input" / (name or source.name)
    shutil.copyfile(source, target)
    return target


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """An MQTT broker of this test's own on a free loopback port: Mosquitto, else amqtt."""
    running = Broker(tmp_path / "broker").start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def bridges() -> Iterator[list[Bridge]]:
    """Bridge processes a test starts (append them here): stopped at its end."""
    started: list[Bridge] = []
    yield started
    for bridge in started:
        bridge.stop()


@pytest.fixture(scope="module")
def image(file_root: Path) -> Path:
    """A small all-blue PNG in the gateway's input folder (the `tiny` model says `blue`)."""
    import numpy as np
    from PIL import Image

    path = file_root / "input" / "bridge-blue.png"
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[..., 2] = 255
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="session")
def aicsd() -> Iterator[AicsdStandIn]:
    """The contract-enforcing AiCSD stand-in (job repository + task launcher) on 127.0.0.1."""
    with AicsdStandIn() as standin:
        yield standin
