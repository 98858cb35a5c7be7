"""Run every benchmark, one after the other (`make bench`). Each prints ratios measured in
one run; nothing here is part of the test suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# bench_import at 2M tokens here (~1 minute); the 20M-token target: bench_import.py alone
BENCHES = [
    "bench_rescore.py",
    "bench_generate.py",
    "bench_report.py",
    "bench_import.py --tokens 2000000 --steps 4",
    "bench_corrections.py",
]


def main() -> int:
    rc = 0
    for entry in BENCHES:
        name, *args = entry.split()
        print(f"== {entry}", flush=True)
        rc |= subprocess.call([sys.executable, str(HERE / name), *args], cwd=HERE.parent)
    return rc


if __name__ == "__main__":
    sys.exit(main())
