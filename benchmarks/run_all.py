"""Run every benchmark, one after the other (`make bench`). Each prints ratios measured in
one run; nothing here is part of the test suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["bench_rescore.py", "bench_generate.py", "bench_report.py", "bench_corrections.py"]


def main() -> int:
    rc = 0
    for name in BENCHES:
        print(f"== {name}", flush=True)
        rc |= subprocess.call([sys.executable, str(HERE / name)], cwd=HERE.parent)
    return rc


if __name__ == "__main__":
    sys.exit(main())
