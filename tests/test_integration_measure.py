"""End-to-end: the real vLLM CPU engine and real transformers on the default model.

Nothing is mocked. These tests are the evidence that the pipeline aligns positions, prompts
and replayed sampling settings correctly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mismatch_cli.schema import SEQUENCE_COLUMNS, TOKEN_COLUMNS

pytestmark = pytest.mark.integration


def _tokens(run: Path) -> pd.DataFrame:
    return pd.read_parquet(run / "tokens.parquet")


def test_run_is_complete_and_has_every_column(vllm_run: Path) -> None:
    meta = json.loads((vllm_run / "run.json").read_text())
    assert meta["status"] == "complete"
    assert meta["engines"]["infer"] == {"engine": "vllm", "dtype": "bfloat16"}
    assert meta["conventions"]["delta"].startswith("delta = logp_infer - logp_train")
    assert meta["versions"]["vllm"] and meta["versions"]["transformers"]
    assert len(meta["model"]["weights_sha256"]) == 64
    assert not (vllm_run / "parts").exists()
    tok = _tokens(vllm_run)
    seq = pd.read_parquet(vllm_run / "sequences.parquet")
    assert set(TOKEN_COLUMNS) <= set(tok.columns)
    assert set(SEQUENCE_COLUMNS) <= set(seq.columns)
    assert len(seq) == 4 * 2
    assert len(tok) == seq["num_tokens"].sum()
    # positions are 0..T-1 within each completion, tokens match the stored response
    for r in seq.itertuples():
        t = tok[tok.seq_id == r.seq_id].sort_values("pos")
        assert t["pos"].tolist() == list(range(r.num_tokens))
        assert t["token_id"].tolist() == list(r.response_token_ids)
        assert np.isclose(t["delta"].sum(), r.sum_delta)
    assert np.allclose(tok["delta"], tok["logp_infer"] - tok["logp_train"])
    assert len(tok["pruned_mass_minp"].iloc[0]) == len(meta["rho_grid"])


def test_logp_train_matches_an_independent_transformers_computation(vllm_run: Path) -> None:
    """Unbatched, unpadded fp32 forward per sequence, written here from scratch, with the
    attention implementation the run recorded. The run scores padded batches, whose GEMM
    shapes round differently in float32 (up to 2.6e-5 nats seen on the default model); an
    off-by-one position or a wrong temperature would be off by whole nats."""
    from transformers import AutoModelForCausalLM

    meta = json.loads((vllm_run / "run.json").read_text())
    attn = meta["engines"]["train"]["attn_implementation"]
    model = AutoModelForCausalLM.from_pretrained(
        meta["model"]["path"], dtype=torch.float32, attn_implementation=attn
    ).eval()
    tok = _tokens(vllm_run)
    seq = pd.read_parquet(vllm_run / "sequences.parquet")
    worst = 0.0
    for r in seq.itertuples():
        prompt, resp = list(r.prompt_token_ids), list(r.response_token_ids)
        ids = torch.tensor([prompt + resp])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : len(prompt) + len(resp) - 1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        expect = logp.gather(1, torch.tensor(resp)[:, None]).squeeze(1).double().numpy()
        got = tok[tok.seq_id == r.seq_id].sort_values("pos")["logp_train"].to_numpy()
        worst = max(worst, float(np.max(np.abs(got - expect))))
    assert worst < 1e-4, worst


def test_mismatch_is_small_and_shows_the_one_minus_p_shape(vllm_run: Path) -> None:
    tok = _tokens(vllm_run)
    d = tok["delta"].to_numpy()
    assert np.isfinite(d).all()  # no truncation at temperature 1: sets cannot disagree
    assert np.abs(d).mean() < 0.2  # an off-by-one position would give ~several nats
    assert np.abs(d).mean() > 0  # bf16 vs fp32 cannot agree exactly
    tail = np.abs(d[tok.p_train < 0.1]).mean()
    head = np.abs(d[tok.p_train > 0.99]).mean()
    assert tail >= 10 * head, (tail, head)
    # the per-position eps lower bound is finite and non-negative
    assert (tok["eps_hat"] >= 0).all() and np.isfinite(tok["eps_hat"]).all()


def test_replayed_temperature_and_top_p_keep_the_mismatch_small(vllm_topp_run: Path) -> None:
    meta = json.loads((vllm_topp_run / "run.json").read_text())
    assert meta["sampling"]["temperature"] == 0.7 and meta["sampling"]["top_p"] == 0.9
    tok = _tokens(vllm_topp_run)
    d = tok["delta"].to_numpy()
    finite = np.isfinite(d)
    # kept-set disagreements are possible at the nucleus edge, but rare, and counted
    assert (~tok["kept_train"]).sum() == (~finite).sum()
    assert finite.mean() > 0.95
    assert np.abs(d[finite]).mean() < 0.2
    # the training side's top-K is renormalised over the nucleus: probabilities sum to ~1
    mass = np.array([np.exp(v[np.isfinite(v)]).sum() for v in tok["topk_logp_train"]])
    assert (mass <= 1 + 1e-4).all()


def test_hf_null_check_is_exactly_zero(hf_null_run: Path) -> None:
    tok = _tokens(hf_null_run)
    assert len(tok) > 0
    assert (tok["delta"].to_numpy() == 0.0).all()
    assert (tok["eps_hat"].to_numpy() == 0.0).all()
    meta = json.loads((hf_null_run / "run.json").read_text())
    assert meta["engines"]["infer"] == {"engine": "hf", "dtype": "float32"}
    assert meta["engines"]["train"]["attn_implementation"] == "eager"


def test_progress_in_a_log_is_plain_lines(vllm_run: Path) -> None:
    """stderr is a pipe here: each long phase prints plain lines, not rich bars."""
    err = (vllm_run.parent / "vllm_t1.stderr").read_text()
    lines = err.splitlines()
    assert any(ln.startswith("generate: 0/8 completions, started") for ln in lines), err
    assert any(ln.startswith("generate: 8/8 completions") and "done in" in ln for ln in lines)
    assert any(ln.startswith("rescore: ") and "done in" in ln for ln in lines), err
    assert "\x1b[" not in err or "━" not in err  # no progress-bar drawing in a log


def test_many_prompts_at_once_do_not_kill_the_cpu_engine(vllm_many_prompts_run: dict) -> None:
    """A chunk whose prompts exceed vLLM's CPU step budget (4096 tokens) used to chunk a
    prefill, and the engine died rewinding a seeded CPU generator. 64 prompts (one chunk)
    x 2 samples of ~56 prompt tokens is 7,192 prefill tokens (the run:
    conftest.vllm_many_prompts_run)."""
    out = vllm_many_prompts_run["out"]
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "complete" and meta["summary"]["num_sequences"] == 128
