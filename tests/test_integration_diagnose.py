"""End-to-end on the real engines (vLLM CPU build, transformers, the default model):
`rescore` reproduces a measured run exactly, and `diagnose` builds the null, batch-shape and
prefill-fp32 variants and the precise reference on the session's vLLM run (`diagnosed` in
conftest.py: one diagnose run shared with test_integration_matrix.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from .conftest import run_cli

pytestmark = pytest.mark.integration


def _tokens(run: Path) -> pd.DataFrame:
    return pd.read_parquet(run / "tokens.parquet")


def test_rescore_with_the_same_settings_reproduces_logp_train(
    vllm_run: Path, runs_dir: Path
) -> None:
    out = runs_dir / "rescored"
    proc = run_cli("rescore", str(vllm_run), "--out", str(out), "--json", check=True)
    assert json.loads(proc.stdout)["run"] == str(out)
    a, b = _tokens(vllm_run), _tokens(out)
    assert len(a) == len(b) > 0
    np.testing.assert_array_equal(a["token_id"], b["token_id"])
    np.testing.assert_array_equal(a["logp_infer"], b["logp_infer"])
    np.testing.assert_array_equal(a["logp_train"], b["logp_train"])  # exactly, not within 1e-6
    meta = json.loads((out / "run.json").read_text())
    assert meta["rescored_from"]["changed"] == {}
    assert meta["model"]["weights_sha256"] == json.loads((vllm_run / "run.json").read_text())[
        "model"]["weights_sha256"]  # fmt: skip


def test_null_variant_is_exactly_zero(diagnosed: dict) -> None:
    rows = {r["name"]: r for r in diagnosed["variants"]}
    null = rows["null"]
    assert null["skipped"] is None
    assert null["num_tokens"] == rows["baseline"]["num_tokens"] > 0
    assert null["k3"] == 0 and null["max_abs_delta"] == 0 and null["mean_abs_delta"] == 0
    d = _tokens(Path(null["run"]))["delta"].to_numpy()
    assert (d == 0).all()
    assert "null check is exactly 0" in diagnosed["verdict"]


def test_batch_shape_variant_runs_on_the_same_tokens(diagnosed: dict) -> None:
    rows = {r["name"]: r for r in diagnosed["variants"]}
    bs = rows["batch-shape"]
    assert bs["skipped"] is None and bs["num_tokens"] == rows["baseline"]["num_tokens"]
    base = _tokens(Path(rows["baseline"]["run"]))
    tok = _tokens(Path(bs["run"]))
    np.testing.assert_array_equal(base["token_id"], tok["token_id"])
    np.testing.assert_array_equal(base["pos"], tok["pos"])
    # Whether bf16 batched and one-sequence-per-pass kernels round differently is the
    # hardware's and the library build's property (on some CPUs they agree bit for bit), not
    # the code's: only that the numbers are real ones, and bf16 rounding at most (a wrong
    # position or a wrong token would be off by whole nats).
    d = tok["delta"].to_numpy()
    assert np.isfinite(d).all()
    np.testing.assert_allclose(d, tok["logp_infer"] - tok["logp_train"], rtol=0, atol=1e-6)
    for k in ("k3", "mean_abs_delta", "max_abs_delta"):
        assert np.isfinite(bs[k]) and bs[k] >= 0, (k, bs[k])
    assert bs["max_abs_delta"] == pytest.approx(np.abs(d).max())
    assert bs["mean_abs_delta"] < 0.2
    meta = json.loads((Path(bs["run"]) / "run.json").read_text())
    # the settings it claims: bf16 transformers on both sides, batched vs one sequence per pass
    assert meta["config"]["rescore_batch_tokens"] == 1
    assert meta["engines"]["infer"]["dtype"] == "bfloat16"
    assert meta["engines"]["infer"]["engine"] == "hf"
    assert meta["engines"]["train"]["dtype"] == "bfloat16"
    base_meta = json.loads((Path(rows["baseline"]["run"]) / "run.json").read_text())
    assert meta["rescored_from"]["changed"]["rescore_batch_tokens"] == [
        base_meta["config"]["rescore_batch_tokens"], 1]  # fmt: skip


def test_prefill_fp32_is_far_below_the_baseline(diagnosed: dict) -> None:
    rows = {r["name"]: r for r in diagnosed["variants"]}
    pf = rows["prefill-fp32"]
    assert pf["skipped"] is None, pf["skipped"]
    assert pf["k3"] < rows["baseline"]["k3"] / 4
    assert Path(diagnosed["out"], "figures", "diagnose.png").is_file()


def test_each_side_against_the_precise_reference(diagnosed: dict) -> None:
    """The attribution on the real engines, checked against a direct numpy computation from
    the reference's and each variant's token tables."""
    ref = diagnosed["reference"]
    assert ref["run"] and ref["skipped"] is None
    meta = json.loads((Path(ref["run"]) / "run.json").read_text())
    assert meta["config"]["rescore_batch_tokens"] == 1
    assert meta["config"]["train_dtype"] == "float32"
    assert meta["config"]["attn_implementation"] == "eager"
    refk = _tokens(Path(ref["run"]))[["seq_id", "pos", "logp_train"]]
    attr = {a["name"]: a for a in diagnosed["attribution"]}
    built = [row for row in diagnosed["variants"] if not row["skipped"]]
    assert {"baseline", "null", "batch-shape", "prefill-fp32"} <= {r["name"] for r in built}
    for row in built:
        # matched on (seq_id, pos): a decode-again row holds a subset of the sequences
        tok = _tokens(Path(row["run"])).merge(refk, on=["seq_id", "pos"], suffixes=("", "_ref"))
        a = attr[row["name"]]
        assert a["shared"], a
        li, lt = tok["logp_infer"].to_numpy(np.float64), tok["logp_train"].to_numpy(np.float64)
        lref = tok["logp_train_ref"].to_numpy(np.float64)
        ok = np.isfinite(li) & np.isfinite(lt) & np.isfinite(lref)
        ei, et = li[ok] - lref[ok], lt[ok] - lref[ok]
        assert a["num_tokens"] == ok.sum()
        np.testing.assert_allclose(a["err_infer_rms"], np.sqrt(np.mean(ei**2)), rtol=1e-9)
        np.testing.assert_allclose(a["err_train_rms"], np.sqrt(np.mean(et**2)), rtol=1e-9)
        np.testing.assert_allclose(a["gap_rms"], np.sqrt(np.mean((li - lt)[ok] ** 2)), rtol=1e-9)
        assert row["gap_rms"] == a["gap_rms"]
    # the null check scores both sides alike: the same error on each side, no gap
    assert attr["null"]["gap_rms"] == 0
    assert attr["null"]["err_infer_rms"] == attr["null"]["err_train_rms"]
    # the baseline's fp32 trainer is the reference up to its batch shape: the inference
    # side (bf16 vLLM) carries the gap
    assert attr["baseline"]["dominant"] == "inference"
    assert attr["baseline"]["err_train_rms"] < 0.1 * attr["baseline"]["err_infer_rms"]
    fp64 = ref["fp64"]
    assert fp64["num_sequences"] == 2 and fp64["num_tokens"] > 0
    assert 0 <= fp64["err_rms"] < 1e-3  # float32 against float64: rounding
    assert "Against the precise reference" in diagnosed["verdict"]
