"""`sweep-threshold --validate` never reuses or resumes a run made with other settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from mismatch_cli.config import MeasureConfig
from mismatch_cli.runs import RunDir
from mismatch_cli.synthetic import write_synthetic_run

from .conftest import assert_one_line_error, run_cli

RHO = 1e-3


def _source(tmp_path: Path) -> Path:
    """A complete run that claims to come from `measure` (synthetic tables)."""
    src = write_synthetic_run(tmp_path / "src", num_sequences=8, max_len=16)
    run = RunDir(src)
    meta = run.read_meta()
    meta.update(
        command="measure",
        config=MeasureConfig(num_prompts=4, samples_per_prompt=2, max_tokens=16).to_dict(),
        prompt_ids_sha256="abc",
        model={"name": "m", "path": "/nowhere", "weights_sha256": "w1"},
    )
    run.write_meta(meta)
    return src


def _target(tmp_path: Path, src: Path, status: str, **changes: object) -> Path:
    meta = RunDir(src).read_meta()
    cfg = {**meta["config"], "min_p": RHO, **changes.pop("config", {})}
    out = tmp_path / "target"
    out.mkdir()
    RunDir(out).write_meta({**meta, "status": status, "config": cfg, **changes})
    return out


@pytest.mark.parametrize(
    ("status", "changes", "word"),
    [
        ("complete", {"config": {"min_p": 0.5}}, "min_p is 0.5"),
        ("incomplete", {"config": {"min_p": 0.0}}, "min_p is 0.0"),
        ("complete", {"config": {"seed": 7}}, "seed is 7"),
        ("incomplete", {"config": {"temperature": 0.7}}, "temperature"),
        ("complete", {"prompt_ids_sha256": "other"}, "prompt tokens"),
        ("complete", {"model": {"name": "m", "weights_sha256": "w2"}}, "model weights"),
    ],
)
def test_a_run_made_otherwise_is_refused(
    tmp_path: Path, status: str, changes: dict, word: str
) -> None:
    src = _source(tmp_path)
    target = _target(tmp_path, src, status, **changes)
    proc = run_cli(
        "sweep-threshold", str(src), "--validate", "--rho", str(RHO), "--validate-out", str(target)
    )
    assert_one_line_error(proc, "not the validation run" if "config" in changes else "other", word)
