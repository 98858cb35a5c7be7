"""Per-side errors against a precise reference (`attribution`): synthetic runs whose two
sides carry known errors around a reference recover the quadrature law when the errors are
independent and show the correlation when they are not (no model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mismatch_cli.attribution import (
    attribution_row,
    attribution_verdict,
    dominant_side,
    side_errors,
)
from mismatch_cli.runs import read_sequences, read_tokens, token_frame, write_run
from mismatch_cli.synthetic import synthetic_meta, write_synthetic_run


def _variant(ref: Path, out: Path, e_infer: np.ndarray, e_train: np.ndarray) -> Path:
    """A run over ref's rollouts: logp_infer = ref + e_infer, logp_train = ref + e_train."""
    tok = read_tokens(ref)
    lref = tok["logp_train"].to_numpy()
    cols = {c: tok[c].to_numpy() for c in tok.columns if c not in ("delta", "p_train", "p_infer")}
    cols["logp_infer"] = lref + e_infer
    cols["logp_train"] = lref + e_train
    return write_run(out, token_frame(cols), read_sequences(ref), synthetic_meta())


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    d = tmp_path_factory.mktemp("attr")
    r = write_synthetic_run(d / "ref", num_sequences=64, max_len=64, seed=5)
    return r, read_tokens(r)["logp_train"].to_numpy()


def _finite(ref_lp: np.ndarray) -> np.ndarray:
    return np.isfinite(ref_lp)


def test_independent_errors_follow_the_quadrature_law(ref, tmp_path: Path) -> None:
    r, lref = ref
    rng = np.random.default_rng(0)
    n = len(lref)
    ei, et = rng.normal(0, 0.03, n), rng.normal(0, 0.04, n)
    v = _variant(r, tmp_path / "v", ei, et)
    got = side_errors(r, v)
    json.dumps(got, default=str, allow_nan=False)
    ok = _finite(lref)
    # exactly what numpy gives on the same tokens (stored float32 log-probs: recompute them)
    tok = read_tokens(v)
    ei_s = tok["logp_infer"].to_numpy(np.float64)[ok] - lref[ok]
    et_s = tok["logp_train"].to_numpy(np.float64)[ok] - lref[ok]
    assert got["num_tokens"] == ok.sum()
    np.testing.assert_allclose(got["infer"]["rms"], np.sqrt(np.mean(ei_s**2)), rtol=1e-9)
    np.testing.assert_allclose(got["train"]["rms"], np.sqrt(np.mean(et_s**2)), rtol=1e-9)
    np.testing.assert_allclose(got["infer"]["mean"], ei_s.mean(), rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(got["train"]["mean_abs"], np.abs(et_s).mean(), rtol=1e-9)
    np.testing.assert_allclose(got["err_corr"], np.corrcoef(ei_s, et_s)[0, 1], atol=1e-9)
    np.testing.assert_allclose(got["gap_rms"], np.sqrt(np.mean((ei_s - et_s) ** 2)), rtol=1e-6)
    np.testing.assert_allclose(got["train"]["p99_abs"], np.quantile(np.abs(et_s), 0.99), rtol=1e-9)
    # the law: independent errors -> the gap is their quadrature sum
    assert abs(got["err_corr"]) < 0.05
    assert got["gap_predicted_rms"] == pytest.approx(0.05, rel=0.03)
    assert got["gap_rms"] == pytest.approx(got["gap_predicted_rms"], rel=0.03)
    assert got["share_train"] == pytest.approx(16 / 25, abs=0.03)
    assert got["gap_if_infer_fixed"] == got["train"]["rms"]
    # the buckets partition the tokens (by the reference's p) and hold the same law
    b = got["buckets"]
    assert sum(x["count"] for x in b) == got["num_tokens"]
    full = [x for x in b if x["count"] > 500]
    assert full and all(abs(x["err_corr"]) < 0.15 for x in full)
    row = attribution_row("v", got)
    assert row["dominant"] == "both" and row["err_train_rms"] == got["train"]["rms"]
    assert row["buckets"] == b and row["err_train_mean_abs"] == got["train"]["mean_abs"]
    text = attribution_verdict(row, "v")
    assert "independent" in text and "quadrature" in text and "both sides contribute" in text


def test_correlated_errors_show_the_correlation(ref, tmp_path: Path) -> None:
    r, lref = ref
    rng = np.random.default_rng(1)
    n = len(lref)
    ei = rng.normal(0, 0.05, n)
    et = 0.8 * ei + rng.normal(0, 0.03, n)  # corr = 0.04 / sqrt(0.04^2 + 0.03^2) = 0.8
    got = side_errors(r, _variant(r, tmp_path / "c", ei, et))
    assert got["err_corr"] == pytest.approx(0.8, abs=0.02)
    # shared error cancels in the gap: measured well below the independent prediction
    assert got["gap_rms"] < 0.6 * got["gap_predicted_rms"]
    assert got["gap_rms"] == pytest.approx(np.sqrt(0.01**2 + 0.03**2), rel=0.05)
    text = attribution_verdict(attribution_row("c", got), "c")
    assert "correlated (0.8" in text and "partly cancel" in text


def test_one_side_exact_dominance_and_the_null(ref, tmp_path: Path) -> None:
    r, lref = ref
    n = len(lref)
    ei = np.random.default_rng(2).normal(0, 0.02, n)
    got = side_errors(r, _variant(r, tmp_path / "i", ei, np.zeros(n)))
    assert got["train"]["rms"] == 0 and math.isnan(got["err_corr"] or math.nan)
    row = attribution_row("i", got)
    assert row["dominant"] == "inference" and row["share_infer"] == 1.0
    assert row["gap_rms"] == pytest.approx(row["err_infer_rms"], rel=1e-6)
    assert "inference side dominates" in attribution_verdict(row)
    null = attribution_row("null", side_errors(r, _variant(r, tmp_path / "z", 0 * ei, 0 * ei)))
    assert null["gap_rms"] == 0 and null["dominant"] is None
    assert "no error to attribute" in attribution_verdict(null)
    assert dominant_side(0.1) == "training" and dominant_side(None) is None


def test_other_rollouts_are_not_attributed(ref, tmp_path: Path) -> None:
    r, _ = ref
    other = write_synthetic_run(tmp_path / "o", num_sequences=64, max_len=64, seed=9)
    got = side_errors(r, other)
    assert not got["shared"] and "different tokens" in got["reason"]
    assert "No attribution" in attribution_verdict(attribution_row("o", got))


def test_compare_reference_cli(ref, tmp_path: Path) -> None:
    from mismatch_cli.compare import compare

    from .conftest import assert_one_line_error, run_cli

    r, lref = ref
    n = len(lref)
    rng = np.random.default_rng(3)
    v = _variant(r, tmp_path / "v", rng.normal(0, 0.02, n), rng.normal(0, 0.01, n))
    got = compare([v, r], reference=r)
    assert got["attribution_reference"] == str(r)
    first, second = got["attribution"]
    assert first["name"] == "v" and first["dominant"] == "inference"
    # r against itself: an exact training side, its whole gap on the inference side
    assert second["err_train_rms"] == 0 and second["dominant"] == "inference"
    assert second["gap_rms"] == pytest.approx(second["err_infer_rms"], rel=1e-6)
    assert first["err_infer_rms"] == side_errors(r, v)["infer"]["rms"]
    proc = run_cli("compare", str(v), str(r), "--reference", str(r), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["attribution"][0]["dominant"] == "inference"
    proc = run_cli("compare", str(v), str(r), "--reference", str(r))
    assert proc.returncode == 0, proc.stderr
    assert "Which side" in proc.stdout and "inference side dominates" in proc.stdout
    assert_one_line_error(
        run_cli("compare", str(v), str(r), "--reference", str(tmp_path / "nope")), "not found"
    )


def test_diagnose_summary_attributes_every_variant(ref, tmp_path: Path) -> None:
    """summarize() with a reference: each variant row gains the per-side keys, the top level
    the attribution table, the verdict the baseline's attribution; a variant over other
    tokens is listed as not shared."""
    from mismatch_cli.diagnose import ATTRIBUTION_KEYS, summarize

    r, lref = ref
    n = len(lref)
    out = tmp_path / "d"
    rng = np.random.default_rng(4)
    _variant(r, out / "variants" / "baseline", rng.normal(0, 0.05, n), rng.normal(0, 0.01, n))
    _variant(r, out / "variants" / "null", np.zeros(n), np.zeros(n))
    write_synthetic_run(out / "variants" / "attention", num_sequences=8, seed=11)
    _variant(r, out / "reference", np.zeros(n), np.zeros(n))
    res = summarize(out, ["baseline", "attention", "null"], {}, {}, references=["reference"])
    json.dumps(res, allow_nan=False)
    rows = {x["name"]: x for x in res["variants"]}
    attr = {x["name"]: x for x in res["attribution"]}
    assert set(ATTRIBUTION_KEYS) <= set(rows["baseline"])
    assert rows["baseline"]["err_infer_rms"] == attr["baseline"]["err_infer_rms"]
    assert attr["baseline"]["dominant"] == "inference"
    assert rows["null"]["gap_rms"] == 0 and attr["null"]["dominant"] is None
    assert not attr["attention"]["shared"] and rows["attention"]["err_infer_rms"] is None
    assert "inference side dominates" in res["verdict"]
    assert res["reference"]["run"] == str(out / "reference")
    # without a reference: no attribution, the rest unchanged
    plain = summarize(out, ["baseline", "attention", "null"], {}, {})
    assert plain["attribution"] is None and plain["ranking"] == res["ranking"]
