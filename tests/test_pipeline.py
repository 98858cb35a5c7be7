"""`pipeline.rescore_parts`: the training side over stored rollouts (measure, import,
rescore), with loss masks and carried-over columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mismatch_cli.pipeline import ROLLOUT, TOKENS, TrainSide, rescore_parts
from mismatch_cli.rescore import SeqInput, score_sequences
from mismatch_cli.runs import RunDir
from mismatch_cli.sampling import Sampling


def _rollouts() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for sid, (P, T) in enumerate([(5, 4), (3, 6), (7, 1)]):
        rows.append(
            {
                "seq_id": sid,
                "prompt_token_ids": rng.integers(3, 97, P).astype(np.int32),
                "response_token_ids": rng.integers(3, 97, T).astype(np.int32),
                "logp_infer": -rng.random(T),
                "topk_ids_infer": None,  # an import stores no inference top-K
                "topk_logp_infer": None,
                "loss_mask": np.array([1, 0, 1, 1, 0, 1][:T], dtype=bool),
                "advantage": np.arange(T, dtype=np.float64) + 10 * sid,
                "step": 100 + sid,
            }
        )
    return pd.DataFrame(rows)


def test_masked_tokens_are_context_only_and_extras_are_carried(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    df = _rollouts()
    run.write_part(ROLLOUT, 0, df)
    train = TrainSide(str(tiny_model_dir), device=torch.device("cpu"), top_k=3)
    rescore_parts(run, 1, train, Sampling(temperature=0.9))
    tok = run.read_part(TOKENS, 0)

    mask = np.concatenate(df["loss_mask"].to_list())
    assert len(tok) == int(mask.sum())
    assert tok[tok.seq_id == 0]["pos"].tolist() == [0, 2, 3]  # position 1 was masked
    assert tok[tok.seq_id == 1]["pos"].tolist() == [0, 2, 3, 5]
    assert tok["step"].tolist() == [100] * 3 + [101] * 4 + [102]
    assert tok["advantage"].tolist() == [0, 2, 3, 10, 12, 13, 15, 20]
    # the masked tokens were still in the context: same numbers as scoring everything
    from mismatch_cli.models import load_model

    model, _ = load_model(str(tiny_model_dir), "float32", torch.device("cpu"))
    seqs = [
        SeqInput(r.prompt_token_ids, r.response_token_ids, np.zeros((len(r.response_token_ids), 0), np.int32),
                 np.zeros((len(r.response_token_ids), 0), np.float32), r.logp_infer)
        for r in df.itertuples()
    ]  # fmt: skip
    full = score_sequences(model, seqs, Sampling(temperature=0.9), 3, torch.device("cpu"))
    expect = np.concatenate([s["logp_train"] for s in full])[mask]
    np.testing.assert_array_equal(tok["logp_train"].to_numpy(), expect.astype(np.float64))
    np.testing.assert_allclose(tok["delta"], tok["logp_infer"] - tok["logp_train"])
