"""What a user's log holds after a real run (vLLM CPU engine and transformers on the default
model, stderr a pipe): our own plain progress lines and nothing of the third-party noise
(vLLM's import-time Triton notice, torch's NUMA binding notice, tqdm bars with carriage
returns, the resource tracker's exit warning)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

OURS = re.compile(r"^(generate|rescore): [\d,]+/[\d,]+ \w+, |^run complete: ")


def test_a_measured_run_logs_only_our_lines(vllm_run: Path) -> None:
    err = (vllm_run.parent / "vllm_t1.stderr").read_text()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, "no progress at all"
    assert [ln for ln in lines if not OURS.match(ln)] == [], err
    assert "\r" not in err
    for noise in ("Triton", "NUMA", "Warning", "resource_tracker", "it/s"):
        assert noise not in err, noise
