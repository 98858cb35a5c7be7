"""Benchmark `mismatch report` on a synthetic 10-million-token run.

Builds the run directly with numpy (only the columns `report` reads, plus run.json), then
runs `python -m mismatch_cli report RUN` (tables) and `... --json` in fresh processes and
prints their wall time and peak resident memory. Target: < 30 s and < 4 GB on 2 cores.

    .venv/bin/python benchmarks/bench_report.py [--tokens 10000000] [--keep DIR]
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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mismatch_cli.analysis import REQUIRED_COLUMNS  # noqa: E402


def build_run(path: Path, num_tokens: int, eps: float = 0.1, seed: int = 0) -> None:
    """A run whose deltas follow the (1 - p) shape: |delta| <= 2 eps (1 - p), signed noise,
    a few kept-set disagreements (infinite delta), mean completion length 256."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(16, 497, size=num_tokens // 256 + 2)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), num_tokens) + 1]
    lengths[-1] -= lengths.sum() - num_tokens  # exactly num_tokens
    seq_id = np.repeat(np.arange(lengths.size, dtype=np.int64), lengths)  # [N]
    # p_train: most tokens confident, a long tail down to 1e-8.
    logp_train = -rng.exponential(1.0, num_tokens) * rng.choice([0.05, 2.0, 8.0], num_tokens)
    p_train = np.exp(logp_train)
    delta = 2 * eps * (1 - p_train) * rng.uniform(-1, 1, num_tokens) + 0.002 * (1 - p_train)
    p_infer = np.minimum(p_train * np.exp(delta), 1.0)
    kept = rng.random(num_tokens) > 1e-5
    delta[~kept] = np.inf
    table = pa.table(
        {
            "seq_id": seq_id,
            "delta": delta,
            "p_train": np.where(kept, p_train, 0.0),
            "p_infer": p_infer,
            "eps_hat": rng.uniform(0.5 * eps, eps, num_tokens),
            "kept_train": kept,
        }
    )
    assert set(table.column_names) == set(REQUIRED_COLUMNS)
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path / "tokens.parquet", compression="zstd")
    meta = {
        "format_version": 1,
        "status": "complete",
        "model": {"name": "bench-synthetic"},
        "config": {
            "infer_engine": "synthetic",
            "infer_dtype": "bfloat16",
            "train_dtype": "float32",
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": -1,
            "min_p": 0.0,
        },
        "summary": {"num_tokens": num_tokens, "num_sequences": int(lengths.size)},
    }
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
    args = ap.parse_args()
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
