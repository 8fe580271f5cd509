"""`serving.answers.answer_batch`: a batch's jobs answered in order from a few worker threads."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

from serving.answers import answer_batch


def run_batch(jobs: list[object], answer, lanes: int, tokens: int = 8) -> list:
    async def main() -> list:
        return await answer_batch(jobs, answer, lanes=lanes, limiter=anyio.CapacityLimiter(tokens))

    return anyio.run(main)


def test_every_job_is_answered_once_in_order_from_at_most_lanes_threads():
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def answer(job: int):
        with lock:
            seen.append((job, threading.get_ident()))
        time.sleep(0.005)
        return 200, {"job": job}

    answers = run_batch(list(range(20)), answer, lanes=3)
    assert answers == [(200, {"job": n}) for n in range(20)]
    assert sorted(job for job, _ in seen) == list(range(20))
    threads = {ident for _, ident in seen}
    assert 1 < len(threads) <= 3 and threading.get_ident() not in threads


def test_a_slow_job_holds_up_only_its_own_lane():
    done_while_slow: list[int] = []
    slow_done = threading.Event()

    def answer(job: int):
        if job == 0:
            time.sleep(0.5)
            slow_done.set()
        elif not slow_done.is_set():
            done_while_slow.append(job)
        return 200, {"job": job}

    answers = run_batch(list(range(8)), answer, lanes=2)
    assert [body["job"] for _, body in answers] == list(range(8))
    # The other lane took every other job while the first one was still running.
    assert done_while_slow == list(range(1, 8))


def test_lanes_never_hold_more_threads_than_the_limiter_allows():
    running, peak = 0, 0
    lock = threading.Lock()

    def answer(job: int):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.01)
        with lock:
            running -= 1
        return 200, {}

    run_batch(list(range(12)), answer, lanes=6, tokens=2)
    assert peak == 2


def test_a_batch_of_one_runs_one_lane():
    idents: list[int] = []
    answers = run_batch(["only"], lambda job: (idents.append(threading.get_ident()), (200, {"j": job}))[1], lanes=4)
    assert answers == [(200, {"j": "only"})] and len(idents) == 1


def test_an_exception_in_an_answer_is_raised_not_swallowed():
    def answer(job: int):
        if job == 2:
            raise RuntimeError("boom")
        return 200, {}

    with pytest.raises(RuntimeError, match="boom"):
        run_batch(list(range(4)), answer, lanes=2)
