"""A stand-in for AiCSD's job repository and task launcher that enforces their handlers' rules.

AiCSD itself cannot run here. This server answers exactly as `AICSD_CONTRACT.md` says the real
handlers do, so a callback that AiCSD would reject is rejected here too:

    PUT  /api/v1/job/pipeline/<jobid>/<taskid>    job repository: the job update (callback one)
    POST /api/v1/pipelineStatus/<jobid>/<taskid>  task launcher: the status (callback two)
    GET  /api/v1/task/<taskid>                    task launcher: the task, with its PipelineId

PUT: no Content-Length -> 400 (the real handler reads exactly Content-Length bytes); unknown job
or task mismatch -> 400; a body that is not JSON of the right types -> 500 (field names match
case-insensitively, unknown fields are ignored, null leaves a field empty as Go's encoding/json
does); `Status` not exactly PipelineComplete/PipelineFailed -> 400; else 200.
GET task: the task as the Go handler marshals it (Go field names), 500 for an unknown task id.
POST: unknown job or task mismatch -> 400; body (trimmed, any case) not a status -> 400; not
equal to the status stored by a successful PUT -> 400; else 200, after checking that every listed
output file exists on disk (a missing one ends the job in error) and doing what AiCSD's file
sender does with each: open it as an image (JPEG, PNG, GIF, TIFF, BMP) and convert it to a JPEG
named by replacing the file's `Extension` with ".jpeg" once (Go's `strings.Replace(name, ext,
".jpeg", 1)`). At the first file that does not open as an image it answers 500 and the job ends
in error; the names of the viewable copies made are recorded in `JobState.viewable`.
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger("aicsd_standin")

STATUSES = ("PipelineComplete", "PipelineFailed")
_PUT_PATH = re.compile(r"^/api/v1/job/pipeline/([^/]+)/([^/]+)/?$")
_POST_PATH = re.compile(r"^/api/v1/pipelineStatus/([^/]+)/([^/]+)/?$")
_TASK_PATH = re.compile(r"^/api/v1/task/([^/]+)$")
DEFAULT_PIPELINE = "ovms/efficientnet-lite0"
_FILE_STRING_FIELDS = ("dirname", "name", "extension", "status", "owner", "archivename", "viewable", "hostname")


class ContractError(Exception):
    """The body breaks the handler's JSON structure (the real handler answers 500)."""


@dataclass(frozen=True)
class JobUrls:
    job_id: str
    task_id: str
    job_update_url: str
    pipeline_status_url: str


@dataclass(frozen=True)
class Recorded:
    """One request as received, and what the stand-in answered."""

    seq: int
    method: str
    path: str
    job_id: str
    headers: dict[str, str]
    body: bytes
    json: Any
    status_code: int
    answer: str
    at: float


@dataclass
class JobState:
    job_id: str
    task_id: str
    stored_status: str = ""
    qc_flags: str = ""
    results: str = ""
    output_files: list[dict[str, Any]] = field(default_factory=list)
    puts: int = 0
    statuses: int = 0
    missing_files: list[str] = field(default_factory=list)
    published_results: list[str] = field(default_factory=list)
    viewable: list[str] = field(default_factory=list)  # the file sender's JPEG copies, by name
    file_sender_error: str | None = None
    ended: str | None = None
    ended_at: float | None = None  # wall-clock time of the accepted status


@dataclass
class _Fault:
    status_code: int
    remaining: int | None


def _lower_keys(obj: dict[str, Any]) -> dict[str, Any]:
    return {str(k).lower(): v for k, v in obj.items()}


def _string(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ContractError(f"{where}{key}: cannot unmarshal {type(value).__name__} into string")
    return value


VIEWABLE_FORMATS = ("JPEG", "PNG", "GIF", "TIFF", "BMP")  # what the file sender's imgconv opens


def viewable_name(name: str, extension: str) -> str:
    """The name of the file sender's JPEG copy: `Extension` replaced by ".jpeg", once, as Go does."""
    return name.replace(extension, ".jpeg", 1)


def to_viewable_jpeg(path: Path) -> bytes:
    """The file as a JPEG, as AiCSD's file sender makes it; raises if it is not an image it opens."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path, formats=VIEWABLE_FORMATS) as image:
            image.load()
            out = io.BytesIO()
            image.convert("RGB").save(out, "JPEG")
    return out.getvalue()


def parse_job_update(raw: bytes) -> dict[str, Any]:
    """The job update as the job repository's handler decodes it; `ContractError` when it cannot."""
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ContractError(f"invalid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ContractError("body is not a JSON object")
    body = _lower_keys(body)
    parsed: dict[str, Any] = {k: _string(body, k, "") for k in ("status", "qcflags", "results")}
    files = body.get("outputfiles")
    if files is not None and not isinstance(files, list):
        raise ContractError(f"OutputFiles: cannot unmarshal {type(files).__name__} into []OutputFile")
    parsed["outputfiles"] = []
    for index, item in enumerate(files or []):
        if not isinstance(item, dict):
            raise ContractError(f"OutputFiles[{index}]: cannot unmarshal {type(item).__name__} into OutputFile")
        item = _lower_keys(item)
        entry = {k: _string(item, k, f"OutputFiles[{index}].") for k in _FILE_STRING_FIELDS}
        details = item.get("errordetails")
        if details is not None:
            if not isinstance(details, dict):
                raise ContractError(
                    f"OutputFiles[{index}].ErrorDetails: cannot unmarshal {type(details).__name__} into UserFacingError"
                )
            details = _lower_keys(details)
            details = {k: _string(details, k, f"OutputFiles[{index}].ErrorDetails.") for k in ("owner", "error")}
        entry["errordetails"] = details
        parsed["outputfiles"].append(entry)
    return parsed


class AicsdStandIn:
    """Job repository + task launcher in one loopback HTTP server, started as a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, auto_register: bool = False) -> None:
        if not host.startswith("127."):
            raise ValueError("the stand-in binds to loopback addresses only")
        self.host = host
        self.port = port
        # Load tests: a job update for an unknown job registers it, an unknown task runs DEFAULT_PIPELINE.
        self.auto_register = auto_register
        self._jobs: dict[str, JobState] = {}
        self._ended_count = 0  # jobs with an ended_at
        self._tasks: dict[str, str] = {}
        self._requests: list[Recorded] = []
        self._by_job: dict[str, list[Recorded]] = {}
        self._faults: dict[tuple[str, str], _Fault] = {}
        self._changed = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- life cycle -------------------------------------------------------------------------

    def __enter__(self) -> AicsdStandIn:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        standin = self

        class Handler(_Handler):
            owner = standin

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="aicsd-standin", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "stand-in not started"
        return f"http://{self.host}:{self._server.server_address[1]}"

    # --- test API ---------------------------------------------------------------------------

    def register(self, job_id: str, task_id: str, pipeline: str = DEFAULT_PIPELINE) -> JobUrls:
        """A job of a task whose pipeline is `pipeline` (the PipelineId, e.g. `ovms/cell-counter`)."""
        with self._changed:
            self._jobs[job_id] = JobState(job_id, task_id)
            self._tasks[task_id] = pipeline
        return JobUrls(
            job_id,
            task_id,
            f"{self.base_url}/api/v1/job/pipeline/{job_id}/{task_id}",
            f"{self.base_url}/api/v1/pipelineStatus/{job_id}/{task_id}",
        )

    def new_job(self, pipeline: str = DEFAULT_PIPELINE) -> JobUrls:
        """A job of a new task whose pipeline is `pipeline`."""
        return self.register(str(uuid.uuid4()), str(uuid.uuid4()), pipeline)

    def task_lookups(self, task_id: str) -> list[Recorded]:
        """The GET requests for one task, in order."""
        with self._changed:
            return list(self._by_job.get(f"task:{task_id}", ()))

    def fail_next(self, job_id: str, *, kind: str, status_code: int = 500, times: int | None = 1) -> None:
        """Answer the next `times` requests of `kind` ("put" or "status" for the job id, "task" for
        the task id given as `job_id`) with `status_code`; `times=None` means every one."""
        if kind not in ("put", "status", "task"):
            raise ValueError("kind is 'put', 'status' or 'task'")
        with self._changed:
            self._faults[(job_id, kind)] = _Fault(status_code, times)

    def heal(self, key: str) -> None:
        """Stop injecting faults for a job id (or a task id)."""
        with self._changed:
            for kind in ("put", "status", "task"):
                self._faults.pop((key, kind), None)

    def requests_for(self, job_id: str) -> list[Recorded]:
        with self._changed:
            return list(self._by_job.get(job_id, ()))

    def all_requests(self) -> list[Recorded]:
        with self._changed:
            return list(self._requests)

    def job(self, job_id: str) -> JobState:
        with self._changed:
            return replace(self._jobs[job_id])

    def wait_for_status(self, job_id: str, timeout: float = 30) -> JobState:
        """The job's state once a status POST has been accepted; TimeoutError says what arrived."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                state = self._jobs.get(job_id)
                if state is not None and state.ended is not None:
                    return replace(state)
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(r.method, r.status_code) for r in self._by_job.get(job_id, ())]
                    raise TimeoutError(f"no accepted status for job {job_id} after {timeout}s; requests: {seen}")
                self._changed.wait(left)

    def wait_for_requests(self, count: int, timeout: float = 30) -> list[Recorded]:
        """All requests once at least `count` have arrived."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._requests) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self._requests)} of {count} requests after {timeout}s")
                self._changed.wait(left)
            return list(self._requests)

    # --- the handlers -------------------------------------------------------------------------

    def _fault(self, job_id: str, kind: str) -> int | None:
        fault = self._faults.get((job_id, kind))
        if fault is None:
            return None
        if fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining <= 0:
                del self._faults[(job_id, kind)]
        return fault.status_code

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes | None) -> tuple[int, str, str]:
        """Answer one request; returns (status code, answer text, job id) and records it."""
        with self._changed:
            code, answer, job_id, parsed = self._answer(method, path, headers, body)
            record = Recorded(len(self._requests) + 1, method, path, job_id, headers, body or b"", parsed, code, answer,
                              time.monotonic())
            self._requests.append(record)
            self._by_job.setdefault(job_id, []).append(record)
            self._changed.notify_all()
        log.info("%s %s -> %d %s", method, path, code, answer)
        return code, answer, job_id

    def _answer(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None
    ) -> tuple[int, str, str, Any]:
        if method == "GET" and path == "/_ended":
            ended = {j: state.ended_at for j, state in self._jobs.items() if state.ended_at is not None}
            return 200, json.dumps(ended), "", None
        if method == "GET" and path == "/_ended_count":  # cheap to poll while thousands of jobs run
            return 200, str(self._ended_count), "", None
        task_route = _TASK_PATH.match(path) if method == "GET" else None
        if task_route is not None:
            return (*self._task(task_route.group(1)), f"task:{task_route.group(1)}", None)
        route = _PUT_PATH.match(path) if method == "PUT" else _POST_PATH.match(path) if method == "POST" else None
        if route is None:
            return 404, "not found", "", None
        job_id, task_id = route.group(1), route.group(2)
        kind = "put" if method == "PUT" else "status"
        parsed: Any = None
        if method == "PUT" and body is not None:
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
        injected = self._fault(job_id, kind)
        if injected is not None:
            return injected, "injected fault", job_id, parsed
        if body is None:
            return 400, "request body has no Content-Length", job_id, parsed
        state = self._jobs.get(job_id)
        if state is None and self.auto_register and method == "PUT":
            state = self._jobs[job_id] = JobState(job_id, task_id)
        if state is None:
            return 400, f"job {job_id} not found", job_id, parsed
        if state.task_id != task_id:
            return 400, f"task {task_id} does not match job's task {state.task_id}", job_id, parsed
        if method == "PUT":
            return (*self._job_update(state, body), job_id, parsed)
        return (*self._status(state, body), job_id, parsed)

    def _task(self, task_id: str) -> tuple[int, str]:
        injected = self._fault(task_id, "task")
        if injected is not None:
            return injected, "injected fault"
        pipeline = self._tasks.get(task_id)
        if pipeline is None and self.auto_register:
            pipeline = DEFAULT_PIPELINE
        if pipeline is None:
            # The task launcher answers 500 for an unknown id, as for a storage error.
            return 500, f"failed to get task {task_id}"
        task = {
            "Id": task_id,
            "Description": f"task of {pipeline}",
            "JobSelector": "",
            "PipelineId": pipeline,
            "ResultFileFolder": "/tmp/files/output",
            "ModelParameters": {"Brightness": "0"},
            "LastUpdated": time.time_ns(),
        }
        return 200, json.dumps(task)

    def _job_update(self, state: JobState, body: bytes) -> tuple[int, str]:
        try:
            update = parse_job_update(body)
        except ContractError as exc:
            return 500, f"failed to unmarshal job update: {exc}"
        if update["status"] not in STATUSES:
            return 400, f"invalid pipeline status {update['status']!r}"
        state.stored_status = update["status"]
        state.qc_flags = update["qcflags"]
        state.results = update["results"]
        state.output_files = update["outputfiles"]
        state.puts += 1
        return 200, ""

    def _status(self, state: JobState, body: bytes) -> tuple[int, str]:
        status = body.decode("utf-8", "replace").strip()
        canonical = next((s for s in STATUSES if s.lower() == status.lower()), None)
        if canonical is None:
            return 400, f"invalid status {status!r}"
        if canonical != state.stored_status:
            return 400, f"status {canonical} does not match the job's pipeline status {state.stored_status!r}"
        state.statuses += 1
        state.missing_files = [
            str(Path(f["dirname"]) / f["name"])
            for f in state.output_files
            if not (Path(f["dirname"]) / f["name"]).is_file()
        ]
        if state.results:
            state.published_results.append(state.results)
        if state.missing_files:
            state.ended = "error"
        else:
            state.ended = "complete" if canonical == "PipelineComplete" else "failed"
            problem = self._send_files(state)
            if problem is not None:
                state.ended = "error"
                state.file_sender_error = problem
                self._mark_ended(state)
                return 500, problem
        self._mark_ended(state)
        return 200, ""

    def _mark_ended(self, state: JobState) -> None:
        if state.ended_at is None:
            self._ended_count += 1
        state.ended_at = time.time()

    @staticmethod
    def _send_files(state: JobState) -> str | None:
        """The file sender: a viewable JPEG of every listed file, stopping at the first failure."""
        state.viewable = []
        for listed in state.output_files:
            path = Path(listed["dirname"]) / listed["name"]
            try:
                to_viewable_jpeg(path)
            except Exception as exc:
                return f"failed to convert {path} to a viewable image: {exc}"
            state.viewable.append(viewable_name(listed["name"], listed["extension"]))
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Head and body leave in one write, as Go's net/http sends them: two small writes would stall
    # on Nagle's algorithm against the client's delayed acknowledgement (about 40 ms a request).
    wbufsize = 1 << 16
    owner: AicsdStandIn

    def _serve(self) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        length = headers.get("content-length")
        body: bytes | None
        chunked = length is None and "chunked" in headers.get("transfer-encoding", "").lower()
        # Read a chunked body off the wire whatever the handler makes of it, as Go's net/http does
        # after a handler returns: answering while the client still writes resets its connection.
        sent = self._read_chunked() if chunked else None
        if length is not None:
            body = self.rfile.read(int(length))
        elif chunked and self.command == "POST":
            body = sent  # the task launcher reads the body whole, chunked or not
        elif self.command == "GET":
            body = b""  # a GET carries no body
        else:
            body = None
            # The job repository reads exactly Content-Length bytes: answer and drop the connection.
            self.close_connection = True
        code, answer, _ = self.owner.handle(self.command, self.path, headers, body)
        payload = answer.encode()
        self.send_response(code)
        is_task = self.command == "GET" and _TASK_PATH.match(self.path) is not None and code == 200
        self.send_header("Content-Type", "application/json" if is_task else "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)

    def _read_chunked(self) -> bytes:
        parts = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline()

    do_PUT = _serve
    do_POST = _serve
    do_GET = _serve

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)


def main(argv: list[str] | None = None) -> int:
    """Run the stand-in on its own (as a callback sink for load tests): jobs register themselves."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(prog="python -m devtools.aicsd_standin", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with AicsdStandIn(args.host, args.port, auto_register=True) as standin:
        print(standin.base_url, flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
