"""Where the service's interpreter time goes under load: py-spy on the BentoML worker.

On a 2-core gateway the service is bound by Python's interpreter lock as much as by the cores,
so the profile samples only the thread holding the lock (`py-spy record --gil`). The samples
are sorted into the parts of a job that can be acted on: BentoML's and uvicorn's HTTP
handling, the pipeline (decode, preprocessing, inference, results) and the AiCSD callbacks.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .measure import process_tree

__all__ = ["Profile", "bucket_samples", "find_worker", "finish", "python_threads", "record"]

# (bucket, prefix of a frame's function name): a sample goes to the first bucket one of its frames
# matches, so the more specific buckets come first; a sample matching none is HTTP handling.
BUCKETS = (
    ("AiCSD callbacks (helper.AicsdClient)", "AicsdClient."),
    ("pipeline: image decode and resize", "load_rgb"),
    ("pipeline: inference (OpenVINO call)", "CompiledModel.infer"),
    ("pipeline: rest (paths, results, files)", "PipelineRunner."),
    ("service.py and job parsing", "AicsdPipeline."),
)
HTTP_BUCKET = "BentoML + uvicorn HTTP handling"


@dataclass
class Profile:
    """Share of the sampled interpreter time per bucket, and the busiest functions."""

    samples: int
    buckets: dict[str, float]
    top_self: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def asdict(self) -> dict[str, object]:
        return {"samples": self.samples, "buckets": self.buckets, "top_self": self.top_self, "error": self.error}

    def text(self) -> str:
        if self.error:
            return f"profile unavailable: {self.error}"
        lines = [f"interpreter time of the service worker under load ({self.samples} samples, py-spy --gil):"]
        lines += [f"  {share:5.1f}%  {name}" for name, share in self.buckets.items()]
        lines.append("  busiest functions (own time):")
        lines += [f"  {share:5.1f}%  {name}" for name, share in self.top_self]
        return "\n".join(lines)


def find_worker(server_pid: int) -> int | None:
    """The BentoML worker process (the one running the service) under `bentoml serve`."""
    for pid in process_tree(server_pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"_bentoml_impl.worker.service" in command:
            return pid
    return None


def _frame_name(frame: str) -> str:
    """'function (path/file.py:12)' -> 'function (file.py)'."""
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.rsplit(':', 1)[0]).name})" if where else name


def bucket_samples(raw: str, top: int = 12) -> Profile:
    """Sort py-spy's raw (collapsed-stack) output into the buckets."""
    shares: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[_frame_name(frames[-1])] += n
        names = [f.partition(" (")[0] for f in reversed(frames)]
        bucket = next((b for b, prefix in BUCKETS for name in names if name.startswith(prefix)), HTTP_BUCKET)
        shares[bucket] += n
    if not total:
        return Profile(0, {}, error="py-spy recorded no samples")
    order = [b for b, _ in BUCKETS] + [HTTP_BUCKET]
    buckets = {b: round(100 * shares[b] / total, 1) for b in order}
    return Profile(total, buckets, [(name, round(100 * n / total, 1)) for name, n in own.most_common(top)])


def _py_spy() -> str | None:
    return shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")


_THREAD_LINE = re.compile(r'^Thread (\d+) \((?:active|idle)[^)]*\): "(.*)"$', re.MULTILINE)


def python_threads(pid: int) -> dict[int, str] | str:
    """The interpreter's threads of `pid` by native thread id, with their names (py-spy dump,
    without stopping the process), or why they cannot be told."""
    spy = _py_spy()
    if spy is None:
        return "py-spy is not installed (pip install -r requirements-dev.txt)"
    try:
        done = subprocess.run([spy, "dump", "--nonblocking", "--pid", str(pid)], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"py-spy dump failed: {exc}"
    found = {int(tid): name for tid, name in _THREAD_LINE.findall(done.stdout)}
    if done.returncode != 0 or not found:
        message = (done.stderr.strip().splitlines() or ["no thread listed"])[-1]
        return f"py-spy dump failed ({done.returncode}): {message}"
    return found


def record(pid: int, seconds: float, raw_path: Path) -> subprocess.Popen[bytes] | str:
    """Start py-spy on `pid` for `seconds`; the running recorder, or why it cannot run."""
    spy = _py_spy()
    if spy is None:
        return "py-spy is not installed (pip install -r requirements-dev.txt)"
    command = [spy, "record", "--gil", "--nonblocking", "-p", str(pid), "-d", str(max(1, round(seconds))),
               "-r", "200", "-f", "raw", "-o", str(raw_path)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(recorder: subprocess.Popen[bytes] | str, raw_path: Path) -> Profile:
    """Wait for the recorder and bucket what it wrote."""
    if isinstance(recorder, str):
        return Profile(0, {}, error=recorder)
    _, err = recorder.communicate(timeout=120)
    if recorder.returncode != 0 or not raw_path.is_file():
        message = err.decode(errors="replace").strip().splitlines()
        return Profile(0, {}, error=f"py-spy failed ({recorder.returncode}): {message[-1] if message else ''}")
    return bucket_samples(raw_path.read_text())
