"""diagnose's opt-in variants that run on a CPU, end to end on the real engines (vLLM CPU
build, transformers, the default model) over the session's small vLLM run: each changes
what it claims (run.json records the setting, which reached the scoring code or vLLM's
engine) on the baseline's tokens (token ids identical to the baseline's, on every
sequence, or for a decode-again variant on the sequences that came out identical), and its
difference is reported. Never that the difference is nonzero: a CPU's kernels may be
bit-identical under a knob, and 0 is then the true answer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from .conftest import run_cli

pytestmark = pytest.mark.integration

TRAINING = ["lm-head-fp32", "logsoftmax-bf16", "packed", "padding-left"]
DECODE = ["max-num-seqs-1", "no-prefix-cache", "decode-fp16", "decode-fp32"]
PREFILL = ["chunked-prefill"]


def _diagnose(vllm_run: Path, runs_dir: Path, tag: str, names: list[str]) -> dict:
    out = runs_dir / f"diagnose-matrix-{tag}"
    proc = run_cli("diagnose", "--run", str(vllm_run), "--variants", ",".join(names),
                   "--out", str(out), "--json", "--no-html", "--no-plots", "--no-reference",
                   timeout=3000,
                   check=True)  # fmt: skip
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def training(vllm_run: Path, runs_dir: Path) -> dict:
    """The training-side variants (transformers only) and `eager` (skipped: the session's
    run is eager already)."""
    return _diagnose(vllm_run, runs_dir, "training", ["eager", *TRAINING])


@pytest.fixture(scope="module")
def inference(vllm_run: Path, runs_dir: Path) -> dict:
    """The inference-side variants: one vLLM engine each."""
    return _diagnose(vllm_run, runs_dir, "inference", [*PREFILL, *DECODE])


def _rows(matrix: dict) -> dict[str, dict]:
    return {r["name"]: r for r in matrix["variants"]}


def _tokens(run: str | Path) -> pd.DataFrame:
    return pd.read_parquet(Path(run) / "tokens.parquet")


def _meta(run: str | Path) -> dict:
    return json.loads((Path(run) / "run.json").read_text())


def _reported(row: dict) -> None:
    """The row ran and reports its difference: finite, >= 0 (0 included)."""
    assert row["skipped"] is None, row["skipped"]
    for k in ("k3", "mean_abs_delta", "max_abs_delta"):
        assert row[k] is not None and np.isfinite(row[k]) and row[k] >= 0, (row["name"], k)


def _same_tokens(base: pd.DataFrame, tok: pd.DataFrame, every: bool) -> None:
    """The variant's (seq_id, pos, token_id) rows are the baseline's (all of them, or a
    subset of whole sequences)."""
    assert len(tok) > 0
    m = tok.merge(base, on=["seq_id", "pos"], suffixes=("", "_b"), how="left")
    np.testing.assert_array_equal(m["token_id"], m["token_id_b"])
    if every:
        assert len(tok) == len(base)
    kept = base[base["seq_id"].isin(tok["seq_id"].unique())]
    assert len(kept) == len(tok)  # whole sequences


def test_eager_on_an_eager_baseline_is_skipped_with_its_reason(training: dict) -> None:
    row = _rows(training)["eager"]
    assert row["run"] is None and "already runs with enforce_eager True" in row["skipped"]


@pytest.mark.parametrize("name", TRAINING)
def test_training_side_variants(training: dict, name: str) -> None:
    rows = _rows(training)
    row = rows[name]
    _reported(row)
    base = _tokens(rows["baseline"]["run"])
    tok = _tokens(row["run"])
    _same_tokens(base, tok, every=True)
    meta = _meta(row["run"])
    train = meta["engines"]["train"]
    assert train["dtype"] == "bfloat16"
    want = {
        "lm-head-fp32": {"head_fp32": True},
        "logsoftmax-bf16": {"logsoftmax_dtype": "bfloat16"},
        "packed": {"layout": "packed"},
        "padding-left": {"layout": "left"},
    }[name]
    assert train["numerics"] == want
    if name in ("packed", "padding-left"):  # bf16 transformers on both sides, the layout alone
        assert meta["engines"]["infer"]["engine"] == "hf"
        assert meta["engines"]["infer"]["dtype"] == "bfloat16"
        assert row["mean_abs_delta"] < 0.2  # bf16 rounding at most, never a wrong position
    else:  # against the baseline's own vLLM decode log-probs, untouched
        np.testing.assert_array_equal(tok["logp_infer"], base["logp_infer"])
    if name == "logsoftmax-bf16":  # the log-softmax really ran in bf16: bf16 values
        lp = tok["logp_train"].to_numpy(np.float32)
        import torch

        np.testing.assert_array_equal(lp, torch.tensor(lp).to(torch.bfloat16).float().numpy())


@pytest.mark.parametrize("name", DECODE + PREFILL)
def test_inference_side_variants(inference: dict, name: str) -> None:
    rows = _rows(inference)
    row = rows[name]
    _reported(row)
    base = _tokens(rows["baseline"]["run"])
    tok = _tokens(row["run"])
    meta = _meta(row["run"])
    infer = meta["engines"]["infer"]
    want = {
        "max-num-seqs-1": ({}, {"max_num_seqs": 1}),
        "no-prefix-cache": ({}, {"enable_prefix_caching": False}),
        "decode-fp16": ({"infer_dtype": "float16"}, {}),
        "decode-fp32": ({"infer_dtype": "float32"}, {}),
        "chunked-prefill": ({}, {"enable_chunked_prefill": True, "max_num_batched_tokens": 64,
                                 "max_num_seqs": 64}),
    }[name]  # fmt: skip
    assert infer["config"] == want[0] and infer["engine_args"] == want[1]
    assert meta["engines"]["train"]["dtype"] == "float32"  # the baseline's trainer
    if name in PREFILL:
        _same_tokens(base, tok, every=True)
        assert infer["mode"] == "prefill"
    else:
        _same_tokens(base, tok, every=False)
        again = meta["rescored_from"]["decoded_again"]
        assert 0 < again["num_identical"] <= again["num_sequences"] == 8
        assert row["num_identical_sequences"] == again["num_identical"]
        assert tok["seq_id"].nunique() == again["num_identical"]
        assert row["baseline_k3_same_tokens"] >= 0
        if name.startswith("decode-fp"):
            assert infer["dtype"] == want[0]["infer_dtype"]
    # the training side is the baseline's fp32 trainer on the same tokens: its log-probs are
    # the baseline's to fp32 batch-shape rounding (whole nats if a position were off)
    m = tok.merge(base, on=["seq_id", "pos"], suffixes=("", "_b"))
    assert np.abs(m["logp_train"] - m["logp_train_b"]).max() < 1e-3


def test_not_runnable_listed(training: dict) -> None:
    names = {m["name"] for m in training["not_runnable"]}
    import torch

    if not torch.cuda.is_available():
        assert {"attn-flash-attn", "tp2", "fp8-weights", "vllm-batch-invariant"} <= names
        for m in training["not_runnable"]:
            assert m["reason"] and m["runs_on"]
