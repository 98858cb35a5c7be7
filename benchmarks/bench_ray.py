"""Rescoring throughput on Ray (`rescore --ray`) against the one-process path.

A stored run of the default model (random token ids: --parts parts of --sequences
completions of --prompt + --response tokens) is re-scored three times, each in a fresh
process: by `rescore` in one process with one torch thread, then by `rescore --ray` with 1
and with 2 CPU workers (one torch thread each, a local Ray started by the command). The
throughput is training-side tokens per second of the scoring phase (run.json's
`timings_s.rescore`: for Ray the driver's loop, from the first shard handed out to the
last part written, so it includes Ray's scheduling and the parts' reads and writes; the
actors' start-up and model load are `train_load`, reported beside it with the end-to-end
wall time). Targets (issue 22): 2 workers >= 1.6x one process, 1 worker >= 0.9x.

    python benchmarks/bench_ray.py [--parts 8] [--sequences 4] [--prompt 48] [--response 128]
        [--large]   16 parts of 8 completions (make bench-large)

The three runs' token tables are compared too (they must be equal). Measured on the shared
2-core CPU: docs/gpu.md ("Ray").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's package, not whichever one is installed

try:
    from benchmarks.common import run_child
except ImportError:  # run as a script from benchmarks/
    from common import run_child

K = 20


def make_source(path: Path, model: Path, args: argparse.Namespace) -> int:
    """A complete run of `model` over random tokens, `args.parts` parts of
    `args.sequences` completions (chunk_prompts = sequences, one sample each), whose
    logp_train is NaN (only its rollouts are read by `rescore`). Returns its tokens."""
    import pandas as pd

    from mismatch_cli.models import weights_hash
    from mismatch_cli.runs import new_meta, token_frame, write_run

    cfg_json = json.loads((model / "config.json").read_text())
    V = int(cfg_json["vocab_size"])
    rng = np.random.default_rng(0)
    S, T = args.parts * args.sequences, args.response
    seqs = pd.DataFrame(
        {
            "seq_id": np.arange(S, dtype=np.int64),
            "prompt_id": np.arange(S, dtype=np.int64),
            "sample_idx": np.zeros(S, np.int32),
            "prompt_token_ids": [
                rng.integers(3, V, args.prompt).astype(np.int32) for _ in range(S)
            ],
            "response_token_ids": [rng.integers(3, V, T).astype(np.int32) for _ in range(S)],
            "finish_reason": "length",
            "text": "",
        }
    )
    n = S * T
    tokens = token_frame(
        {
            "seq_id": np.repeat(seqs["seq_id"].to_numpy(), T),
            "prompt_id": np.repeat(seqs["prompt_id"].to_numpy(), T),
            "sample_idx": np.zeros(n, np.int32),
            "pos": np.tile(np.arange(T, dtype=np.int32), S),
            "token_id": np.concatenate(seqs["response_token_ids"].to_list()),
            "logp_infer": np.full(n, -3.0),
            "logp_train": np.full(n, np.nan),
            "topk_ids_infer": list(rng.integers(3, V, (n, K)).astype(np.int32)),
            "topk_logp_infer": list(np.full((n, K), -4.0, np.float32)),
        }
    )
    cfg = {"model": str(model), "temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
           "infer_engine": "vllm", "infer_dtype": "bfloat16", "train_dtype": "float32",
           "attn_implementation": "eager", "top_logprobs": K, "chunk_prompts": args.sequences,
           "rescore_batch_tokens": 4096, "device": "cpu", "samples_per_prompt": 1}  # fmt: skip
    meta = new_meta(
        "measure",
        config=cfg,
        sampling={k: cfg[k] for k in ("temperature", "top_p", "top_k", "min_p")},
        model={"name": model.name, "path": str(model), "weights_sha256": weights_hash(str(model))},
        engines={"infer": {"engine": "vllm", "dtype": "bfloat16"},
                 "train": {"engine": "transformers", "dtype": "float32",
                           "attn_implementation": "eager"}},
    )  # fmt: skip
    write_run(path, tokens, seqs, meta)
    return n


def rescore(src: Path, out: Path, label: str, ray_workers: int | None) -> dict:
    """One `mismatch rescore` in a fresh process (one torch thread for the one-process
    path; each Ray worker sets its own); what its run.json says of the scoring."""
    cmd = [sys.executable, "-m", "mismatch_cli", "rescore", str(src), "--out", str(out)]
    if ray_workers is not None:
        cmd += ["--ray", "--workers", str(ray_workers)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if ray_workers is None:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    old = dict(os.environ)
    os.environ.update(env)  # run_child hands the child this process's environment
    try:
        child = run_child(cmd, label, cwd=ROOT)
    finally:
        os.environ.clear()
        os.environ.update(old)
    meta = json.loads((out / "run.json").read_text())
    t = meta["timings_s"]
    return {
        "label": label,
        "tokens": int(meta["summary"]["num_tokens"]),
        "rescore_s": float(t["rescore"]),
        "load_s": float(t.get("train_load", 0.0)),
        "wall_s": child.wall,
        "workers": [
            (w["worker"], w.get("tokens_per_s"), w.get("torch_threads"))
            for w in (meta.get("ray") or {}).get("workers", [])
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", type=int, default=8)
    ap.add_argument("--sequences", type=int, default=4, help="completions per part")
    ap.add_argument("--prompt", type=int, default=48)
    ap.add_argument("--response", type=int, default=128)
    ap.add_argument("--model", default=None, help="a model folder (default: the default model)")
    ap.add_argument("--large", action="store_true", help="16 parts of 8 (make bench-large)")
    args = ap.parse_args()
    if args.large:
        args.parts, args.sequences = 16, 8

    from mismatch_cli.models import provision_default_model
    from mismatch_cli.runs import read_tokens

    model = Path(args.model) if args.model else provision_default_model(quiet=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        n = make_source(tmp / "src", model, args)
        print(f"{n:,} tokens: {args.parts} parts x {args.sequences} x ({args.prompt} + "
              f"{args.response}) tokens, {model.name}, {os.cpu_count()} cores")  # fmt: skip
        rows = [
            rescore(tmp / "src", tmp / "one", "one process, 1 thread", None),
            rescore(tmp / "src", tmp / "ray1", "ray, 1 worker", 1),
            rescore(tmp / "src", tmp / "ray2", "ray, 2 workers", 2),
        ]
        base = rows[0]["tokens"] / rows[0]["rescore_s"]
        print(f"{'path':<24}{'tokens/s':>10}{'x one':>8}{'scoring s':>11}{'load s':>8}"
              f"{'wall s':>8}  per worker tokens/s")  # fmt: skip
        for r in rows:
            rate = r["tokens"] / r["rescore_s"]
            per = ", ".join(f"w{w} {v:.0f} ({th} thr)" for w, v, th in r["workers"] if v)
            print(f"{r['label']:<24}{rate:>10.1f}{rate / base:>7.2f}x{r['rescore_s']:>11.1f}"
                  f"{r['load_s']:>8.1f}{r['wall_s']:>8.1f}  {per}")  # fmt: skip
        one = read_tokens(tmp / "one")
        same = all(read_tokens(tmp / k).equals(one) for k in ("ray1", "ray2"))
        print(f"token tables identical to the one-process rescore: {'yes' if same else 'NO'}")
        r1 = rows[1]["tokens"] / rows[1]["rescore_s"] / base
        r2 = rows[2]["tokens"] / rows[2]["rescore_s"] / base
        print(f"ratios: 1 worker {r1:.2f}x (target >= 0.9x), 2 workers {r2:.2f}x (target >= 1.6x)")
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        print(f"load average at the end (1, 5, 15 min): {load} on {os.cpu_count()} cores "
              "(other processes take the cores the workers need)")  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
