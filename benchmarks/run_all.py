"""Run every benchmark, one after the other: `make bench` (default sizes, minutes each; at
most 15 minutes in all on a 2-core CPU) or `make bench-large` (`--large`: each benchmark's
large size; much longer). Each prints ratios measured in one run and its own wall time;
nothing here is part of the test suite."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["bench_rescore.py", "bench_generate.py", "bench_report.py"]


def main(argv: list[str]) -> int:
    extra = ["--large"] if "--large" in argv else []
    rc = 0
    t_all = time.perf_counter()
    for name in BENCHES:
        print(f"== {name} {' '.join(extra)}".rstrip(), flush=True)
        t0 = time.perf_counter()
        rc |= subprocess.call([sys.executable, str(HERE / name), *extra], cwd=HERE.parent)
        print(f"== {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"== all benchmarks: {time.perf_counter() - t_all:.0f} s", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
