"""Benchmark `mismatch watch`'s cost per training step against a one-shot import of that step.

Writes a prime-rl export of two steps of `--tokens` loss-masked tokens each (the writer of
bench_import.py: every key prime-rl writes, 4 ranks a step, STABLE markers). Then, in fresh
processes:
- `watch DIR --format prime-rl --out RUN --once` with only step 1 in DIR (the first step);
- step 2 appears; `watch ... --once` again: what watch does when a new step lands on a run
  that already holds one (import the step, append it, rewrite tables/steps.csv and
  figures/drift.png, feed the drift alarm);
- `import prime-rl` of a folder holding only step 2, the one-shot import of the same step.
Prints each one's wall time and peak memory, and the ratio of the second watch call to the
one-shot import (what following a run costs per step beyond reading it). The report page is
off (`--no-html` on import, as watch never writes one).

    .venv/bin/python benchmarks/bench_watch.py [--tokens 1000000] [--repeats 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:
    from benchmarks.bench_import import write_export
    from benchmarks.common import run_child
except ImportError:  # run as a script from benchmarks/
    from bench_import import write_export
    from common import run_child


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000, help="loss-masked tokens a step")
    ap.add_argument("--repeats", type=int, default=3, help="medians of this many repeats")
    ap.add_argument("--keep", type=Path, default=None, help="write the exports and runs here")
    args = ap.parse_args()
    tmp = None
    if args.keep is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-watch-")
        base = Path(tmp.name)
    else:
        base = args.keep
    src = base / "export"
    write_export(src, 2 * args.tokens, steps=2)
    only2 = base / "only-step-2"
    (only2 / "token_exports").mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "token_exports" / "step_2", only2 / "token_exports" / "step_2")
    print(f"a prime-rl export of 2 steps x {args.tokens:,} tokens at {src}")
    print(f"cores available: {len(os.sched_getaffinity(0))}")
    py = [sys.executable, "-m", "mismatch_cli"]
    first, second, oneshot = [], [], []
    try:
        for k in range(args.repeats):
            live, run, one = base / f"live{k}", base / f"run{k}", base / f"one{k}"
            (live / "token_exports").mkdir(parents=True)
            shutil.copytree(src / "token_exports" / "step_1", live / "token_exports" / "step_1")
            watch = [*py, "watch", str(live), "--format", "prime-rl", "--out", str(run), "--once"]
            first.append(run_child(watch, "watch (step 1)", ROOT))
            shutil.copytree(src / "token_exports" / "step_2", live / "token_exports" / "step_2")
            second.append(run_child(watch, "watch (step 2 on a run of step 1)", ROOT))
            cmd = [*py, "import", "prime-rl", str(only2), "--out", str(one), "--no-html"]
            oneshot.append(run_child(cmd, "import (step 2 alone)", ROOT))
            for d in (live, run, one):
                shutil.rmtree(d, ignore_errors=True)
    finally:
        if tmp is not None:
            tmp.cleanup()

    def line(label: str, rs: list) -> float:
        wall = statistics.median(r.wall for r in rs)
        peak = max(r.peak_gb for r in rs)
        print(f"{label:40s} median {wall:6.1f} s of {len(rs)}, peak RSS {peak:.2f} GB")
        return wall

    line("watch --once, the first step", first)
    w2 = line("watch --once, a new step on a 1-step run", second)
    i2 = line("import of that step alone (one-shot)", oneshot)
    print(f"watch per new step / one-shot import of it = {w2 / i2:.2f}x")


if __name__ == "__main__":
    main()
