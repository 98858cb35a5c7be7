"""End-to-end: real vLLM rollouts, exported as a framework would dump them, imported back.

The session's measured run (`vllm_run`: vLLM bfloat16 against transformers float32 on the
default model) is written as a verl `gen_batch.dp` (inference side only) and as the generic
`tokens` format (both sides). Importing the verl dump with `--rescore --model default`
recomputes the training side with the same float32 transformers scoring as `measure`, so
logp_train must match the measured run up to batching rounding; the `tokens` import must
reproduce delta exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from . import import_fixtures as F
from .conftest import cli_in_process, run_cli

pytestmark = pytest.mark.integration


def known_from_run(run: Path) -> F.Known:
    """The measured run's completions (every token model-generated), step 1."""
    tok = pd.read_parquet(run / "tokens.parquet").sort_values(["seq_id", "pos"])
    seqs = pd.read_parquet(run / "sequences.parquet").sort_values("seq_id")
    comps = []
    for s in seqs.itertuples():
        t = tok[tok["seq_id"] == s.seq_id]
        assert t["pos"].tolist() == list(range(len(s.response_token_ids)))
        comps.append(
            F.Completion(
                np.asarray(s.prompt_token_ids, np.int64),
                np.asarray(s.response_token_ids, np.int64),
                np.ones(len(t), bool),
                t["logp_infer"].to_numpy(),
                t["logp_train"].to_numpy(),
                step=1,
                env="builtin",
                advantage=0.0,
            )
        )
    return F.Known(comps, tok)


def _merged(imported: Path, original: Path) -> pd.DataFrame:
    """Imported and original token rows side by side (completions in the same order)."""
    a = pd.read_parquet(imported / "tokens.parquet").sort_values(["seq_id", "pos"])
    b = pd.read_parquet(original / "tokens.parquet").sort_values(["seq_id", "pos"])
    assert len(a) == len(b)
    assert a["token_id"].tolist() == b["token_id"].tolist()
    assert a["pos"].tolist() == b["pos"].tolist()
    return pd.DataFrame(
        {
            "li_imp": a["logp_infer"].to_numpy(),
            "li_orig": b["logp_infer"].to_numpy(),
            "lt_imp": a["logp_train"].to_numpy(),
            "lt_orig": b["logp_train"].to_numpy(),
            "d_imp": a["delta"].to_numpy(),
            "d_orig": b["delta"].to_numpy(),
        }
    )


def test_verl_dump_of_vllm_rollouts_rescored_matches_measure(
    vllm_run: Path, tmp_path: Path
) -> None:
    known = known_from_run(vllm_run)
    F.write_verl(known, tmp_path / "dump", prompt_len=4, response_len=8)
    out = tmp_path / "run"
    proc = run_cli("import", "verl", str(tmp_path / "dump"), "--trust-pickle", "--model", "default",
                   "--out", str(out), "--json", check=True)  # fmt: skip
    res = json.loads(proc.stdout)
    assert res["mode"] == "rescored" and res["steps"] == [1]
    assert (
        res["num_tokens"]
        == json.loads((vllm_run / "run.json").read_text())["summary"]["num_tokens"]
    )
    m = _merged(out, vllm_run)
    # the verl tensor holds float32: vLLM's log-probs are float32 values, so they survive
    np.testing.assert_array_equal(m["li_imp"], m["li_orig"])
    # same float32 eager transformers scoring, batched differently: rounding only
    diff = np.abs(m["lt_imp"] - m["lt_orig"])
    print(f"rescored logp_train vs measure: max |diff| {diff.max():.3g}, mean {diff.mean():.3g} "
          f"over {len(m)} tokens")  # fmt: skip
    assert diff.max() < 1e-4
    np.testing.assert_allclose(m["d_imp"], m["d_orig"], atol=1e-4)
    fit = res["checks"]["temperature_fit"]
    print(f"fitted temperature {fit['fitted']:.4f} (replayed 1) on {fit['num_tokens']} tokens")
    assert fit["fitted"] == pytest.approx(1.0, abs=0.05)
    assert not any("best explained by temperature" in w for w in res["warnings"])
    # a rescored import has the pruning grid: the sweep works
    sweep = cli_in_process("sweep-threshold", str(out), "--json", check=True)
    assert json.loads(sweep.stdout)["rows"]


def test_tokens_export_of_vllm_run_reproduces_it(vllm_run: Path, tmp_path: Path) -> None:
    known = known_from_run(vllm_run)
    src = F.write_tokens_parquet(known, tmp_path / "tokens.parquet")
    out = tmp_path / "run"
    proc = run_cli("import", "tokens", str(src), "--out", str(out), "--json", check=True)
    res = json.loads(proc.stdout)
    assert res["mode"] == "scored"
    m = _merged(out, vllm_run)
    np.testing.assert_array_equal(m["d_imp"], m["d_orig"])
    slope = res["checks"]["slope"]["slope"]
    print(f"scored import of the vLLM run: slope of logp_infer on logp_train {slope:.4f}")
    assert slope == pytest.approx(1.0, abs=0.02)
    assert not any("temperature" in w for w in res["warnings"])
    rep = cli_in_process("report", str(out), "--json", check=True)
    orig = cli_in_process("report", str(vllm_run), "--json", check=True)
    a, b = json.loads(rep.stdout)["metrics"], json.loads(orig.stdout)["metrics"]
    for k in ("mean_abs_delta", "k3", "mean_delta", "chi2_token", "ess_seq"):
        assert a[k] == pytest.approx(b[k], rel=1e-12), k
