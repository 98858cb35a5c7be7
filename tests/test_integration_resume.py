"""An interrupted `measure` keeps what it computed, says `incomplete`, and `--resume` finishes
it with exactly the data an uninterrupted run produces (real transformers engine). The
uninterrupted run is the session's `hf_null_run`: the same command (`conftest.HF_NULL`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from .conftest import HF_NULL, ROOT, run_cli

pytestmark = pytest.mark.integration

ARGS = HF_NULL  # 2 chunks: interrupted once the first is written


def test_interrupt_then_resume_equals_an_uninterrupted_run(
    hf_null_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mismatch_cli", "measure", *ARGS, "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # a suite started in the background (`make test &`, nohup) ignores SIGINT, and a
        # Python started with SIGINT ignored never raises KeyboardInterrupt: restore it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    first_part = out / "parts" / "rollout-00000.parquet"
    deadline = time.time() + 300
    while not first_part.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert first_part.exists(), "no chunk was written"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert "--resume" in err
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "incomplete"
    assert not (out / "tokens.parquet").exists()  # nothing that looks final
    assert meta["chunks_done"]["rollout"] >= 1

    # a complete-looking refusal: re-running without --resume/--overwrite refuses
    again = run_cli("measure", *ARGS, "--out", str(out))
    assert again.returncode != 0 and "incomplete run" in again.stderr

    run_cli("measure", "--resume", "--out", str(out), "--no-plots", check=True)
    ref = hf_null_run  # `measure *ARGS`, uninterrupted

    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    a = pd.read_parquet(
        out / "tokens.parquet", columns=["seq_id", "pos", "token_id", "logp_train", "delta"]
    )
    b = pd.read_parquet(
        ref / "tokens.parquet", columns=["seq_id", "pos", "token_id", "logp_train", "delta"]
    )
    pd.testing.assert_frame_equal(a, b)

    refuse = run_cli("measure", *ARGS, "--out", str(ref))
    assert refuse.returncode != 0 and "--overwrite" in refuse.stderr
