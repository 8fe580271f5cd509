"""pipeline.http_client against a real HTTP server on loopback: kept-alive connections, a
connection the server closed, failures named in words, and every request with a Content-Length."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from aicsd.transport import HttpClient, HttpFailure


class Recorder(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.connections = 0
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.close_after_answer = False
        self.delay = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Recorder

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def _answer(self) -> None:
        length = self.headers.get("Content-Length")
        body = self.rfile.read(int(length)) if length is not None else b""
        self.server.requests.append((self.command, self.path, dict(self.headers), body))
        time.sleep(self.server.delay)
        reply = b'{"echo":"' + body + b'"}' if self.path != "/missing" else b"no such thing"
        self.send_response(404 if self.path == "/missing" else 200)
        self.send_header("Content-Length", str(len(reply)))
        if self.server.close_after_answer:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(reply)

    do_PUT = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Recorder]:
    recorder = Recorder()
    thread = threading.Thread(target=recorder.serve_forever, daemon=True)
    thread.start()
    yield recorder
    recorder.shutdown()
    recorder.server_close()


def test_requests_to_one_origin_reuse_one_kept_alive_connection(server):
    with HttpClient(timeout=5) as client:
        answers = [client.request("PUT", f"{server.url}/job/{n}", b"x", {"Content-Type": "text/plain"})
                   for n in range(5)]
    assert [a.status_code for a in answers] == [200] * 5
    assert server.connections == 1
    assert [path for _, path, _, _ in server.requests] == [f"/job/{n}" for n in range(5)]


def test_every_request_carries_its_content_length_even_when_empty(server):
    with HttpClient(timeout=5) as client:
        client.request("POST", f"{server.url}/status?x=1", b"PipelineComplete")
        client.request("POST", f"{server.url}/empty")
    (_, path, first, body), (_, _, second, empty) = server.requests
    assert path == "/status?x=1" and body == b"PipelineComplete" and first["Content-Length"] == "16"
    assert second["Content-Length"] == "0" and empty == b""


def test_a_connection_the_server_closed_is_replaced_without_failing_the_request(server):
    with HttpClient(timeout=5) as client:
        assert client.request("POST", f"{server.url}/a", b"1").status_code == 200
        # Close the kept-alive socket behind the client's back, as a server's idle timeout would.
        idle = next(iter(client._idle.values()))[0]
        idle.sock.shutdown(socket.SHUT_RDWR)
        answer = client.request("POST", f"{server.url}/b", b"2")
    assert answer.status_code == 200 and answer.json() == {"echo": "2"}
    assert server.connections == 2


def test_an_answer_with_connection_close_is_read_whole_and_the_connection_not_kept(server):
    server.close_after_answer = True
    with HttpClient(timeout=5) as client:
        first = client.request("POST", f"{server.url}/a", b"1")
        second = client.request("POST", f"{server.url}/b", b"2")
        assert client._idle[("http", "127.0.0.1", server.server_address[1])] == []
    assert first.json() == {"echo": "1"} and second.json() == {"echo": "2"}
    assert server.connections == 2


def test_an_error_status_is_an_answer_not_a_failure(server):
    with HttpClient(timeout=5) as client:
        answer = client.request("POST", f"{server.url}/missing", b"")
    assert answer.status_code == 404 and answer.reason_phrase == "Not Found" and answer.text == "no such thing"
    assert answer.headers["content-length"] == "13"


def test_a_refused_connection_is_a_failure_that_says_so():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with HttpClient(timeout=5) as client, pytest.raises(HttpFailure, match="ConnectionRefused"):
        client.request("PUT", f"http://127.0.0.1:{port}/job", b"{}")


def test_a_server_that_does_not_answer_in_time_is_a_timeout_failure(server):
    server.delay = 1.0
    with HttpClient(timeout=0.2) as client, pytest.raises(HttpFailure, match="Timeout"):
        client.request("PUT", f"{server.url}/slow", b"{}")


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "http:///nohost", "http://127.0.0.1:notaport/x"])
def test_a_url_that_is_not_http_is_a_failure_naming_it(url):
    with HttpClient(timeout=1) as client, pytest.raises(HttpFailure, match="URL"):
        client.request("POST", url, b"")


def test_threads_sharing_one_client_each_get_their_own_answers(server):
    with HttpClient(timeout=5, max_idle=4) as client:
        results: dict[int, object] = {}

        def send(n: int) -> None:
            results[n] = client.request("POST", f"{server.url}/t", str(n).encode()).json()

        threads = [threading.Thread(target=send, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert results == {n: {"echo": str(n)} for n in range(16)}
    assert server.connections <= 16


class CannedServer:
    """Answers every request on a connection with the next canned bytes, then closes when told."""

    def __init__(self, answers: list[bytes], close_after: bool = False) -> None:
        self.answers = answers
        self.close_after = close_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        connection, _ = self.listener.accept()
        with connection, connection.makefile("rb") as reader:
            for answer in self.answers:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    head += reader.readline()
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                reader.read(length)
                connection.sendall(answer)
            if self.close_after:
                connection.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def canned() -> Iterator[Callable[..., CannedServer]]:
    started: list[CannedServer] = []

    def start(answers: list[bytes], close_after: bool = False) -> CannedServer:
        started.append(CannedServer(answers, close_after))
        return started[-1]

    yield start
    for server in started:
        server.close()


def test_a_chunked_answer_and_an_interim_answer_are_read_whole_on_a_kept_connection(canned):
    server = canned([
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nok",
    ])
    with HttpClient(timeout=5) as client:
        first = client.request("PUT", f"{server.url}/a", b"{}")
        second = client.request("POST", f"{server.url}/b", b"x")
        third = client.request("POST", f"{server.url}/c", b"y")
    assert (first.status_code, first.text) == (200, "hello world")
    assert (second.status_code, second.body) == (204, b"")
    assert third.text == "ok" and third.headers["set-cookie"] == "a=1, b=2"


def test_an_answer_without_length_is_read_until_the_server_closes(canned):
    server = canned([b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it"], close_after=True)
    with HttpClient(timeout=5) as client:
        answer = client.request("POST", f"{server.url}/a", b"")
        assert client._idle[("http", "127.0.0.1", int(server.url.rsplit(":", 1)[1]))] == []
    assert answer.text == "all of it"


@pytest.mark.parametrize("answer, problem", [
    (b"SMTP ready\r\n\r\n", "not an HTTP/1.x status line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "closed after 5 of 10 body bytes"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header line"),
])
def test_a_malformed_answer_is_a_failure_that_names_the_problem(canned, answer, problem):
    server = canned([answer], close_after=True)
    with HttpClient(timeout=5) as client, pytest.raises(HttpFailure, match=f"BadAnswer: .*{problem}"):
        client.request("POST", f"{server.url}/a", b"")


def test_a_path_with_spaces_or_line_breaks_is_refused_before_anything_is_sent():
    with HttpClient(timeout=1) as client, pytest.raises(HttpFailure, match="control characters"):
        client.request("POST", "http://127.0.0.1:9/a b\r\nX-Injected: 1", b"")
