"""Benchmark `mismatch report` on a synthetic 10-million-token run (under a minute on a
2-core CPU); `--large` (`make bench-large`) builds 100 million tokens.

Builds the run directly with numpy (only the columns `report` reads, plus run.json), then
runs `python -m mismatch_cli report RUN` (tables) and `... --json` in fresh processes and
prints their wall time and peak resident memory. Target: < 30 s and < 4 GB on 2 cores.

    .venv/bin/python benchmarks/bench_report.py [--tokens 10000000] [--keep DIR] [--large]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mismatch_cli.synthetic import bulk_token_columns, synthetic_meta  # noqa: E402
from mismatch_cli.tokens import REQUIRED_COLUMNS  # noqa: E402


def build_run(path: Path, num_tokens: int, eps: float = 0.1, chunk: int = 5_000_000) -> None:
    """A run of `num_tokens` synthetic tokens (synthetic.bulk_token_columns: the columns
    `report` reads), generated and written chunk by chunk (bounded memory)."""
    path.mkdir(parents=True, exist_ok=True)
    writer, first_seq, num_seqs = None, 0, 0
    for i, start in enumerate(range(0, num_tokens, chunk)):
        cols = bulk_token_columns(min(chunk, num_tokens - start), first_seq, eps, seed=i)
        table = pa.table(cols)
        assert set(table.column_names) == set(REQUIRED_COLUMNS)
        if writer is None:
            writer = pq.ParquetWriter(path / "tokens.parquet", table.schema, compression="zstd")
        writer.write_table(table)
        first_seq = int(cols["seq_id"][-1]) + 1
        num_seqs = first_seq
    if writer is not None:
        writer.close()
    meta = synthetic_meta(summary={"num_tokens": num_tokens, "num_sequences": num_seqs})
    meta["status"] = "complete"
    (path / "run.json").write_text(json.dumps(meta))


def timed(cmd: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall seconds and peak RSS (GB) of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ)
    wall = time.perf_counter() - t0
    # ru_maxrss of RUSAGE_CHILDREN is the largest child so far (KiB on Linux).
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    return wall, peak, proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=10_000_000)
    ap.add_argument("--keep", type=Path, default=None, help="build the run here and keep it")
    ap.add_argument("--large", action="store_true", help="100 million tokens")
    args = ap.parse_args()
    if args.large:
        args.tokens = 100_000_000
    tmp = None
    if args.keep is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-report-")
        run = Path(tmp.name) / "run"
    else:
        run = args.keep
    t0 = time.perf_counter()
    build_run(run, args.tokens)
    print(f"built {args.tokens:,}-token run in {time.perf_counter() - t0:.1f} s at {run}")
    print(f"cores available: {len(os.sched_getaffinity(0))}")
    py = sys.executable
    for label, extra in (("report --json", ["--json"]), ("report (tables)", [])):
        wall, peak, proc = timed([py, "-m", "mismatch_cli", "report", str(run), *extra])
        if proc.returncode != 0:
            print(proc.stderr)
            raise SystemExit(f"{label} failed with exit code {proc.returncode}")
        print(f"{label:16s} {wall:6.1f} s   peak RSS {peak:.2f} GB (max over children so far)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
