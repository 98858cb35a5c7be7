"""Progress of long work as a person sees it: rich bars on a terminal, and in a log (CI,
nohup, a file) one plain line per phase at its start, at least every 30 s while it runs
(`MISMATCH_PROGRESS_INTERVAL` seconds), and at its end. The library reports to the
`pipeline.Progress` protocol; commands hand it `progress(console)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

from .formatting import duration

PROGRESS_UNITS = {"generate": "completions", "rescore": "tokens", "import": "records",
                  "prefill": "sequences", "read": "files"}  # fmt: skip
LOG_INTERVAL_S = 30.0


class LogProgress:
    """Progress for a log (stderr not a terminal: CI, nohup, a file): one plain line per
    phase at its start, then at least every `interval` seconds while it runs, and at its
    end: phase, done/total, rate, ETA (elapsed time while nothing is done yet).

    "While it runs" includes stretches where nothing advances (vLLM reports a completion
    only when it finishes, so a chunk of 64 long completions is silent for minutes): a
    heartbeat thread (`start_heartbeat`, on in `progress()`) prints the line when
    `interval` seconds passed since the last one."""

    def __init__(self, console: Console, interval: float | None = None) -> None:
        import os
        import threading
        import time

        self._time = time.monotonic
        self.console = console
        env = os.environ.get("MISMATCH_PROGRESS_INTERVAL")
        self.interval = interval if interval is not None else float(env or LOG_INTERVAL_S)
        self.phases: dict[str, dict[str, float]] = {}
        self.details: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, phase: str, total: int, done: int = 0) -> None:
        with self._lock:
            now = self._time()
            self.phases[phase] = {
                "total": total,
                "done": done,
                "start_done": done,
                "t0": now,
                "last": now,
            }
            self._line(phase, "start")

    def advance(self, phase: str, n: int) -> None:
        with self._lock:
            st = self.phases[phase]
            st["done"] += n
            now = self._time()
            if st["done"] >= st["total"]:
                self._line(phase, "done")
            elif now - st["last"] >= self.interval:
                self._line(phase, None)

    def log(self, message: str) -> None:
        with self._lock:
            self.console.print(message, highlight=False, soft_wrap=True)

    def detail(self, phase: str, text: str) -> None:
        """Text shown after the phase's numbers on its next line (tokens/s per worker)."""
        with self._lock:
            if phase in self.phases:
                self.details[phase] = text

    def beat(self) -> None:
        """One heartbeat: a line for each unfinished phase silent for `interval` seconds."""
        with self._lock:
            now = self._time()
            for phase, st in self.phases.items():
                if st["done"] < st["total"] and now - st["last"] >= self.interval:
                    self._line(phase, None)

    def start_heartbeat(self, tick: float = 1.0) -> None:
        """Call `beat` every `tick` seconds in a daemon thread until `stop_heartbeat`."""
        import threading

        def run() -> None:
            while not self._stop.wait(tick):
                self.beat()

        self._thread = threading.Thread(target=run, name="mismatch-progress", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _line(self, phase: str, what: str | None) -> None:
        st = self.phases[phase]
        now = self._time()
        st["last"] = now
        done, total = int(st["done"]), int(st["total"])
        unit = PROGRESS_UNITS.get(phase, "")
        elapsed = now - st["t0"]
        rate = (done - st["start_done"]) / elapsed if elapsed > 0 else 0.0
        bits = [f"{phase}: {done:,}/{total:,} {unit}".rstrip()]
        if what == "start":
            bits.append("started")
        elif what == "done":
            bits += [f"{rate:.3g} {unit}/s".strip(), f"done in {duration(elapsed)}"]
        elif rate > 0:
            bits += [f"{rate:.3g} {unit}/s".strip(), f"ETA {duration((total - done) / rate)}"]
        else:
            bits.append(f"running for {duration(elapsed)}")
        if phase in self.details:
            bits.append(self.details[phase])
        self.console.print(", ".join(bits), highlight=False, soft_wrap=True)


class _BarsProgress:
    """Rich progress bars (a terminal)."""

    def __init__(self, bars: Any) -> None:
        self.bars = bars
        self.tasks: dict[str, Any] = {}

    def start(self, phase: str, total: int, done: int = 0) -> None:
        self.tasks[phase] = self.bars.add_task(
            phase, total=total, completed=done, unit=PROGRESS_UNITS.get(phase, ""), detail=""
        )

    def advance(self, phase: str, n: int) -> None:
        self.bars.advance(self.tasks[phase], n)

    def log(self, message: str) -> None:
        self.bars.console.print(message, highlight=False, soft_wrap=True)

    def detail(self, phase: str, text: str) -> None:
        if phase in self.tasks:
            self.bars.update(self.tasks[phase], detail=text)


@contextmanager
def progress(console: Console) -> Iterator[Any]:
    """A progress reporter (start / advance / log) for the pipeline: rich bars when
    `console` is a terminal, plain lines otherwise (`LogProgress`)."""
    if not console.is_terminal:
        log = LogProgress(console)
        log.start_heartbeat()
        try:
            yield log
        finally:
            log.stop_heartbeat()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as RichProgress

    bars = RichProgress(
        TextColumn("[bold]{task.description:<9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[detail]}"),
        console=console,
        transient=False,
    )
    with bars:
        yield _BarsProgress(bars)


__all__ = ["LOG_INTERVAL_S", "PROGRESS_UNITS", "LogProgress", "progress"]
