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


def test_out_checks_read_only_then_prepare_out_acts(tmp_path: Path) -> None:
    """`check_measure_out` (what measure checks before anything loads) refuses what `prepare_out`
    refuses and never creates or removes a folder; `prepare_out` then replaces a run only
    with --overwrite, and never a folder that is not a run."""
    import pytest

    from mismatch_cli.errors import MismatchError
    from mismatch_cli.pipeline import check_measure_out, prepare_out

    def make(name: str, status: str) -> Path:
        run = RunDir(tmp_path / name)
        run.path.mkdir()
        run.write_meta({"status": status})
        (run.path / "tokens.parquet").write_bytes(b"old")
        return run.path

    complete, incomplete = make("complete", "complete"), make("incomplete", "incomplete")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("not a run")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    refusals = [
        (a_file, {}, "exists and is a file"),
        (complete, {}, "pass --overwrite"),
        (complete, {"resume": True}, "already complete"),
        (incomplete, {}, "pass --resume"),
        (tmp_path / "new", {"resume": True}, "nothing to resume"),
        (other, {}, "not a run"),
        (other, {"overwrite": True}, "not a run"),
    ]
    for out, flags, needle in refusals:
        kw = {"resume": False, "overwrite": False, **flags}
        for check in (check_measure_out, prepare_out):
            with pytest.raises(MismatchError, match=needle):
                check(out, **kw)
    assert (other / "keep.txt").read_text() == "not a run"
    check_measure_out(tmp_path / "new", resume=False, overwrite=False)
    check_measure_out(complete, resume=False, overwrite=True)
    check_measure_out(incomplete, resume=True, overwrite=False)
    assert not (tmp_path / "new").exists() and (complete / "tokens.parquet").exists()
    assert prepare_out(incomplete, resume=True, overwrite=False).exists()  # kept, to resume
    assert (incomplete / "tokens.parquet").exists()
    prepare_out(complete, resume=False, overwrite=True)
    assert complete.is_dir() and list(complete.iterdir()) == []  # replaced: an empty folder
    prepare_out(tmp_path / "new", resume=False, overwrite=False)
    assert (tmp_path / "new").is_dir()
