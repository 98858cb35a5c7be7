"""Shared fixtures. Integration fixtures run the REAL engines (vLLM CPU build, transformers)
on the default model through the real CLI, once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: int = 900, check: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m mismatch_cli ARGS` as a user would; capture text output."""
    proc = subprocess.run(
        [sys.executable, "-m", "mismatch_cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"mismatch {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """A user error: non-zero exit, no traceback, exactly one non-empty stderr line."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


SMALL = ["--num-prompts", "4", "--samples-per-prompt", "2", "--max-tokens", "32", "--no-plots"]


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def vllm_run(runs_dir: Path) -> Path:
    """4 prompts x 2 samples x 32 tokens, vLLM bf16 vs transformers fp32, temperature 1."""
    out = runs_dir / "vllm_t1"
    run_cli("measure", *SMALL, "--enforce-eager", "--out", str(out), check=True)
    return out


@pytest.fixture(scope="session")
def vllm_topp_run(runs_dir: Path) -> Path:
    """Same, with temperature 0.7 and top-p 0.9 replayed on the training side."""
    out = runs_dir / "vllm_t07_p09"
    run_cli(
        "measure", *SMALL, "--enforce-eager", "--temperature", "0.7", "--top-p", "0.9",
        "--out", str(out), check=True,
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def hf_null_run(runs_dir: Path) -> Path:
    """The null check: transformers generation and rescoring in the same dtype."""
    out = runs_dir / "hf_null"
    run_cli(
        "measure", *SMALL, "--infer-engine", "hf", "--infer-dtype", "float32",
        "--train-dtype", "float32", "--out", str(out), check=True,
    )  # fmt: skip
    return out
