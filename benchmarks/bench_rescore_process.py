"""The user-visible form of the rescoring target: the whole `mismatch rescore RUN --out NEW`
process (load, score, write) against a bare script that loads the same model and runs
forward + log_softmax + gather over the same sequences in padded batches of <= 4096 tokens.
Target: bare / ours >= 0.85.

Both are fresh processes, run alternately `--repeats` times (medians). RUN defaults to a
small run measured here first (16 prompts x 2 samples x 64 tokens with the default model,
a couple of minutes on a 2-core CPU); pass an existing run to skip that.

    .venv/bin/python benchmarks/bench_rescore_process.py [RUN] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    from benchmarks.common import run_child
except ImportError:  # run as a script from benchmarks/
    from common import run_child

ROOT = Path(__file__).resolve().parents[1]

# What a trainer minimally does with the same sequences: no sampling replay, no statistics.
BARE = r"""
import sys, torch, pyarrow.parquet as pq
from transformers import AutoModelForCausalLM
torch.set_grad_enabled(False)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32,
                                             attn_implementation="eager").eval()
t = pq.read_table(sys.argv[2], columns=["prompt_token_ids", "response_token_ids"]).to_pylist()
seqs = [(r["prompt_token_ids"], r["response_token_ids"]) for r in t]
budget, batch, out = 4096, [], []
def run(batch):
    L = max(len(p) + len(r) for p, r in batch)
    ids = torch.zeros(len(batch), L, dtype=torch.long)
    mask = torch.zeros(len(batch), L, dtype=torch.long)
    for i, (p, r) in enumerate(batch):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        mask[i, : len(p) + len(r)] = 1
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    for i, (p, r) in enumerate(batch):
        pos = torch.arange(len(p) - 1, len(p) + len(r) - 1)
        out.append(logp[i, pos].gather(1, torch.tensor(r)[:, None])[:, 0])
for s in seqs:
    if batch and max(len(p) + len(r) for p, r in batch + [s]) * (len(batch) + 1) > budget:
        run(batch)
        batch = []
    batch.append(s)
if batch:
    run(batch)
print(sum(len(x) for x in out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", type=Path, help="a complete run (default: measure one)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from mismatch_cli.models import provision_default_model

    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="bench-rescore-process-") as tmp:
        run = args.run
        if run is None:
            run = Path(tmp) / "run"
            t0 = time.perf_counter()
            run_child([py, "-m", "mismatch_cli", "measure", "--num-prompts", "16",
                   "--samples-per-prompt", "2", "--max-tokens", "64", "--enforce-eager",
                   "--no-plots", "--out", str(run)], "measure", ROOT)  # fmt: skip
            print(f"measured a run in {time.perf_counter() - t0:.0f} s: {run}")
        model = str(provision_default_model())
        cmds = {
            "bare forward+log_softmax+gather": [py, "-c", BARE, model, str(run / "sequences.parquet")],
            "mismatch rescore RUN --out NEW": [py, "-m", "mismatch_cli", "rescore", str(run)],
        }  # fmt: skip
        times: dict[str, list[float]] = {k: [] for k in cmds}
        for i in range(args.repeats):
            for k, cmd in cmds.items():
                out = ["--out", str(Path(tmp) / f"new-{i}")] if "rescore" in k else []
                times[k].append(run_child([*cmd, *out], k, ROOT).wall)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"  {k:32s} median {v:6.1f} s of {args.repeats}")
    ratio = med["bare forward+log_softmax+gather"] / med["mismatch rescore RUN --out NEW"]
    print(
        f"  bare / rescore = {ratio:.3f}  (target >= 0.85: {'met' if ratio >= 0.85 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
