"""Benchmark `mismatch sweep-threshold` and `mismatch corrections` on a synthetic run of 10
million tokens (default) or, with `--large`, 100 million: wall time, CPU time and peak
resident memory of the whole CLI process. Target: < 4 GB at any size (issue 12 §3), and
corrections < 30 s at 10M tokens (issue 11) on an idle 2-core machine.

Builds the run directly with numpy, chunk by chunk (bounded memory): the columns `report`
reads (`synthetic.bulk_token_columns`) plus what the sweep and the corrections read on top
(`synthetic.bulk_grid_columns`): `p_max_train`, the pruned-mass grid of both rules (24
float32 values per token each, ~220 bytes per token on disk, so the DVP rows run the real
sweep), and `step` / `advantage` as an imported run has them. `--no-grid` leaves the grids
out (about 10x smaller on disk; the sweep then has nothing to read and the DVP rows of
`corrections` are skipped): the way to reach 10^8 tokens on a small disk. Each command runs
in a fresh process (`python -m mismatch_cli CMD RUN --json`); its own peak RSS comes from
`os.wait4`.

    .venv/bin/python benchmarks/bench_corrections.py [--tokens 10000000 | --large]
        [--no-grid] [--keep DIR] [--tables] [--only sweep-threshold|corrections]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:
    from benchmarks.common import run_child
except ImportError:  # run as a script from benchmarks/
    from common import run_child
from mismatch_cli.runs import atomic_write_json  # noqa: E402
from mismatch_cli.synthetic import (  # noqa: E402
    bulk_grid_columns,
    bulk_token_columns,
    synthetic_meta,
)

COMMANDS = ("sweep-threshold", "corrections")


def build_run(
    path: Path, num_tokens: int, eps: float = 0.1, chunk: int = 1_000_000, grids: bool = True
) -> None:
    """A run of `num_tokens` synthetic tokens written chunk by chunk (bounded memory)."""
    path.mkdir(parents=True, exist_ok=True)
    writer, first_seq = None, 0
    for i, start in enumerate(range(0, num_tokens, chunk)):
        cols = bulk_token_columns(min(chunk, num_tokens - start), first_seq, eps, seed=i)
        cols.update(bulk_grid_columns(cols, start, i, grids=grids))
        table = pa.table(cols)
        if writer is None:
            writer = pq.ParquetWriter(path / "tokens.parquet", table.schema, compression="zstd")
        writer.write_table(table)
        first_seq = int(cols["seq_id"][-1]) + 1
    if writer is not None:
        writer.close()
    meta = synthetic_meta(summary={"num_tokens": num_tokens, "num_sequences": first_seq})
    meta["status"] = "complete"
    atomic_write_json(path / "run.json", meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=10_000_000)
    ap.add_argument("--large", action="store_true", help="100 million tokens")
    ap.add_argument("--no-grid", action="store_true", help="leave the pruned-mass grids out")
    ap.add_argument("--keep", type=Path, default=None, help="build the run here and keep it")
    ap.add_argument("--tables", action="store_true", help="also time the table output")
    ap.add_argument("--only", choices=COMMANDS, default=None, help="time one command")
    args = ap.parse_args()
    if args.large:
        args.tokens = 100_000_000
    tmp = None
    if args.keep is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-corrections-")
        run = Path(tmp.name) / "run"
    else:
        run = args.keep
    if not (run / "run.json").is_file():
        t0 = time.perf_counter()
        build_run(run, args.tokens, grids=not args.no_grid)
        size = (run / "tokens.parquet").stat().st_size / 1e9
        print(
            f"built {args.tokens:,}-token run ({size:.2f} GB, "
            f"{'no grids' if args.no_grid else 'both grids'}) in {time.perf_counter() - t0:.1f} s"
        )
    has_grid = "pruned_mass_minp" in pq.read_schema(run / "tokens.parquet").names
    num = pq.ParquetFile(run / "tokens.parquet").metadata.num_rows
    print(f"run: {run} ({num:,} tokens); cores available: {len(os.sched_getaffinity(0))}")
    commands = [args.only] if args.only else list(COMMANDS)
    if not has_grid and "sweep-threshold" in commands:
        print("sweep-threshold: skipped (the run has no pruned-mass grid)")
        commands.remove("sweep-threshold")
    py = sys.executable
    for command in commands:
        for extra in (["--json"], *([[]] if args.tables else [])):
            label = f"{command} {' '.join(extra) or '(tables)'}"
            r = run_child([py, "-m", "mismatch_cli", command, str(run), *extra], label, ROOT)
            mode = json.loads(r.stdout).get("quantiles", "?") if extra else ""
            print(
                f"{label:28s} {r.wall:6.1f} s wall, {r.cpu:6.1f} s CPU, peak RSS {r.peak_gb:.2f} GB "
                f"{'[quantiles: ' + mode + ']' if mode else ''} load {os.getloadavg()[0]:.1f}"
            )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
