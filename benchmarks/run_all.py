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
# bench_import at 2M tokens here (~1 minute); the 20M-token target: bench_import.py alone
BENCHES = [
    "bench_rescore.py",
    "bench_ray.py",  # rescore --ray with 1 and 2 workers against one process
    "bench_generate.py",
    "bench_report.py",
    "bench_real_shape.py",  # a real run replicated to 10^7 rows (--large: 10^8)
    "bench_import.py --tokens 2000000 --steps 4",
    "bench_corrections.py",
    "bench_monitor.py",
    "bench_watch.py --tokens 200000 --repeats 1",
]
# --large: each benchmark's large size (those without a --large flag get explicit sizes)
LARGE = {
    "bench_import.py": ["--tokens", "20000000", "--steps", "10"],
    "bench_corrections.py": ["--large"],  # 100M tokens: sweep ~65 s and corrections ~205 s, < 2 GB
    "bench_monitor.py": ["--large"],  # 8 x 512 tokens
    "bench_watch.py": ["--tokens", "1000000", "--repeats", "3"],  # the 1M-token step
}


def main(argv: list[str]) -> int:
    extra = ["--large"] if "--large" in argv else []
    rc = 0
    t_all = time.perf_counter()
    for entry in BENCHES:
        name, *args = entry.split()
        args = LARGE.get(name, [*args, *extra]) if extra else args
        print(f"== {name} {' '.join(args)}".rstrip(), flush=True)
        t0 = time.perf_counter()
        rc |= subprocess.call([sys.executable, str(HERE / name), *args], cwd=HERE.parent)
        print(f"== {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"== all benchmarks: {time.perf_counter() - t_all:.0f} s", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
