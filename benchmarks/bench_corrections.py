"""Benchmark `mismatch corrections` on a synthetic 10-million-token run.

Builds the run directly with numpy, chunk by chunk: the columns `report` reads
(`synthetic.bulk_token_columns`), plus what the corrections read on top of them:
`p_max_train` and the pruned-mass grid of both rules (24 float32 values per token each, so
the DVP rows run the real sweep), and `step` / `advantage` as an imported run has them.
Then runs `python -m mismatch_cli corrections RUN --json` (and, with --tables, `... RUN`)
in a fresh process and prints its wall time and peak resident memory. Target: < 30 s and
< 4 GB. Building the run takes about as long as the command (2.2 GB of Parquet).

    .venv/bin/python benchmarks/bench_corrections.py [--tokens 10000000] [--keep DIR] [--tables]
"""

from __future__ import annotations

import argparse
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

from mismatch_cli.runs import atomic_write_json  # noqa: E402
from mismatch_cli.schema import RHO_GRID  # noqa: E402
from mismatch_cli.synthetic import bulk_token_columns, synthetic_meta  # noqa: E402

TOKENS_PER_STEP = 1_000_000


def grid_column(values: np.ndarray) -> pa.ListArray:
    """A list<float32> column of G values per token from a [n, G] array."""
    n, g = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * g, g, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1).astype(np.float32)))


def extra_columns(cols: dict[str, np.ndarray], first_token: int, seed: int) -> dict:
    """p_max_train, both pruned-mass grids (monotone in rho, <= 1 - p_max), step, advantage."""
    rng = np.random.default_rng(10_000 + seed)
    p = cols["p_train"]
    n = p.size
    p_max = np.maximum(p, rng.uniform(0.3, 1.0, n))  # [n]
    rho = np.asarray(RHO_GRID, dtype=np.float64)  # [G]
    tail = (1 - p_max)[:, None]  # [n, 1]
    m_minp = tail * np.minimum(1.0, (rho[None, :] / 0.5) ** 0.35)  # [n, G]
    m_abs = tail * np.minimum(1.0, (rho[None, :] / 0.3) ** 0.3)  # [n, G]
    tok = first_token + np.arange(n)
    seq = cols["seq_id"]
    return {
        "p_max_train": p_max,
        "pruned_mass_minp": grid_column(m_minp),
        "pruned_mass_abs": grid_column(m_abs),
        "step": (tok // TOKENS_PER_STEP).astype(np.int64),
        "advantage": rng.normal(0, 1, int(seq.max() - seq.min()) + 1)[seq - seq.min()],
    }


def build_run(path: Path, num_tokens: int, eps: float = 0.1, chunk: int = 1_000_000) -> None:
    """A run of `num_tokens` synthetic tokens written chunk by chunk (bounded memory)."""
    path.mkdir(parents=True, exist_ok=True)
    writer, first_seq = None, 0
    for i, start in enumerate(range(0, num_tokens, chunk)):
        cols = bulk_token_columns(min(chunk, num_tokens - start), first_seq, eps, seed=i)
        cols.update(extra_columns(cols, start, i))
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


def timed(cmd: list[str]) -> tuple[float, float, float, subprocess.CompletedProcess]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (GB) of a child process.
    CPU time says what the wall time would be on an idle machine (2 shared cores here)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    # ru_maxrss of RUSAGE_CHILDREN is the largest child so far (KiB on Linux).
    return wall, cpu, after.ru_maxrss / 1024**2, proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=10_000_000)
    ap.add_argument("--keep", type=Path, default=None, help="build the run here and keep it")
    ap.add_argument("--tables", action="store_true", help="also time the table output")
    args = ap.parse_args()
    tmp = None
    if args.keep is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-corrections-")
        run = Path(tmp.name) / "run"
    else:
        run = args.keep
    if not (run / "run.json").is_file():
        t0 = time.perf_counter()
        build_run(run, args.tokens)
        size = (run / "tokens.parquet").stat().st_size / 1e9
        print(
            f"built {args.tokens:,}-token run ({size:.2f} GB) in {time.perf_counter() - t0:.1f} s"
        )
    print(f"run: {run}; cores available: {len(os.sched_getaffinity(0))}")
    py = sys.executable
    runs = [("corrections --json", ["--json"])] + (
        [("corrections (tables)", [])] if args.tables else []
    )
    for label, extra in runs:
        wall, cpu, peak, proc = timed([py, "-m", "mismatch_cli", "corrections", str(run), *extra])
        if proc.returncode != 0:
            print(proc.stderr)
            raise SystemExit(f"{label} failed with exit code {proc.returncode}")
        print(
            f"{label:22s} {wall:6.1f} s wall, {cpu:6.1f} s CPU   peak RSS {peak:.2f} GB "
            f"(max over children so far); load average {os.getloadavg()[0]:.1f}"
        )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
