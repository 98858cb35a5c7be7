"""Shared helpers for the on-demand benchmarks (not part of the test suite)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
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


# The measured command is started from this small launcher, not from the benchmark: on Linux a
# process's peak-RSS record (ru_maxrss) starts from the memory of the process it was forked from
# (exec keeps the old address space's high-water mark), so a child of a benchmark holding
# gigabytes reported gigabytes it never used (a 1e7-row seed: 7.9 GB for a report using 0.67).
# The launcher is a fresh interpreter of a few MB; its child's figures are the child's own.
_LAUNCH = r"""
import json, os, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(out, "w") as f:
    json.dump({"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "maxrss_kib": ru.ru_maxrss,
               "code": os.waitstatus_to_exitcode(status)}, f)
"""


def run_child(cmd: list[str], label: str, cwd: str | Path | None = None) -> Child:
    """Run `cmd` in a fresh process and measure it: its wall time, CPU time and its own peak
    resident memory (os.wait4 in a small launcher, see `_LAUNCH`). A non-zero exit ends the
    benchmark with `label`, the exit code and the end of the child's stderr."""
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.TemporaryDirectory() as tmp,
    ):
        measured = Path(tmp) / "measured.json"
        launcher = [sys.executable, "-c", _LAUNCH, str(measured), *cmd]
        proc = subprocess.run(launcher, stdout=out, stderr=err, cwd=cwd, env=os.environ)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
        if proc.returncode != 0 or not measured.is_file():
            raise SystemExit(f"{label}: the launcher failed ({proc.returncode}):\n{stderr[-3000:]}")
        m = json.loads(measured.read_text())
    if m["code"] != 0:
        raise SystemExit(f"{label} failed with exit code {m['code']}:\n{stderr[-3000:]}")
    # ru_maxrss is in KiB on Linux
    return Child(m["wall"], m["cpu"], m["maxrss_kib"] / 1024**2, stdout)
