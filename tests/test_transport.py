"""aicsd.transport against real servers on loopback: kept-alive connections, a connection the
server closed, every request with a Content-Length, and hard edges: malformed, huge or trickling
answers, URLs it cannot send and TLS all end in one HttpFailure naming the cause."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import trustme

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


Script = Callable[[socket.socket], None]


class CannedServer:
    """A raw socket server for answers no HTTP library would write: on its one connection it reads
    each request, then sends the next canned bytes (or runs the next script on the socket)."""

    def __init__(self, answers: list[bytes | Script], close_after: bool = False) -> None:
        self.answers = answers
        self.close_after = close_after
        self.sent = 0
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
                    line = reader.readline()
                    if not line:
                        return
                    head += line
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                reader.read(length)
                try:
                    if callable(answer):
                        answer(connection)
                    else:
                        connection.sendall(answer)
                except OSError:  # the client gave up, as it should have
                    return
            if self.close_after:
                connection.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def canned() -> Iterator[Callable[..., CannedServer]]:
    started: list[CannedServer] = []

    def start(answers: list[bytes | Script], close_after: bool = False) -> CannedServer:
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
    (b"SMTP ready\r\n\r\n", "Expected HTTP/"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "closed after 5 of 10 body bytes"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n", "Invalid character in Content-Length"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "Invalid header token"),
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n", "in the middle of the answer's headers"),
    # Python's str.isdigit() and int() accept a superscript two: a hand parser trusting them breaks.
    (b"HTTP/1.1 2\xb20 OK\r\nContent-Length: 0\r\n\r\n", "Invalid status code"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nok", "Invalid character in Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n", "chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n", "chunk size"),
    # A space before the colon is how answers are smuggled past a lenient parser.
    (b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok", "Invalid header"),
])
def test_a_malformed_answer_is_a_failure_that_names_the_problem(canned, answer, problem):
    server = canned([answer], close_after=True)
    with HttpClient(timeout=5) as client, pytest.raises(HttpFailure, match=f"BadAnswer: .*{problem}"):
        client.request("POST", f"{server.url}/a", b"")


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/a b\r\nX-Injected: 1", "http://127.0.0.1:9/a\tb",
                                 "http://127.0.0.1:9/a\nb"])
def test_a_path_with_spaces_or_line_breaks_is_refused_before_anything_is_sent(url):
    with HttpClient(timeout=1) as client, pytest.raises(HttpFailure, match="control characters"):
        client.request("POST", url, b"")


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/api/v1/job/pipeline/j\u00e9/t",  # Latin-1, but not ASCII
    "http://127.0.0.1:9/api/v1/job/pipeline/j\u20ac/t",  # not even Latin-1
    "http://127.0.0.\u00b9:9/x",
])
def test_a_url_with_a_character_that_is_not_ascii_is_a_failure_naming_it(url):
    with HttpClient(timeout=1) as client, pytest.raises(HttpFailure, match="not ASCII .* percent-encode"):
        client.request("PUT", url, b"{}")


@pytest.mark.parametrize("url, problem", [
    ("http://127.0.0.1:0/x", "port 0"),
    ("http://user:pw@127.0.0.1:9/x", "credentials"),
    ("http://127.0.0.1:99999/x", "bad port"),
])
def test_a_url_the_client_will_not_send_to_is_a_failure_naming_why(url, problem):
    with HttpClient(timeout=1) as client, pytest.raises(HttpFailure, match=problem):
        client.request("PUT", url, b"{}")


def test_a_header_value_that_cannot_be_sent_is_a_failure_not_an_encoding_error(server):
    with HttpClient(timeout=5) as client:
        with pytest.raises(HttpFailure, match="cannot carry"):
            client.request("PUT", f"{server.url}/a", b"{}", {"X-Note": "\u20ac"})
        with pytest.raises(HttpFailure, match="cannot be sent"):
            client.request("PUT", f"{server.url}/a", b"{}", {"X-Note": "a\r\nX-Injected: 1"})
    assert server.requests == []


def test_an_announced_10_tb_answer_fails_before_any_of_it_is_read(canned):
    server = canned([b"HTTP/1.1 200 OK\r\nContent-Length: 10000000000000\r\n\r\n" + b"x" * 1000])
    with HttpClient(timeout=5) as client, pytest.raises(HttpFailure, match="announces 10000000000000 bytes"):
        client.request("PUT", f"{server.url}/a", b"{}")


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 300000000\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
])
def test_a_300_mb_answer_fails_at_the_size_limit_without_reading_it_all(canned, head):
    total = 300_000_000
    block = b"x" * 65536
    chunked = b"chunked" in head

    def stream(connection: socket.socket) -> None:
        connection.sendall(head)
        server.sent = 0
        while server.sent < total:
            connection.sendall(b"10000\r\n" + block + b"\r\n" if chunked else block)
            server.sent += len(block)

    server = canned([stream])
    with HttpClient(timeout=30, max_answer=1 << 20) as client, pytest.raises(HttpFailure, match="limit of 1048576"):
        client.request("PUT", f"{server.url}/a", b"{}")
    server.thread.join(10)
    assert server.sent < total // 10


def test_a_server_trickling_its_answer_fails_at_the_request_deadline(canned):
    def trickle(connection: socket.socket) -> None:
        connection.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        for _ in range(8):  # each byte comes well within the timeout; the whole answer never does
            time.sleep(1.5)
            connection.sendall(b"a")
        connection.sendall(b"\r\nContent-Length: 0\r\n\r\n")

    server = canned([trickle])
    with HttpClient(timeout=2.0) as client, pytest.raises(HttpFailure, match="Timeout"):
        client.request("PUT", f"{server.url}/a", b"{}")


def test_bytes_after_a_complete_answer_leave_the_connection_unused(canned):
    server = canned([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n"])
    with HttpClient(timeout=5) as client:
        assert client.request("PUT", f"{server.url}/a", b"{}").text == "ok"
        assert client._idle[("http", "127.0.0.1", int(server.url.rsplit(":", 1)[1]))] == []


class TlsServer:
    """The Recorder behind TLS, with a certificate for `name` from `ca`."""

    def __init__(self, ca: trustme.CA, name: str) -> None:
        self.recorder = Recorder()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(name).configure_cert(context)
        self.recorder.socket = context.wrap_socket(self.recorder.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.recorder.server_address[1]}"
        self.thread = threading.Thread(target=self.recorder.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.recorder.shutdown()
        self.recorder.server_close()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_server(ca) -> Iterator[TlsServer]:
    running = TlsServer(ca, "127.0.0.1")
    yield running
    running.close()


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def test_https_with_the_right_ca_is_answered_on_a_kept_alive_connection(ca, tls_server):
    with HttpClient(timeout=5, ssl_context=trusting(ca)) as client:
        answers = [client.request("PUT", f"{tls_server.url}/job/{n}", b"x") for n in range(3)]
    assert [a.json() for a in answers] == [{"echo": "x"}] * 3
    assert tls_server.recorder.connections == 1


def test_https_with_a_certificate_from_another_ca_fails_saying_so(tls_server):
    with HttpClient(timeout=5, ssl_context=trusting(trustme.CA())) as client:
        with pytest.raises(HttpFailure, match="TLS: the server's certificate was not accepted: .*issuer"):
            client.request("PUT", f"{tls_server.url}/a", b"x")
    assert tls_server.recorder.requests == []


def test_https_with_a_certificate_for_another_host_fails_saying_so(ca):
    running = TlsServer(ca, "job-repository.example")
    try:
        with HttpClient(timeout=5, ssl_context=trusting(ca)) as client:
            with pytest.raises(HttpFailure, match="TLS: the server's certificate was not accepted: .*mismatch, certificate is not valid for '127.0.0.1'"):
                client.request("PUT", f"{running.url}/a", b"x")
    finally:
        running.close()
    assert running.recorder.requests == []


@pytest.mark.parametrize("body, headers", [
    ("text, not bytes", {}),
    (b"{}", {"X-Count": 3}),
    (memoryview(b"{}"), {"Content-Type": None}),
])
def test_whatever_goes_wrong_inside_the_client_comes_out_as_http_failure(server, body, headers):
    with HttpClient(timeout=5) as client:
        with pytest.raises(HttpFailure, match="TypeError"):
            client.request("PUT", f"{server.url}/a", body, headers)
        assert client.request("PUT", f"{server.url}/b", b"1").status_code == 200  # still usable


def test_a_stale_connection_whose_server_is_gone_fails_once_naming_the_refusal():
    recorder = Recorder()
    thread = threading.Thread(target=recorder.serve_forever, daemon=True)
    thread.start()
    with HttpClient(timeout=5) as client:
        assert client.request("POST", f"{recorder.url}/a", b"1").status_code == 200
        recorder.shutdown()
        recorder.server_close()
        idle = next(iter(client._idle.values()))[0]
        idle.sock.shutdown(socket.SHUT_RDWR)  # as the server's exit would have closed it
        with pytest.raises(HttpFailure) as info:
            client.request("POST", f"{recorder.url}/b", b"2")
    assert str(info.value).startswith("ConnectionRefused: ")
