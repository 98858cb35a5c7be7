"""Number formatting (one set of formatters) and progress lines for logs."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from mismatch_cli.formatting import fmt, pct, times
from mismatch_cli.progress import LogProgress


@pytest.mark.parametrize(
    ("x", "text"),
    [
        (0.99984, "99.984%"),  # a shortfall is never rounded up to 100%
        (0.9995, "99.950%"),
        (1.0, "100%"),
        (0.0, "0%"),
        (0.5, "50%"),
        (0.123456, "12.3%"),
        (2.5e-6, "2.5e-4%"),  # small shares are never rounded down to 0%
        (None, "–"),
        (float("nan"), "–"),
    ],
)
def test_pct(x: float | None, text: str) -> None:
    assert pct(x) == text


def test_fmt_and_times() -> None:
    assert fmt(0.0123456) == "0.0123"
    assert fmt(2.6e-6) == "2.60e-6"
    assert fmt(-0.5, sign=True) == "-0.5"
    assert fmt(1234) == "1,234"
    assert times(0.4321) == "0.43x" and times(None) == "–"


def test_log_progress_prints_plain_lines() -> None:
    buf = io.StringIO()
    clock = iter([0.0, 0.0, 10.0, 31.0, 40.0, 50.0, 61.0, 61.0])
    prog = LogProgress(Console(file=buf, width=200), interval=30.0)
    prog._time = lambda: next(clock)  # type: ignore[method-assign]
    prog.start("rescore", 1000)  # t = 0
    prog.advance("rescore", 100)  # t = 10: within 30 s of the last line, silent
    prog.advance("rescore", 200)  # t = 31: a line
    prog.advance("rescore", 100)  # t = 40: silent
    prog.advance("rescore", 600)  # t = 50: done
    lines = buf.getvalue().splitlines()
    assert lines[0] == "rescore: 0/1,000 tokens, started"
    assert lines[1].startswith("rescore: 300/1,000 tokens, ") and "ETA" in lines[1]
    assert "/s" in lines[1]
    assert lines[2].startswith("rescore: 1,000/1,000 tokens") and "done in" in lines[2]
    assert len(lines) == 3


def test_log_progress_lines_carry_the_phase_detail() -> None:
    """`detail` (tokens/s per Ray worker) rides on the phase's next lines; a detail for a
    phase not started is ignored."""
    buf = io.StringIO()
    now = [0.0]
    prog = LogProgress(Console(file=buf, width=200), interval=30.0)
    prog._time = lambda: now[0]  # type: ignore[method-assign]
    prog.detail("generate", "ignored")
    prog.start("rescore", 100)
    prog.detail("rescore", "w0 12.5 tok/s, w1 11 tok/s")
    now[0] = 31.0
    prog.advance("rescore", 40)
    now[0] = 40.0
    prog.advance("rescore", 60)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "rescore: 0/100 tokens, started"
    assert lines[1].startswith("rescore: 40/100 tokens") and lines[1].endswith(
        ", w0 12.5 tok/s, w1 11 tok/s"
    )
    assert "done in" in lines[2] and lines[2].endswith("w1 11 tok/s") and len(lines) == 3


def test_log_progress_heartbeat_speaks_while_nothing_advances() -> None:
    """A phase that does not advance (vLLM finishing no completion for minutes) still gets
    a line every interval from the heartbeat, saying how long it has run; a finished phase
    gets none."""
    buf = io.StringIO()
    now = [0.0]
    prog = LogProgress(Console(file=buf, width=200), interval=30.0)
    prog._time = lambda: now[0]  # type: ignore[method-assign]
    prog.start("generate", 64)
    for t in (10.0, 29.0, 31.0, 45.0, 62.0):
        now[0] = t
        prog.beat()
    now[0] = 70.0
    prog.advance("generate", 64)
    now[0] = 200.0
    prog.beat()
    lines = buf.getvalue().splitlines()
    assert lines[0] == "generate: 0/64 completions, started"
    assert lines[1] == "generate: 0/64 completions, running for 0m31s"
    assert lines[2] == "generate: 0/64 completions, running for 1m02s"
    assert lines[3].startswith("generate: 64/64 completions") and "done in 1m10s" in lines[3]
    assert len(lines) == 4


def test_progress_heartbeat_thread_runs_and_stops() -> None:
    """The real thread, with a tiny interval: lines appear without any advance, and the
    thread is gone when the context closes."""
    import threading
    import time

    from mismatch_cli.progress import progress

    buf = io.StringIO()
    console = Console(file=buf, width=200)  # not a terminal: plain lines
    with progress(console) as prog:
        prog.interval = 0.05
        prog.start("generate", 3)
        time.sleep(1.5)
    assert "running for" in buf.getvalue()
    assert not any(t.name == "mismatch-progress" for t in threading.enumerate())
