"""Jobs that come again (AICSD_CONTRACT.md §6): a real broker, the real bridge process, the AiCSD
stand-in, and the real service or a small loopback HTTP server standing in for it where the real
one cannot produce the case.

AiCSD publishes a job again only when it has not heard its outcome, so a job the bridge had
finished or given up on is taken again; only a redelivery of a job still queued or in flight is
collapsed. The bridge reports `PipelineFailed` itself only for a job the service never received
(or refused); a job the service answered for, even with a 5xx, is the service's to report.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bridge.spool import Spool
from devtools.servers import Bridge, Broker, free_port, publish

from .test_bridge import job_payload

pytestmark = pytest.mark.integration


class StandInService:
    """A loopback HTTP server standing in for the service, once `gate` is open: `POST /classify`
    answers `answer(job)` (by default `status` with `body`); `POST /classify_batch`, when `batch`
    is on, answers 200 with `answer(job)` as `{"StatusCode", "Body"}` per job, or `batch_reply`
    (status, raw body) when set, or cut off halfway while `cut_batches` > 0. Any other POST answers 404 at once, as a service without that API.
    `requests` holds every job the service got (a batch's one by one), `posts` every POST as
    (path, its parsed body)."""

    def __init__(self, status: int, body: dict, *, batch: bool = False, port: int = 0) -> None:
        self.status = status
        self.body = body
        self.batch = batch
        self.answer: Callable[[dict], tuple[int, dict]] = lambda job: (self.status, self.body)
        self.batch_reply: tuple[int, bytes] | None = None
        self.cut_batches = 0  # batch answers still to cut off halfway (the connection then drops)
        self.gate = threading.Event()
        self.gate.set()
        self.requests: list[dict] = []
        self.posts: list[tuple[str, object]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                sent = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.posts.append((self.path, sent))
                if self.path == "/classify":
                    owner.requests.append(sent)
                    owner.gate.wait(30)
                    status, body = owner.answer(sent)
                    self.reply(status, json.dumps(body).encode())
                elif self.path == "/classify_batch" and owner.batch:
                    owner.requests.extend(sent)
                    owner.gate.wait(30)
                    if owner.batch_reply is not None:
                        self.reply(*owner.batch_reply)
                        return
                    items = [dict(zip(("StatusCode", "Body"), owner.answer(job), strict=True)) for job in sent]
                    answer = json.dumps(items).encode()
                    if owner.cut_batches > 0:  # the connection drops halfway through the answer
                        owner.cut_batches -= 1
                        self.reply(200, answer, cut_at=len(answer) // 2)
                        return
                    self.reply(200, answer)
                else:
                    self.reply(404, b'{"detail":"Not Found"}')

            def reply(self, status: int, body: bytes, cut_at: int | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body if cut_at is None else body[:cut_at])
                if cut_at is not None:
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/classify"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.posts]

    def __enter__(self) -> StandInService:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


class PortForward:
    """Listens on a loopback port and relays every connection to another loopback port."""

    def __init__(self, port: int, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(0.2)
        self.stopping = threading.Event()
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                thread = threading.Thread(target=self._pump, args=(source, sink), daemon=True)
                thread.start()
                self.threads.append(thread)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.stopping.set()
        self.listener.close()
        for end in self.sockets:
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self.threads:
            thread.join(10)
        for end in self.sockets:
            end.close()


def start_bridge(
    started: list[Bridge], folder: Path, service_url: str, broker: Broker, **bridge_keys
) -> Bridge:
    bridge = Bridge(folder, service_url, broker.port, client_id=f"bridge-{uuid.uuid4().hex[:8]}",
                    extra={"bridge": bridge_keys})
    started.append(bridge)
    return bridge.start()


def wait_for_requests(aicsd, job_id: str, count: int, timeout: float = 60) -> list[tuple[str, int]]:
    deadline = time.monotonic() + timeout
    while True:
        seen = [(r.method, r.status_code) for r in aicsd.requests_for(job_id)]
        if len(seen) >= count or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def test_job_failed_by_the_bridge_and_published_again_is_run_and_reported_with_its_real_outcome(
    bridges, broker, service, aicsd, file_root, image, tmp_path
):
    port = free_port()  # the service's address, where nothing listens at first
    bridge = start_bridge(bridges, tmp_path / "bridge", f"http://127.0.0.1:{port}/classify", broker, max_age=2)
    job, payload = job_payload(aicsd, image, file_root / "output")
    publish(broker.port, [json.dumps(payload)])
    state = aicsd.wait_for_status(job.job_id, timeout=30)
    assert state.stored_status == "PipelineFailed" and "service unreachable" in state.results
    bridge.wait_for_log("failed=1 dead_lettered=1")
    relay = PortForward(port, int(service.url.rsplit(":", 1)[1]))  # the service is up now
    try:
        publish(broker.port, [json.dumps(payload)])  # AiCSD's RetryWindow: the same job again
        bridge.wait_for_log(f"job={job.job_id} task={job.task_id} published again after the bridge had finished it")
        seen = wait_for_requests(aicsd, job.job_id, 4)
    finally:
        relay.close()
    assert seen == [("PUT", 200), ("POST", 200), ("PUT", 200), ("POST", 200)]
    assert aicsd.job(job.job_id).stored_status == "PipelineComplete"
    bridge.wait_for_log("done=1 failed=0")
    history = Spool(bridge.spool).history((job.job_id, job.task_id))
    assert [state for state, _ in history] == ["failed"] and "bridge.max_age" in history[0][1]


def test_job_the_service_answers_502_for_until_max_age_is_given_up_without_a_callback_from_the_bridge(
    bridges, broker, aicsd, file_root, image, tmp_path
):
    with StandInService(502, {"detail": "AiCSD unreachable"}) as stand_in:
        bridge = start_bridge(bridges, tmp_path / "bridge", stand_in.url, broker, max_age=2)
        job, payload = job_payload(aicsd, image, file_root / "output")
        publish(broker.port, [json.dumps(payload)])
        bridge.wait_for_log(f"job={job.job_id} task={job.task_id} giving up quietly", timeout=30)
        bridge.wait_for_log("failed=1 dead_lettered=1")
        assert len(stand_in.requests) >= 1
    time.sleep(1)  # a callback the bridge sent would have arrived by now
    assert aicsd.requests_for(job.job_id) == []
    reasons = [reason for *_, reason in Spool(bridge.spool).dead_letters()]
    assert len(reasons) == 1 and "service answered 502" in reasons[0] and "the service had the job" in reasons[0]


def test_job_redelivered_while_still_in_flight_is_collapsed_into_one_request(
    bridges, broker, aicsd, file_root, image, tmp_path
):
    with StandInService(200, {"Status": "PipelineComplete"}) as stand_in:
        stand_in.gate.clear()  # the service holds the first request
        bridge = start_bridge(bridges, tmp_path / "bridge", stand_in.url, broker)
        job, payload = job_payload(aicsd, image, file_root / "output")
        publish(broker.port, [json.dumps(payload)])
        bridge.wait_for_log("in_flight=1")
        publish(broker.port, [json.dumps(payload)])
        bridge.wait_for_log(f"job={job.job_id} task={job.task_id} received again while still queued or in flight")
        stand_in.gate.set()
        bridge.wait_for_log("done=1")
        time.sleep(0.5)
        assert len(stand_in.requests) == 1
