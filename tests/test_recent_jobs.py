"""The service's memory of reported jobs: repeats are answered, not re-run."""

from __future__ import annotations

import threading

from serving.recent_jobs import RecentJobs


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_repeat_within_the_window_returns_the_stored_result_without_running():
    recent: RecentJobs[str] = RecentJobs(900)
    calls = []
    first = recent.run_once(("j", "t"), lambda: calls.append(1) or "done", keep=lambda r: True)
    second = recent.run_once(("j", "t"), lambda: calls.append(2) or "again", keep=lambda r: True)
    assert first == ("done", False) and second == ("done", True) and calls == [1]


def test_result_not_kept_is_run_again():
    recent: RecentJobs[str] = RecentJobs(900)
    recent.run_once(("j", "t"), lambda: "callbacks failed", keep=lambda r: False)
    assert recent.run_once(("j", "t"), lambda: "retried", keep=lambda r: True) == ("retried", False)


def test_repeat_after_the_window_runs_again():
    clock = Clock()
    recent: RecentJobs[str] = RecentJobs(10, clock=clock)
    recent.run_once(("j", "t"), lambda: "first", keep=lambda r: True)
    clock.now = 11
    assert recent.run_once(("j", "t"), lambda: "second", keep=lambda r: True) == ("second", False)


def test_zero_window_disables_the_memory():
    recent: RecentJobs[str] = RecentJobs(0)
    recent.run_once(("j", "t"), lambda: "first", keep=lambda r: True)
    assert recent.run_once(("j", "t"), lambda: "second", keep=lambda r: True) == ("second", False)


def test_other_task_of_the_same_job_is_a_different_key():
    recent: RecentJobs[str] = RecentJobs(900)
    recent.run_once(("j", "t1"), lambda: "first", keep=lambda r: True)
    assert recent.run_once(("j", "t2"), lambda: "second", keep=lambda r: True) == ("second", False)


def test_concurrent_repeat_waits_for_the_running_job_instead_of_running_twice():
    recent: RecentJobs[str] = RecentJobs(900)
    started, release = threading.Event(), threading.Event()
    runs = []

    def slow() -> str:
        runs.append("slow")
        started.set()
        release.wait(5)
        return "slow result"

    results = []
    first = threading.Thread(target=lambda: results.append(recent.run_once(("j", "t"), slow, keep=lambda r: True)))
    first.start()
    started.wait(5)
    second = threading.Thread(
        target=lambda: results.append(recent.run_once(("j", "t"), lambda: runs.append("fast") or "x", keep=lambda r: True))
    )
    second.start()
    release.set()
    first.join(5)
    second.join(5)
    assert runs == ["slow"]
    assert sorted(results) == [("slow result", False), ("slow result", True)]


def test_memory_is_bounded():
    recent: RecentJobs[int] = RecentJobs(900, max_entries=3)
    for i in range(10):
        recent.run_once((str(i), "t"), lambda i=i: i, keep=lambda r: True)
    assert recent.run_once(("0", "t"), lambda: -1, keep=lambda r: True) == (-1, False)
    assert recent.run_once(("9", "t"), lambda: -1, keep=lambda r: True) == (9, True)


def test_a_remembered_job_costs_a_few_hundred_bytes_beyond_its_result():
    # Up to max_entries (100,000) finished jobs are kept: each must not carry a lock or an Event.
    import tracemalloc

    recent: RecentJobs[str] = RecentJobs(900)
    keys = [(f"job{n:06d}", f"task{n:06d}") for n in range(2000)]
    result = "stored answer"
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for key in keys:
        recent.run_once(key, lambda: result, keep=lambda r: True)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert grown / len(keys) < 400, f"{grown / len(keys):.0f} bytes per remembered job"
