"""The test helpers themselves: a stopped server leaves nothing behind."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import psutil
import pytest

from devtools.servers import serve_bento, stop_process

from .conftest import ARTIFACTS, REPO
from .tiny_models import channel_mean_classifier, write_model


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_stopping_bentoml_serve_ends_its_worker_too(tmp_path: Path, sig: int) -> None:
    models = tmp_path / "models"
    write_model(models / "tiny" / "1", channel_mean_classifier(8), {"model_type": "Classification"})
    ARTIFACTS.mkdir(exist_ok=True)
    running = serve_bento(
        "service:AicsdPipeline",
        env={"PIPELINE_MODELS_DIR": str(models), "PIPELINE_DEFAULT_MODEL": "tiny",
             "PIPELINE_FILE_ROOTS": str(tmp_path), "PIPELINE_CACHE_DIR": "",
             "PIPELINE_LEDGER": str(tmp_path / "ledger.sqlite3")},
        cwd=REPO,
        log_path=ARTIFACTS / f"servers-{signal.Signals(sig).name}.log",
    )
    port = int(running.url.rsplit(":", 1)[1])
    family = psutil.Process(running.process.pid).children(recursive=True)
    assert family, "bentoml serve should have started a worker process"
    stop_process(running.process, sig)
    still = [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert still == [], f"processes of bentoml serve still alive after {signal.Signals(sig).name}: {still}"
    assert not _listening(port), f"port {port} still served after {signal.Signals(sig).name}"
