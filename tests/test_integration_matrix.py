"""diagnose's opt-in variants that run on a CPU, end to end on the real engines (vLLM CPU
build, transformers, the default model) over the session's small vLLM run: each changes
what it claims (run.json records the setting, which reached the scoring code or vLLM's
engine) on the baseline's tokens (token ids identical to the baseline's, on every
sequence, or for a decode-again variant on the sequences that came out identical), and its
difference is reported. Never that the difference is nonzero: a CPU's kernels may be
bit-identical under a knob, and 0 is then the true answer.

One real row per MECHANISM, in the session's one diagnose run (`diagnosed`, conftest.py):
- a training-side numerics change: logsoftmax-bf16 (`RescoreOptions` -> `TrainNumerics` ->
  `score_sequences`, recorded in engines.train.numerics). lm-head-fp32 takes the same path
  with another field: its numerics are tested on a tiny model in test_train_numerics.py
  (test_cast_head_fp32), its options in test_diagnose_matrix.py (test_matrix_metadata).
  packed and padding-left are layouts through the same path, with both sides transformers
  bf16 as batch-shape (test_integration_diagnose.py) runs them: their positions are tested
  against the right-padded layout in test_train_numerics.py
  (test_layouts_score_the_same_positions, test_packed_rows_hold_several_sequences).
- an engine-argument change: chunked-prefill (a vLLM prefill with `EngineChange` engine
  arguments). max-num-seqs-1 and no-prefix-cache pass other engine arguments the same way:
  test_diagnose_matrix.py (test_engine_arguments_reach_vllm_engine_args) checks that each
  one's arguments reach vLLM's `EngineArgs`, and that nothing else changes.
- a decode again with a config change: decode-fp32 (the baseline's prompts decoded again,
  the identical sequences rescored, the engine's dtype recorded). decode-fp16 differs only
  in the dtype (test_engine_arguments_reach_vllm_engine_args), and whether a CPU build
  accepts float16 is the machine's property, not the code's.
- the reference: test_integration_diagnose.py (test_each_side_against_the_precise_reference).
- a variant this run cannot build (eager on an eager baseline): skipped with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.integration

TRAINING = ["logsoftmax-bf16"]
DECODE = ["decode-fp32"]
PREFILL = ["chunked-prefill"]


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


def test_eager_on_an_eager_baseline_is_skipped_with_its_reason(diagnosed: dict) -> None:
    row = _rows(diagnosed)["eager"]
    assert row["run"] is None and "already runs with enforce_eager True" in row["skipped"]


@pytest.mark.parametrize("name", TRAINING)
def test_training_side_variants(diagnosed: dict, name: str) -> None:
    rows = _rows(diagnosed)
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
def test_inference_side_variants(diagnosed: dict, name: str) -> None:
    rows = _rows(diagnosed)
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


def test_not_runnable_listed(diagnosed: dict) -> None:
    names = {m["name"] for m in diagnosed["not_runnable"]}
    for m in diagnosed["not_runnable"]:
        assert m["reason"] and m["runs_on"]
    import torch

    if not torch.cuda.is_available():
        assert {"attn-flash-attn", "tp2", "fp8-weights", "vllm-batch-invariant"} <= names
