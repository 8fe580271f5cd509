"""The bridge on a disk that fills up or cannot be written: a real tmpfs, a real broker, the real
bridge process, the real service and the AiCSD stand-in.

The spool lives on a small tmpfs the test mounts (root only) and fills with a file until the
kernel answers ENOSPC, then empties again.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.servers import Bridge, Broker, publish

from .test_bridge import assert_exactly_once, job_payload

pytestmark = pytest.mark.integration


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(disk)],
                             capture_output=True, text=True, timeout=30, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True, timeout=30)


def fill(disk: Path) -> Path:
    """Write a file until the disk is full to the last page; the file, to delete to make room."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1):
            chunk = b"\0" * size
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return filler


def new_bridge(folder: Path, service_url: str, broker: Broker, spool: Path, **extra) -> Bridge:
    return Bridge(folder, f"{service_url}/classify", broker.port, client_id=f"bridge-{uuid.uuid4().hex[:8]}",
                  spool_path=spool, extra=extra)


def test_full_spool_disk_holds_messages_unacknowledged_and_the_bridge_recovers_when_space_returns(
    broker, service, aicsd, file_root, image, small_disk, tmp_path
):
    bridge = new_bridge(tmp_path / "bridge", service.url, broker, small_disk / "spool.sqlite3").start()
    try:
        first, payload = job_payload(aicsd, image, file_root / "output")
        publish(broker.port, [json.dumps(payload)])
        assert_exactly_once(aicsd, [first])
        filler = fill(small_disk)
        jobs, payloads = zip(*(job_payload(aicsd, image, file_root / "output") for _ in range(20)), strict=False)
        publish(broker.port, [json.dumps(p) for p in payloads])
        bridge.wait_for_log("cannot store message", timeout=30)
        bridge.wait_for_log("broker=connected spool=failing (", timeout=30)
        assert all(aicsd.requests_for(job.job_id) == [] for job in jobs[-5:])
        filler.unlink()
        assert_exactly_once(aicsd, jobs, timeout=120)
        bridge.wait_for_log("done=21 failed=0", timeout=30)
        bridge.wait_for_log("spool=ok unacknowledged=0 unrecorded=0 workers=2/2", timeout=30)
        assert bridge.process.poll() is None
        assert "Traceback" not in bridge.log_text().split("cannot store message", 1)[0]
    finally:
        bridge.stop()


@pytest.mark.parametrize("trouble", ["full", "read-only"])
def test_spool_on_a_full_or_read_only_disk_stops_start_up_with_one_line_and_exit_code_2(
    broker, small_disk, tmp_path, trouble
):
    if trouble == "full":
        fill(small_disk)
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True, timeout=30)
    bridge = new_bridge(tmp_path / "bridge", "http://127.0.0.1:9", broker, small_disk / "spool" / "bridge.sqlite3")
    bridge.start(wait_for=None)
    assert bridge.process.wait(60) == 2
    text = bridge.log_text()
    assert text.startswith("error: cannot ") and "spool" in text, text
    assert text.count("\n") == 1 and "Traceback" not in text, text


def test_result_the_full_spool_cannot_record_is_held_and_recorded_when_space_returns(
    broker, aicsd, file_root, image, small_disk, tmp_path
):
    from .test_bridge_republish import StandInService

    with StandInService(200, {"Status": "PipelineComplete"}) as service:
        service.gate.clear()  # the service holds the job while the disk fills up
        bridge = Bridge(tmp_path / "bridge", service.url, broker.port, client_id=f"bridge-{uuid.uuid4().hex[:8]}",
                        spool_path=small_disk / "spool.sqlite3").start()
        try:
            job, payload = job_payload(aicsd, image, file_root / "output")
            publish(broker.port, [json.dumps(payload)])
            bridge.wait_for_log("in_flight=1")
            filler = fill(small_disk)
            service.gate.set()
            bridge.wait_for_log(f"job={job.job_id} task={job.task_id} cannot record the job's state in the spool")
            bridge.wait_for_log("spool=failing (")
            bridge.wait_for_log("in_flight=1 done=0")
            bridge.wait_for_log("unrecorded=1 workers=2/2")
            filler.unlink()
            bridge.wait_for_log(f"job={job.job_id} task={job.task_id} state recorded in the spool at last")
            bridge.wait_for_log("in_flight=0 done=1")
            bridge.wait_for_log("spool=ok unacknowledged=0 unrecorded=0 workers=2/2")
            assert len(service.requests) == 1
        finally:
            bridge.stop()
