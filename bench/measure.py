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

__all__ = ["CpuMeter", "CpuUse", "Figure", "ThreadSplit", "closed_loop", "process_tree", "rss_mib", "summarise"]


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
    cpu: CpuUse | None = None

    def asdict(self) -> dict[str, object]:
        """The figure without its raw samples."""
        figure = {k: v for k, v in vars(self).items() if k not in ("samples", "cpu")}
        return {**figure, "cpu": self.cpu.asdict() if self.cpu else None}


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


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(entry.name)
            if fields is not None and int(fields[1]) == pid:
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


# --- CPU accounting ---------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _process_cpu_s(pid: int, tree: bool) -> float:
    """User + system CPU seconds of a process (and, with `tree`, of its living descendants)."""
    total = 0
    for current in process_tree(pid) if tree else (pid,):
        fields = _stat_fields(current)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


def _machine_cpu_s() -> tuple[float, float]:
    """CPU seconds since boot: (busy, stolen). Busy is the cores' own work: user, nice, system,
    irq, softirq. Stolen is time the hypervisor ran someone else while this VM had work: on a
    shared host it comes and goes, and a stage that lost a fifth of a core to it is that much
    slower whatever the code does, so it is shown beside every stage, never counted as busy."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    busy = values[0] + values[1] + values[2] + sum(values[5:7])
    stolen = values[7] if len(values) > 7 else 0
    return busy / _TICK, stolen / _TICK


@dataclass(frozen=True)
class CpuUse:
    """What a stage cost: core-ms per job of each named process, how many cores were busy, and how
    many the hypervisor took away."""

    per_job_ms: dict[str, float]
    busy_cores: float
    jobs: int
    stolen_cores: float = 0.0
    threads_ms: dict[str, float] = field(default_factory=dict)
    """One process's core-ms per job by kind of thread (`ThreadSplit`); empty when not split."""

    def asdict(self) -> dict[str, object]:
        return {"core_ms_per_job": self.per_job_ms, "busy_cores": self.busy_cores, "stolen_cores": self.stolen_cores,
                "jobs": self.jobs, "core_ms_per_job_by_thread": self.threads_ms}

    def text(self) -> str:
        parts = ", ".join(f"{name} {ms:.2f}" for name, ms in self.per_job_ms.items())
        return (f"core-ms per job: {parts}; busy cores {self.busy_cores:.2f} of {cores()}, "
                f"{self.stolen_cores:.2f} stolen")


def _cores_used(wall: tuple[float, float], cpu0: tuple[float, float], cpu1: tuple[float, float]) -> tuple[float, float]:
    """(busy cores, stolen cores) over a stage from two `_machine_cpu_s` readings."""
    seconds = max(wall[1] - wall[0], 1e-9)
    return (cpu1[0] - cpu0[0]) / seconds, (cpu1[1] - cpu0[1]) / seconds


def thread_cpu_s(pid: int) -> dict[int, float]:
    """User + system CPU seconds of each living thread of a process, by thread id."""
    found = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        fields = _stat_fields(f"{pid}/task/{tid}")
        if fields is not None:
            found[int(tid)] = (int(fields[11]) + int(fields[12])) / _TICK
    return found


INFERENCE_THREADS = "inference (native)"
EVENT_LOOP = "event loop (HTTP)"
JOB_THREADS = "job threads (Python)"


@dataclass(frozen=True)
class ThreadSplit:
    """Splits one process's CPU by kind of thread, to tell inference from the interpreter's work:
    threads the interpreter does not know are native ones (OpenVINO's inference streams), the main
    thread runs the event loop (HTTP), and the other Python threads run the jobs.
    `python_threads(pid)` names the Python threads by thread id (py-spy), or says why it cannot."""

    pid: int
    python_threads: Callable[[int], dict[int, str] | str]

    def per_job_ms(self, before: dict[int, float], after: dict[int, float], jobs: int) -> dict[str, float]:
        """Core-ms per job of each kind between two `thread_cpu_s` readings; {} if untold."""
        named = self.python_threads(self.pid)
        if isinstance(named, str):
            return {}
        split = {INFERENCE_THREADS: 0.0, EVENT_LOOP: 0.0, JOB_THREADS: 0.0}
        for tid, cpu_s in after.items():
            name = named.get(tid)
            kind = INFERENCE_THREADS if name is None else EVENT_LOOP if name == "MainThread" else JOB_THREADS
            split[kind] += (cpu_s - before.get(tid, 0.0)) * 1000 / max(jobs, 1)
        return split


_Reading = tuple[float, tuple[float, float], dict[str, float], dict[int, float]]


class CpuMeter:
    """CPU time of the chain's processes over a stage, read from /proc (10 ms ticks, so a stage
    should run for seconds). The load generator is this process alone, not its children: the
    servers it started are counted under their own names. With `split`, one process's CPU is also
    told by kind of thread."""

    def __init__(self, processes: dict[str, int], this_process: str = "load generator",
                 split: ThreadSplit | None = None) -> None:
        self.processes = {this_process: os.getpid(), **processes}
        self.split = split

    def _read(self) -> _Reading:
        return (time.monotonic(), _machine_cpu_s(),
                {name: _process_cpu_s(pid, tree=pid != os.getpid()) for name, pid in self.processes.items()},
                thread_cpu_s(self.split.pid) if self.split else {})

    def start(self) -> _Reading:
        """A reading to pass to `since` when the stage is over."""
        return self._read()

    def since(self, start: _Reading, jobs: int) -> CpuUse:
        """The cost of the `jobs` jobs done since `start`."""
        wall0, machine0, cpu0, threads0 = start
        wall1, machine1, cpu1, threads1 = self._read()
        per_job = {name: (cpu1[name] - cpu0[name]) * 1000 / max(jobs, 1) for name in self.processes}
        per_job["all named"] = sum(per_job.values())
        busy, stolen = _cores_used((wall0, wall1), machine0, machine1)
        threads = self.split.per_job_ms(threads0, threads1, jobs) if self.split else {}
        return CpuUse(per_job, busy, jobs, stolen, threads)


def run_measured(command: list[str], jobs_of: Callable[[], int], **popen: object) -> CpuUse:
    """Run a command to its end and say what it cost per job (its CPU read from the kernel's
    accounting of waited-for children); `jobs_of()` tells, afterwards, how many jobs it did."""
    import resource
    import subprocess

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall0, machine0 = time.monotonic(), _machine_cpu_s()
    subprocess.run(command, check=True, **popen)  # type: ignore[call-overload]
    wall1, machine1 = time.monotonic(), _machine_cpu_s()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    jobs = jobs_of()
    busy, stolen = _cores_used((wall0, wall1), machine0, machine1)
    return CpuUse({command[0].rsplit("/", 1)[-1]: cpu_s * 1000 / max(jobs, 1)}, busy, jobs, stolen)
