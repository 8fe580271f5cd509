"""The service's job ledger: a job that comes again is never run twice nor reported twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from aicsd.callbacks import CallbackAnswer
from aicsd.job import SEED_EXAMPLE, Job, JobRequest
from aicsd.outcome import OutputFile, PipelineOutcome
from pipeline.base import OutputFolder
from pipeline.output_files import publish_together
from serving.ledger import Claim, JobLedger, LedgerBusy, State, job_digest

REPO = Path(__file__).resolve().parent.parent
KEY = ("job-1", "task-1", "digest-1")
ACCEPTED = CallbackAnswer("http://127.0.0.1:1/x", 200, "", 1)
REFUSED = CallbackAnswer("http://127.0.0.1:1/x", 503, "busy", 5)


def ledger_at(path: Path, **kwargs) -> JobLedger:
    return JobLedger(path / "ledger.sqlite3", keep_reported=kwargs.pop("keep_reported", 3600), **kwargs)


def outcome(tmp_path: Path) -> PipelineOutcome:
    # The folder as AiCSD sent it, which the stored outcome must give back as it was.
    return PipelineOutcome.complete(
        '{"CellCount":3}', "LowContrast", (OutputFile.in_folder("/tmp/files/output", "a-counted.tiff"),)
    )


def job(**changes: str) -> Job:
    return Job.from_request(JobRequest.model_validate({**SEED_EXAMPLE, **changes}), frozenset({"*"}))


# What a process that claimed job-1 and was then killed had done: the rest of its script follows.
CLAIMED_THEN = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from pipeline.base import OutputFolder\n"
        "from pipeline.output_files import publish_together\n"
        "from serving.ledger import JobLedger\n"
        "key = ('job-1', 'task-1', 'digest-1')\n"
        "ledger = JobLedger(Path(sys.argv[1]), keep_reported=60)\n"
        "ledger.claim(key)\n"
)


def run_killed(rest: str, ledger_path: Path, out: Path) -> int:
    """Run a process that claims job-1 in `ledger_path`, then does `rest` (ending in its death)."""
    return subprocess.run(
        [sys.executable, "-c", CLAIMED_THEN + rest, str(ledger_path), str(out)], cwd=REPO, check=False
    ).returncode


def test_a_new_job_is_run_then_reported_then_answered_from_the_ledger(tmp_path):
    ledger = ledger_at(tmp_path)
    assert ledger.claim(KEY).claim is Claim.RUN
    ledger.computed(KEY, outcome(tmp_path))
    ledger.finish(KEY)
    again = ledger.claim(KEY)
    assert (again.claim, again.state, again.outcome) == (Claim.REPORT, State.COMPUTED, outcome(tmp_path))
    ledger.answered(KEY, "job_update", ACCEPTED)
    ledger.answered(KEY, "pipeline_status", ACCEPTED)
    ledger.finish(KEY)
    final = ledger.claim(KEY)
    assert final.claim is Claim.ANSWER and final.state is State.REPORTED
    assert final.job_update == ACCEPTED and final.pipeline_status == ACCEPTED


def test_a_job_left_between_callbacks_by_its_own_finished_handler_is_not_marked_resent(tmp_path):
    ledger = ledger_at(tmp_path)
    ledger.claim(KEY)
    ledger.computed(KEY, outcome(tmp_path))
    ledger.answered(KEY, "job_update", REFUSED)
    ledger.finish(KEY)
    ledger.claim(KEY)
    assert ledger.resent(KEY) == []


def test_a_refused_callback_leaves_it_to_be_sent_again_and_an_accepted_one_is_not(tmp_path):
    ledger = ledger_at(tmp_path)
    ledger.claim(KEY)
    ledger.computed(KEY, outcome(tmp_path))
    ledger.answered(KEY, "job_update", REFUSED)
    ledger.finish(KEY)
    assert ledger.claim(KEY).state is State.COMPUTED
    ledger.answered(KEY, "job_update", ACCEPTED)
    ledger.answered(KEY, "pipeline_status", REFUSED)
    ledger.finish(KEY)
    entry = ledger.claim(KEY)
    assert entry.state is State.UPDATE_ACCEPTED and entry.pipeline_status == REFUSED


def test_the_ledger_survives_a_new_process(tmp_path):
    first = ledger_at(tmp_path)
    first.claim(KEY)
    first.computed(KEY, outcome(tmp_path))
    first.answered(KEY, "job_update", ACCEPTED)
    first.finish(KEY)
    first.close()
    entry = ledger_at(tmp_path).claim(KEY)
    assert entry.claim is Claim.REPORT and entry.state is State.UPDATE_ACCEPTED and entry.outcome == outcome(tmp_path)


def test_a_job_held_by_another_live_process_is_busy(tmp_path):
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from serving.ledger import JobLedger\n"
        "ledger = JobLedger(Path(sys.argv[1]), keep_reported=60)\n"
        "ledger.claim(('job-1', 'task-1', 'digest-1'))\n"
        "print('claimed', flush=True)\n"
        "time.sleep(60)\n"
    )
    other = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "ledger.sqlite3")], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "claimed"
        with pytest.raises(LedgerBusy, match=f"process {other.pid} is running it"):
            ledger_at(tmp_path).claim(KEY)
    finally:
        other.kill()
        other.wait()
        assert other.stdout is not None
        other.stdout.close()


def test_a_job_left_running_by_a_killed_process_runs_again_without_its_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a-counted.tiff").write_bytes(b"another job's file")  # taken name: the run gets a-counted-1.tiff
    code = (
        "folder = OutputFolder.open(Path(sys.argv[2]))\n"
        "def die_after_linking(handle):\n"
        "    handle.write(b'half a result')\n"
        "publish_together(folder, [('a-counted.tiff', die_after_linking)],\n"
        "                 record=lambda files: ledger.files_written(key, files))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert run_killed(code, tmp_path / "ledger.sqlite3", out) == -signal.SIGKILL
    assert sorted(p.name for p in out.iterdir()) == ["a-counted-1.tiff", "a-counted.tiff"]

    entry = ledger_at(tmp_path).claim(KEY)
    assert entry.claim is Claim.RUN and entry.runs == 2
    assert sorted(p.name for p in out.iterdir()) == ["a-counted.tiff"]
    assert (out / "a-counted.tiff").read_bytes() == b"another job's file"


def test_a_crash_mid_write_leaves_no_temporary_behind_after_the_rerun(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    code = (
        "def write(handle):\n"
        "    handle.write(b'partial')\n"
        "def record_then_die(files):\n"
        "    ledger.files_written(key, files)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "publish_together(OutputFolder.open(Path(sys.argv[2])), [('b.tiff', write)], record=record_then_die)\n"
    )
    assert run_killed(code, tmp_path / "ledger.sqlite3", out) == -signal.SIGKILL
    assert [p.name for p in out.iterdir() if p.name.endswith(".partial")]
    assert ledger_at(tmp_path).claim(KEY).claim is Claim.RUN
    assert list(out.iterdir()) == []


def test_a_callback_in_flight_when_its_process_died_is_sent_again_and_marked(tmp_path):
    ledger = ledger_at(tmp_path)
    ledger.claim(KEY)
    ledger.computed(KEY, outcome(tmp_path))  # the job update goes out next
    ledger.close()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    started = psutil.Process().create_time()
    # The row now belongs to a process that is gone (its pid, with another start time).
    import sqlite3

    with sqlite3.connect(tmp_path / "ledger.sqlite3") as db:
        db.execute("UPDATE jobs SET owner = ?", (f"{dead.pid}:{started - 1000:.3f}",))
    again = ledger_at(tmp_path)
    entry = again.claim(KEY)
    assert entry.claim is Claim.REPORT and entry.state is State.COMPUTED
    assert again.resent(KEY) == ["job_update"]
    again.answered(KEY, "job_update", ACCEPTED)
    again.finish(KEY)
    assert again.claim(KEY).state is State.UPDATE_ACCEPTED
    assert again.resent(KEY) == ["job_update"]  # this process is alive: nothing is marked again


def test_same_ids_with_other_content_is_another_job():
    seed = job()
    assert job_digest(seed) == job_digest(job(GatewayIP="10.0.0.9"))  # the bridge's address is not content
    assert job_digest(seed) != job_digest(job(InputFileLocation="/tmp/files/input/2.tiff"))
    assert job_digest(seed) != job_digest(job(ModelParams={"Brightness": "1"}))


def test_reported_jobs_are_forgotten_after_the_repeat_window(tmp_path):
    now = [1000.0]
    ledger = ledger_at(tmp_path, keep_reported=60, clock=lambda: now[0])
    for key in (KEY, ("job-2", "task-2", "d")):
        ledger.claim(key)
        ledger.computed(key, outcome(tmp_path))
    for callback in ("job_update", "pipeline_status"):
        ledger.answered(KEY, callback, ACCEPTED)
    now[0] += 61
    assert ledger.prune() == 1
    assert ledger.claim(KEY).claim is Claim.RUN  # forgotten: it would run again
    assert ledger.claim(("job-2", "task-2", "d")).state is State.COMPUTED  # not reported: kept


def test_release_forgets_a_run_that_stored_no_outcome_and_removes_its_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ledger = ledger_at(tmp_path)
    ledger.claim(KEY)
    folder = OutputFolder.open(out)
    try:
        publish_together(folder, [("c.tiff", lambda h: h.write(b"x"))], record=lambda f: ledger.files_written(KEY, f))
    finally:
        folder.close()
    ledger.release(KEY)
    assert list(out.iterdir()) == []
    assert ledger.claim(KEY).runs == 1


def test_ledger_file_is_where_the_setting_says(tmp_path):
    ledger = ledger_at(tmp_path / "deep" / "er")
    assert (tmp_path / "deep" / "er" / "ledger.sqlite3").is_file() and ledger.counts() == {}
    assert os.access(ledger.path, os.W_OK)
