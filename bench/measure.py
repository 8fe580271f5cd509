"""Measuring helpers: latency statistics, resident memory of process trees, load generators."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Figure", "closed_loop", "process_tree", "rss_mib", "summarise"]


@dataclass
class Figure:
    """One measured line of the report."""

    stage: str
    setting: str
    per_second: float
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    count: int = 0
    samples: list[float] = field(default_factory=list, repr=False)

    def asdict(self) -> dict[str, object]:
        """The figure without its raw samples."""
        return {k: v for k, v in vars(self).items() if k != "samples"}


def summarise(stage: str, setting: str, latencies_s: list[float], elapsed_s: float) -> Figure:
    values = np.array(latencies_s) * 1000 if latencies_s else np.array([np.nan])
    p50, p95, p99 = (float(np.percentile(values, q)) for q in (50, 95, 99))
    rate = len(latencies_s) / elapsed_s if elapsed_s > 0 else 0.0
    return Figure(stage, setting, rate, p50, p95, p99, len(latencies_s), list(latencies_s))


def closed_loop(work: Callable[[int], None], concurrency: int, duration_s: float,
                max_jobs: int | None = None) -> tuple[list[float], float]:
    """`concurrency` workers calling `work(n)` back to back for `duration_s` (or `max_jobs` calls)."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(10**9))
    deadline = time.perf_counter() + duration_s

    def worker() -> None:
        while time.perf_counter() < deadline:
            with lock:
                n = next(counter)
                if max_jobs is not None and n >= max_jobs:
                    return
            start = time.perf_counter()
            work(n)
            with lock:
                latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    return latencies, time.perf_counter() - start


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def process_tree(pid: int) -> Iterator[int]:
    """`pid` and every process descended from it, parents before their children."""
    stack = [pid]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(_children(current))


def rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MiB."""
    total = 0
    for current in process_tree(pid):
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024.0


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def cores() -> int:
    return len(os.sched_getaffinity(0))
