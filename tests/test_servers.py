"""The test helpers themselves: a stopped server leaves nothing behind; a port taken at start-up is tried again."""

from __future__ import annotations

import signal
import socket
import threading
import time
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


@pytest.mark.integration
def test_a_start_that_finds_its_port_taken_is_tried_again_until_the_port_is_free(
    built_models: Path, tmp_path: Path, caplog
) -> None:
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    log_path = tmp_path / "taken.log"

    def let_go_once_refused() -> None:
        # Whoever took the port lets it go once the first start has failed on it.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if log_path.is_file() and "Address already in use" in log_path.read_text(errors="replace"):
                break
            time.sleep(0.05)
        held.close()

    releaser = threading.Thread(target=let_go_once_refused, daemon=True)
    releaser.start()
    running = serve_bento(
        "service:AicsdPipeline",
        env={"PIPELINE_MODELS_DIR": str(built_models), "PIPELINE_FILE_ROOTS": str(tmp_path),
             "PIPELINE_CACHE_DIR": "", "PIPELINE_LEDGER": str(tmp_path / "ledger.sqlite3")},
        cwd=REPO, port=port, log_path=log_path,
    )
    releaser.join(5)
    try:
        assert running.url == f"http://127.0.0.1:{port}"
        assert any("found a port taken (start 1 of 3)" in r.getMessage() for r in caplog.records)
    finally:
        stop_process(running.process)


@pytest.mark.integration
def test_a_port_taken_at_every_start_is_an_error_naming_it(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        with pytest.raises(RuntimeError, match="found a port taken 3 times:(.|\\n)*Address already in use"):
            serve_bento("service:AicsdPipeline", env={"PIPELINE_FILE_ROOTS": str(tmp_path), "PIPELINE_CACHE_DIR": ""},
                        cwd=REPO, port=held.getsockname()[1], log_path=tmp_path / "taken.log")
