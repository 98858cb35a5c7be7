"""The findings a run ends with (`verdict.findings`): one sentence per finding, every number
read from the results it is given."""

from __future__ import annotations

from pathlib import Path

import pytest

from mismatch_cli import corrections as C
from mismatch_cli import sweep as sw
from mismatch_cli.analysis import analyze
from mismatch_cli.formatting import edge, fmt, pct
from mismatch_cli.synthetic import write_synthetic_run
from mismatch_cli.verdict import findings


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_run(tmp_path_factory.mktemp("v") / "run", num_sequences=48, eps=0.6)


def test_findings_name_the_shape_the_tail_the_threshold_and_the_correction(run: Path) -> None:
    rep, swp, cor = analyze(run), sw.sweep(run), C.corrections(run)
    lines = findings(rep, swp, cor)
    assert [ln.split(":")[0] for ln in lines] == [
        "The (1 - p) shape", "The tail", "Pruning", "Correction"
    ]  # fmt: skip
    b = [r for r in rep["buckets"] if r["count"]]
    assert fmt(b[0]["mean_abs_delta"]) in lines[0] and fmt(b[-1]["mean_abs_delta"]) in lines[0]
    assert pct(rep["tail"]["abs_delta_share"]) in lines[1]
    assert fmt(rep["tail"]["mean_delta"], sign=True) in lines[1]
    assert f"rho = {edge(swp['recommended']['rho'])}" in lines[2]
    assert cor["decision"]["reason"] in lines[3]
    # without the sweep and corrections: only the report's findings
    assert len(findings(rep)) == 2


def test_an_unresolved_tail_sign_is_said_so(run: Path) -> None:
    rep = analyze(run)
    rep["tail"]["z"] = 0.7
    assert "not resolved in this run (0.7 standard errors" in findings(rep)[1]
