"""Shared helpers for the on-demand benchmarks (not part of the test suite)."""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 3) -> dict[str, float]:
    """Median times of several functions, run alternately so machine noise hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


@dataclass(frozen=True)
class Child:
    """One finished child process: wall and CPU (user + system) seconds, its own peak
    resident memory in GB, and what it printed on stdout."""

    wall: float
    cpu: float
    peak_gb: float
    stdout: str


def run_child(cmd: list[str], label: str, cwd: str | Path | None = None) -> Child:
    """Run `cmd` in a fresh process and measure it: its own resource usage from os.wait4
    (not the largest child so far). A non-zero exit ends the benchmark with `label`, the
    exit code and the end of the child's stderr."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=cwd, env=os.environ)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if code != 0:
        raise SystemExit(f"{label} failed with exit code {code}:\n{stderr[-3000:]}")
    # ru_maxrss is in KiB on Linux
    return Child(wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024**2, stdout)
