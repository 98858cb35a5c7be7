#!/usr/bin/env bash
# GPU smoke test of mismatch, end to end on the default model (a few minutes on one GPU):
#   1. measure, vLLM bf16 vs transformers bf16 on --device cuda
#   2. measure, vLLM bf16 vs transformers fp32 on --device cuda
#   3. diagnose on --device cuda, when this checkout has the command (skipped otherwise)
#   4. diagnose --all on --device cuda: every variant of the matrix this GPU (and this vLLM
#      build) can run, the CUDA-only ones included (attention backends, fp8 KV cache, FP8
#      weights, batch-invariant modes, TF32; tensor parallel 2 with two GPUs); the matrix
#      (`diagnose --list --json`) is saved beside it, and the variants skipped are printed
# and prints one table row per step: exit code, wall time, tokens, mean |delta|, k3, devices.
#
#   scripts/gpu_smoke.sh [OUT_DIR]        (default: a temporary folder, kept and printed)
#   PYTHON=/path/to/python scripts/gpu_smoke.sh
#
# On a machine without a CUDA GPU it refuses with one line and exit code 2.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_smoke: no GPU here (nvidia-smi finds none); run it on a machine with a CUDA GPU" >&2
    exit 2
fi
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_smoke: no GPU visible to torch in $PY (CPU build of torch?); install the gpu extra" >&2
    exit 2
fi

OUT=${1:-$(mktemp -d -t mismatch-gpu-smoke-XXXXXX)}
mkdir -p "$OUT"
SIZE=(--num-prompts 16 --samples-per-prompt 2 --max-tokens 128)
echo "gpu_smoke: runs and logs in $OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu: /'

step() {  # step NAME CMD...: run, log, record exit code and wall seconds
    local name=$1
    shift
    local t0=$SECONDS
    echo ">> $name: $*"
    "$@" >"$OUT/$name.log" 2>&1
    echo "$name $? $((SECONDS - t0))" >>"$OUT/steps.txt"
}

: >"$OUT/steps.txt"
step train-bf16 "$PY" -m mismatch_cli measure default --device cuda --train-dtype bfloat16 \
    "${SIZE[@]}" --no-plots --overwrite --out "$OUT/train-bf16"
step train-fp32 "$PY" -m mismatch_cli measure default --device cuda --train-dtype float32 \
    "${SIZE[@]}" --no-plots --overwrite --out "$OUT/train-fp32"
if "$PY" -m mismatch_cli diagnose --help >/dev/null 2>&1; then
    step diagnose "$PY" -m mismatch_cli diagnose default --device cuda \
        --num-prompts 8 --samples-per-prompt 2 --max-tokens 64 --out "$OUT/diagnose"
else
    echo "diagnose skip 0" >>"$OUT/steps.txt"
fi
if "$PY" -m mismatch_cli diagnose --help 2>/dev/null | grep -q -- "--all"; then
    "$PY" -m mismatch_cli diagnose --list --json >"$OUT/matrix.json" 2>"$OUT/matrix.log"
    step diagnose-all "$PY" -m mismatch_cli diagnose default --device cuda --all --no-html \
        --num-prompts 8 --samples-per-prompt 2 --max-tokens 64 --out "$OUT/diagnose-all"
else
    echo "diagnose-all skip 0" >>"$OUT/steps.txt"
fi

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mismatch_cli.metrics import k3

out = Path(sys.argv[1])
print(f"\n{'step':12s} {'exit':>4s} {'wall s':>7s} {'tokens':>7s} {'mean|d|':>9s} {'k3':>9s}  devices")
bad = 0
for line in (out / "steps.txt").read_text().splitlines():
    name, rc, wall = line.split()
    tokens = mean = k3_ = "-"
    devices = ""
    run = out / name
    if rc == "0" and (run / "tokens.parquet").is_file():
        d = pq.read_table(run / "tokens.parquet", columns=["delta"])["delta"].to_numpy()
        d = d[np.isfinite(d)]
        tokens, mean = str(len(d)), f"{np.abs(d).mean():.4f}"
        k3_ = f"{k3(d):.2e}"
        meta = json.loads((run / "run.json").read_text())
        eng = meta.get("engines", {})
        devices = (f"infer {eng.get('infer', {}).get('dtype')} / train "
                   f"{eng.get('train', {}).get('dtype')} on {meta['hardware'].get('train_device')}")
    elif rc == "0" and name == "diagnose":
        devices = "ok (see diagnose.log)"
    elif rc == "0" and name == "diagnose-all":
        res = json.loads((run / "diagnose.json").read_text())
        ran = [v["name"] for v in res["variants"] if v["run"]]
        skipped = {v["name"]: v["skipped"] for v in res["variants"] if v["skipped"]}
        devices = f"{len(ran)} variants ran, {len(skipped)} skipped"
        for n, why in skipped.items():
            print(f"  diagnose-all skipped {n}: {why}")
    elif rc == "skip":
        devices = "skipped: no such diagnose option in this checkout"
    else:
        devices = f"FAILED: see {out / (name + '.log')}"
        bad += 1
    print(f"{name:12s} {rc:>4s} {wall:>7s} {tokens:>7s} {mean:>9s} {k3_:>9s}  {devices}")
sys.exit(1 if bad else 0)
EOF
