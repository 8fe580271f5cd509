"""The real service at its edges: callback URLs AiCSD would not send are refused before anything
is sent, and job text cannot forge or flood the service's log."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytestmark = pytest.mark.integration

FORGED = "2026-11-26 10:00:00,000 [INFO] [serving.runner] job=forged task=forged pipeline complete"


class Recorder(ThreadingHTTPServer):
    """Anything at all on a loopback port the service may call back: records every request."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Record)
        self.paths: list[str] = []


class _Record(BaseHTTPRequestHandler):
    server: Recorder

    def _any(self) -> None:
        self.server.paths.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_PUT = do_POST = do_DELETE = _any

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def job_body(aicsd, file_root, **changes: object) -> tuple[object, dict]:
    job = aicsd.new_job()
    body = {
        "InputFileLocation": str(file_root / "input" / f"{uuid.uuid4()}.png"),
        "OutputFileFolder": str(file_root / "output"),
        "ModelParams": {},
        "JobUpdateUrl": job.job_update_url,
        "PipelineStatusUrl": job.pipeline_status_url,
        "GatewayIP": "127.0.0.1",
        **changes,
    }
    return job, body


def new_log(service, before: int, marker: str, timeout: float = 20) -> str:
    """The service's log written since `before` characters, once `marker` is in it."""
    deadline = time.monotonic() + timeout
    while True:
        text = service.log_text()[before:]
        if marker in text or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


@pytest.mark.parametrize("field", ["JobUpdateUrl", "PipelineStatusUrl"])
def test_the_callback_url_attack_of_issue_8_gets_a_4xx_naming_the_field_and_no_callback(
    service, aicsd, client, file_root, recorder, field
):
    job, body = job_body(aicsd, file_root)
    route = "job/pipeline" if field == "JobUpdateUrl" else "pipelineStatus"
    body[field] = (f"http://127.0.0.1:{recorder.server_address[1]}/admin/delete-everything"
                   f"/api/v1/{route}/{job.job_id}/{job.task_id}?cmd=drop")
    response = client.post(f"{service.url}/classify", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert field in response.text
    assert recorder.paths == [] and aicsd.requests_for(job.job_id) == []


@pytest.mark.parametrize("char", ["\u20ac", "\u0101", "\u00e9"])
def test_a_callback_url_with_a_character_that_is_not_ascii_gets_a_4xx_naming_the_field(
    service, aicsd, client, file_root, char
):
    job, body = job_body(aicsd, file_root)
    for field in ("JobUpdateUrl", "PipelineStatusUrl"):  # the same task id in both: one job
        body[field] = body[field].replace(job.task_id, job.task_id + char)
    response = client.post(f"{service.url}/classify", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert "JobUpdateUrl" in response.text and "PipelineStatusUrl" in response.text
    assert "not ASCII" in response.text
    assert aicsd.requests_for(job.job_id) == []


def test_a_refused_request_is_one_warning_line_in_the_service_log(service, aicsd, client, file_root):
    marker = f"refused-{uuid.uuid4().hex}"
    _job, body = job_body(aicsd, file_root)
    body["JobUpdateUrl"] = f"http://127.0.0.1:9/{marker}"
    before = len(service.log_text())
    response = client.post(f"{service.url}/classify", json=body)
    assert response.status_code == 400
    written = new_log(service, before, marker)
    lines = [line for line in written.splitlines() if marker in line]
    assert len(lines) == 1 and "[WARNING]" in lines[0] and "JobUpdateUrl" in lines[0], written
    assert "Traceback" not in written and "[ERROR]" not in written, written


def test_a_request_the_framework_refuses_is_one_warning_line_too(service, client):
    marker = f"pickle-{uuid.uuid4().hex}"
    before = len(service.log_text())
    response = client.post(f"{service.url}/classify", content=marker.encode(),
                           headers={"content-type": "application/vnd.bentoml+pickle"})
    assert response.status_code == 415
    written = new_log(service, before, "HTTP 415")
    assert "[WARNING]" in written and "refused request to /classify (HTTP 415)" in written, written
    assert "Traceback" not in written and "[ERROR]" not in written, written


def test_a_newline_in_the_input_file_location_cannot_forge_a_log_line(service, aicsd, client, file_root):
    marker = f"forge-{uuid.uuid4().hex}"
    _job, body = job_body(aicsd, file_root)
    body["InputFileLocation"] = f"{file_root}/input/{marker}.png\n{FORGED}\r\n{FORGED}"
    before = len(service.log_text())
    response = client.post(f"{service.url}/classify", json=body)
    assert response.status_code == 200 and response.json()["Status"] == "PipelineFailed"
    written = new_log(service, before, marker)
    assert marker in written
    assert not any(line.startswith(FORGED[:40]) for line in written.splitlines()), written
    assert f"{marker}.png\\n{FORGED[:40]}" in written


def test_a_10_mb_gateway_ip_is_refused_naming_the_field_in_one_short_log_line(service, aicsd, client, file_root):
    marker = f"flood-{uuid.uuid4().hex}"
    gateway = marker + "9" * 10_000_000
    job, body = job_body(aicsd, file_root, GatewayIP=gateway)
    before = len(service.log_text())
    response = client.post(f"{service.url}/classify", json=body)
    assert response.status_code == 400 and "GatewayIP" in response.text
    assert len(response.content) < 5000
    written = new_log(service, before, "GatewayIP")
    assert "GatewayIP" in written
    assert max(len(line) for line in written.splitlines()) < 2000
    assert aicsd.requests_for(job.job_id) == []


def test_a_long_input_path_is_cut_in_the_log_and_says_how_long_it_was(service, aicsd, client, file_root):
    marker = f"long-{uuid.uuid4().hex}"
    path = str(file_root / "input" / (marker + "x" * 3000 + ".png"))
    _job, body = job_body(aicsd, file_root, InputFileLocation=path)
    before = len(service.log_text())
    response = client.post(f"{service.url}/classify", json=body)
    assert response.status_code == 200 and response.json()["Status"] == "PipelineFailed"
    written = new_log(service, before, marker)
    assert marker in written and " characters)" in written
    assert max(len(line) for line in written.splitlines()) < 2000
