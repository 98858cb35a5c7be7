"""Benchmark `mismatch report`, `plot` and `compare` on a synthetic 10-million-token run
(a few minutes on a 2-core CPU); `--large` (`make bench-large`) builds 100 million tokens.

Builds the run directly with numpy (the columns `report` reads, plus pos, token_id and both
log-probs for `compare`'s token-by-token movement, and run.json), then runs in fresh
processes `python -m mismatch_cli report RUN` (tables) and `... --json`, `plot RUN` (the
figures drawn from the token table: bound, bias, sequence, distribution) and `compare RUN
RUN` (the run against itself: two report scans and the row-aligned `moved` pass) and
`report RUN --html PAGE` (the report page: the report, sweep and corrections passes and every
figure, inline), and prints
each one's wall time, CPU time and its own peak resident memory (os.wait4). All three stream
the table: memory does not grow with the run. Target for report: < 30 s and < 4 GB on 2
cores. `report --json` is also timed against a bare pyarrow scan of the columns it needs
(another fresh process that reads them batch by batch and does nothing else), alternately,
`--repeats` times: the ratio of the medians (target <= 4x).

    .venv/bin/python benchmarks/bench_report.py [--tokens 10000000] [--keep DIR] [--large]
        [--skip plot,compare] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:
    from benchmarks.common import run_child
except ImportError:  # run as a script from benchmarks/
    from common import run_child
from mismatch_cli.synthetic import bulk_token_columns, synthetic_meta  # noqa: E402
from mismatch_cli.tokens import REQUIRED_COLUMNS  # noqa: E402


def build_run(path: Path, num_tokens: int, eps: float = 0.1, chunk: int = 5_000_000) -> None:
    """A run of `num_tokens` synthetic tokens (synthetic.bulk_token_columns: the columns
    `report` reads; plus pos, token_id, logp_train and logp_infer, which `compare` reads),
    generated and written chunk by chunk (bounded memory)."""
    path.mkdir(parents=True, exist_ok=True)
    writer, first_seq, num_seqs = None, 0, 0
    for i, start in enumerate(range(0, num_tokens, chunk)):
        cols = bulk_token_columns(min(chunk, num_tokens - start), first_seq, eps, seed=i)
        cols.update(move_columns(cols, seed=i))
        table = pa.table(cols)
        assert set(REQUIRED_COLUMNS) <= set(table.column_names)
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


def move_columns(cols: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """pos (0, 1, ... within each sequence), token_id and the log-probs behind delta and
    p_train: what `compare.moved` reads. [n] each"""
    sid = cols["seq_id"]
    starts = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]])  # [k]
    pos = np.arange(sid.size) - np.repeat(starts, np.diff(np.r_[starts, sid.size]))
    with np.errstate(divide="ignore", invalid="ignore"):
        logp_train = np.log(cols["p_train"])  # -inf where the token is pruned
        logp_infer = np.where(np.isfinite(cols["delta"]), logp_train + cols["delta"], 0.0)
    rng = np.random.default_rng(10_000 + seed)
    return {
        "pos": pos.astype(np.int32),
        "token_id": rng.integers(0, 150_000, sid.size, dtype=np.int32),
        "logp_train": logp_train,
        "logp_infer": logp_infer,
    }


# the columns `report` needs (analysis.NEEDED_COLUMNS, eps_hat, kept_train), for the bare scan
SCAN_COLUMNS = ["seq_id", "delta", "p_train", "p_infer", "eps_hat", "kept_train"]
BARE_SCAN = """
import sys, pyarrow.parquet as pq
f = pq.ParquetFile(sys.argv[1])
n = sum(b.num_rows for b in f.iter_batches(batch_size=1 << 20, columns=sys.argv[2].split(",")))
print(n)
"""


def scan_ratio(run: Path, repeats: int) -> None:
    """Median wall time of `report RUN --json` (the whole process) over that of a bare
    pyarrow scan of the columns it needs, run alternately `repeats` times."""
    py = sys.executable
    cmds = {
        "bare pyarrow scan": [
            py,
            "-c",
            BARE_SCAN,
            str(run / "tokens.parquet"),
            ",".join(SCAN_COLUMNS),
        ],
        "report --json": [py, "-m", "mismatch_cli", "report", str(run), "--json"],
    }
    times: dict[str, list[float]] = {k: [] for k in cmds}
    peaks: dict[str, float] = {}
    for _ in range(repeats):
        for k, cmd in cmds.items():
            r = run_child(cmd, k, ROOT)
            times[k].append(r.wall)
            peaks[k] = max(peaks.get(k, 0.0), r.peak_gb)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:18s} median {v:6.1f} s of {repeats}, peak RSS {peaks[k]:.2f} GB")
    ratio = med["report --json"] / med["bare pyarrow scan"]
    print(f"report / bare scan = {ratio:.2f}x (target <= 4x: {'met' if ratio <= 4 else 'NOT met'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=10_000_000)
    ap.add_argument("--keep", type=Path, default=None, help="build the run here and keep it")
    ap.add_argument("--large", action="store_true", help="100 million tokens")
    ap.add_argument("--skip", default="", help="comma-separated: report, plot, compare")
    ap.add_argument("--repeats", type=int, default=None, help="bare scan vs report (3; 1 --large)")
    args = ap.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
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
    figures = [a for f in ("bound", "bias", "sequence", "distribution") for a in ("--figure", f)]
    out = run.parent / f"{run.name}-figures"
    commands = [
        ("report --json", ["report", str(run), "--json"]),
        ("report (tables)", ["report", str(run)]),
        ("plot", ["plot", str(run), "--out", str(out), *figures]),
        ("compare RUN RUN", ["compare", str(run), str(run), "--json"]),
        ("report --html", ["report", str(run), "--html", str(run.parent / "page.html")]),
    ]
    try:
        scan_ratio(run, args.repeats or (1 if args.large else 3))
        for label, cmd in commands:
            if label.split()[0] in skip:
                continue
            r = run_child([py, "-m", "mismatch_cli", *cmd], label, ROOT)
            print(
                f"{label:16s} {r.wall:6.1f} s wall, {r.cpu:6.1f} s CPU, peak RSS {r.peak_gb:.2f} GB"
            )
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
