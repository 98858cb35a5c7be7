"""Benchmark `mismatch import prime-rl` on a synthetic token export of N model tokens.

Writes a prime-rl `token_exports/step_N/rank_R.jsonl` tree chunk by chunk into a temporary
folder (every key prime-rl writes, null arrays included; prompts of 64-256 context tokens,
completions of 64-512 loss-masked tokens, 4 ranks per step, STABLE markers; the first
step's records are generated, later steps repeat them under their own step number, which
keeps generation fast and changes nothing for the reader), then runs
`python -m mismatch_cli import prime-rl DIR --out RUN --json` in a fresh process and prints
its wall time and peak resident memory (target < 4 GB: memory is bounded by one block of
the file and one part of the run, not by the run). Then `report --group-by step` on it.

    .venv/bin/python benchmarks/bench_import.py [--tokens 20000000] [--steps 10] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    from benchmarks.common import run_child
except ImportError:  # run as a script from benchmarks/
    from common import run_child

ROOT = Path(__file__).resolve().parents[1]
NULL_KEYS = (
    "is_masked",
    "is_masked_high",
    "is_masked_low",
    "rl_weights",
    "ce_weights",
    "ref_kl_weights",
)


def _floats(a: np.ndarray) -> str:
    return json.dumps(a.tolist())


def write_export(root: Path, num_tokens: int, steps: int, ranks: int = 4, seed: int = 0) -> int:
    """A prime-rl export with `num_tokens` loss-masked tokens over `steps` steps; returns the
    bytes written. One record per sample, as prime-rl writes them."""
    rng = np.random.default_rng(seed)
    per_file = num_tokens // (steps * ranks) + 1
    written = done = 0
    for step in range(1, steps + 1):
        d = root / "token_exports" / f"step_{step}"
        d.mkdir(parents=True, exist_ok=True)
        for rank in range(ranks):
            left = min(per_file, num_tokens - done)
            first = root / "token_exports" / "step_1" / f"rank_{rank}.jsonl"
            if step > 1 and left == per_file:  # repeat step 1 under this step's number
                with open(first, "rb") as src, open(d / f"rank_{rank}.jsonl", "wb") as f:
                    for line in src:
                        f.write(line.replace(b'"step":1,', f'"step":{step},'.encode(), 1))
                        written += len(line)
                done += left
                continue
            with open(d / f"rank_{rank}.jsonl", "w") as f:
                k = 0
                while left > 0:
                    rec, R = _record(rng, step, rank, k, left)
                    f.write(rec)
                    written += len(rec)
                    left -= R
                    done += R
                    k += 1
        (d / "STABLE").touch()
    return written


def _record(rng: np.random.Generator, step: int, rank: int, k: int, left: int) -> tuple[str, int]:
    """One prime-rl record (one sample) and its number of loss-masked tokens."""
    P = int(rng.integers(64, 257))
    R = int(min(rng.integers(64, 513), left))
    n = P + R
    lt = -rng.exponential(1.0, n) * rng.choice([0.05, 2.0], n)  # [n] trainer
    li = lt + 0.05 * (1 - np.exp(lt)) * rng.uniform(-1, 1, n)  # [n] inference
    li[:P] = 0.0
    null = "[" + ",".join(["null"] * n) + "]"
    rec = (
        f'{{"schema_version":1,"step":{step},"rank":{rank},"micro_step":{k // 8},'
        f'"micro_sequence_idx":{k % 8},"export_sequence_idx":{k},"env_name":"env{k % 3}",'
        f'"token_ids":{json.dumps(rng.integers(0, 150_000, n).tolist())},'
        f'"position_ids":{json.dumps(list(range(n)))},'
        f'"loss_mask":{json.dumps([False] * P + [True] * R)},'
        f'"advantages":{json.dumps([0.5] * n)},'
        f'"inference_logprobs":{_floats(li)},"trainer_logprobs":{_floats(lt)},'
        f'"entropy":{_floats(rng.random(n))},"mismatch_kl":{_floats(np.expm1(li - lt) - (li - lt))},'
        f'"log_importance_ratio":{_floats(lt - li)},"importance_ratio":{_floats(np.exp(lt - li))},'
        f'"prob_delta":{_floats(np.exp(lt) - np.exp(li))},'
        + ",".join(f'"{key}":{null}' for key in NULL_KEYS)
        + "}\n"
    )
    return rec, R


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=20_000_000, help="loss-masked tokens")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--keep", type=Path, default=None, help="write the export and run here")
    args = ap.parse_args()
    tmp = None
    if args.keep is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-import-")
        base = Path(tmp.name)
    else:
        base = args.keep
    t0 = time.perf_counter()
    size = write_export(base / "export", args.tokens, args.steps)
    print(f"wrote a {args.tokens:,}-token prime-rl export ({size / 1e9:.2f} GB of JSON lines, "
          f"{args.steps} steps x 4 ranks) in {time.perf_counter() - t0:.1f} s")  # fmt: skip
    print(f"cores available: {len(os.sched_getaffinity(0))}")
    py = sys.executable
    run = base / "run"
    r = run_child([py, "-m", "mismatch_cli", "import", "prime-rl", str(base / "export"),
                   "--out", str(run), "--json", "--no-html"], "import", ROOT)  # fmt: skip
    res = json.loads(r.stdout)
    print(f"import           {r.wall:6.1f} s   peak RSS {r.peak_gb:.2f} GB   "
          f"{res['num_tokens'] / r.wall / 1e6:.2f} M tokens/s   ({res['num_tokens']:,} tokens, "
          f"{res['num_sequences']:,} completions, {res['num_dropped_tokens']:,} masked)")  # fmt: skip
    cmd = [py, "-m", "mismatch_cli", "report", str(run), "--group-by", "step", "--json"]
    r = run_child(cmd, "report --group-by step", ROOT)
    print(f"report --group-by step {r.wall:6.1f} s   peak RSS {r.peak_gb:.2f} GB")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
