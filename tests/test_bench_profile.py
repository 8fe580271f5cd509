"""The benchmark's profile buckets: py-spy's collapsed stacks sorted into the parts of a job."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.measure import ThreadSplit, thread_cpu_s
from bench.profile import HTTP_BUCKET, bucket_samples, python_threads

RAW = "\n".join([
    "run (threading.py:1);classify (service.py:120);_send (helper.py:180);exchange (http_client.py:90) 30",
    "run (threading.py:1);classify (service.py:120);run (runner.py:50);load_rgb (images.py:232);decode (x.py:1) 20",
    "run (threading.py:1);classify (service.py:120);run (runner.py:50);infer (model_repository.py:139) 25",
    "main (service.py:1);send (httptools_impl.py:400) 25",
    "not a sample line",
]).replace("classify (", "AicsdPipeline.classify (").replace("_send (", "AicsdClient._send (") \
  .replace("run (runner", "PipelineRunner.run (runner").replace("infer (model", "CompiledModel.infer (model")


def test_samples_go_to_the_most_specific_part_of_the_job_and_the_rest_is_http_handling():
    profile = bucket_samples(RAW)
    assert profile.samples == 100 and profile.error is None
    assert profile.buckets["AiCSD callbacks (helper.AicsdClient)"] == 30.0
    assert profile.buckets["pipeline: image decode and resize"] == 20.0
    assert profile.buckets["pipeline: inference (OpenVINO call)"] == 25.0
    assert profile.buckets["service.py and job parsing"] == 0.0
    assert profile.buckets[HTTP_BUCKET] == 25.0
    assert profile.top_self[0] == ("exchange (http_client.py)", 30.0)


def test_no_samples_is_reported_as_an_error_not_as_empty_shares():
    profile = bucket_samples("")
    assert profile.samples == 0 and profile.error == "py-spy recorded no samples"
    assert profile.text() == "profile unavailable: py-spy recorded no samples"


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_thread_split_counts_unnamed_threads_as_inference_the_main_thread_as_the_event_loop():
    done, burnt = threading.Event(), [threading.Event(), threading.Event()]

    def work(seconds: float, finished: threading.Event) -> None:
        _burn(seconds)
        finished.set()
        done.wait(30)

    burner = threading.Thread(target=work, args=(0.3, burnt[0]), name="worker")
    native = threading.Thread(target=work, args=(0.2, burnt[1]), name="stands for a native thread")
    before = thread_cpu_s(os.getpid())
    burner.start()
    native.start()
    _burn(0.1)
    assert all(event.wait(30) for event in burnt)
    # As py-spy would name them, but for the thread that stands for one OpenVINO starts.
    named = {threading.main_thread().native_id: "MainThread", burner.native_id: "worker"}
    try:
        split = ThreadSplit(os.getpid(), lambda pid: named).per_job_ms(before, thread_cpu_s(os.getpid()), jobs=100)
    finally:
        done.set()
        burner.join()
        native.join()
    assert set(split) == {"inference (native)", "event loop (HTTP)", "job threads (Python)"}
    # Core-ms per job over 100 jobs: the burner's 0.3 s is 3 ms a job, the stand-in's at least 1.5,
    # the main thread's at least 0.7 (10 ms ticks).
    assert split["job threads (Python)"] == pytest.approx(3.0, abs=0.5)
    assert split["inference (native)"] >= 1.5 and split["event loop (HTTP)"] >= 0.7


def test_thread_split_is_empty_when_the_threads_cannot_be_named():
    split = ThreadSplit(os.getpid(), lambda pid: "py-spy is not installed").per_job_ms({}, {1: 1.0}, jobs=10)
    assert split == {}


@pytest.mark.skipif(shutil.which("py-spy", path=str(Path(sys.executable).parent)) is None, reason="needs py-spy")
def test_python_threads_names_a_running_interpreters_threads_by_native_id():
    child = subprocess.Popen([sys.executable, "-c", "import threading, time\n"
                              "threading.Thread(target=time.sleep, args=(30,), name='helper').start()\n"
                              "print('up', flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "up\n"
        named = python_threads(child.pid)
        if isinstance(named, str) and re.search(r"permission|not permitted|ptrace", named, re.I):
            pytest.skip(f"this machine forbids attaching to processes: {named}")
        assert isinstance(named, dict), named
        assert named.get(child.pid) == "MainThread" and sorted(named.values()) == ["MainThread", "helper"]
        assert set(named) <= set(thread_cpu_s(child.pid))
    finally:
        child.kill()
        child.communicate()
