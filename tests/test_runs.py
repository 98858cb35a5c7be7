"""The run directory's one owner: derived columns, sequence sums, streaming finalize."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from mismatch_cli.runs import (
    RunDir,
    new_meta,
    read_sequences,
    read_tokens,
    sequence_frame,
    sequence_sums,
    token_frame,
    write_run,
)
from mismatch_cli.schema import TOKEN_COLUMNS


def _tokens() -> pd.DataFrame:
    inf = math.inf
    return token_frame(
        {
            "seq_id": np.array([0, 0, 1, 1, 1, 2], dtype=np.int64),
            "pos": np.array([0, 1, 0, 1, 2, 0], dtype=np.int32),
            "logp_infer": [-0.1, -1.0, -2.0, -0.5, -3.0, -0.2],
            # seq 1 holds a +inf delta (train pruned) and a -inf delta (infer side -inf)
            "logp_train": [-0.2, -1.1, -inf, -0.4, -3.1, -0.2],
        }
    ).assign(delta=lambda d: d["delta"].where(d.index != 4, -inf))


def test_token_frame_derives_delta_p_and_kept() -> None:
    t = _tokens()
    assert list(t.columns) == [c for c in TOKEN_COLUMNS if c in t.columns]
    assert t["delta"].iloc[0] == -0.1 - -0.2
    assert t["kept_train"].tolist() == [True, True, False, True, True, True]
    np.testing.assert_allclose(t["p_infer"], np.exp(t["logp_infer"]))


def test_sequence_with_both_infinities_is_nan_not_zero() -> None:
    """bincount of +inf and -inf gives NaN: the sum stays undefined, never 0."""
    sums = sequence_sums(_tokens()).set_index("seq_id")
    assert math.isnan(sums.loc[1, "sum_delta"])
    assert sums.loc[0, "sum_delta"] == (-0.1 - -0.2) + (-1.0 - -1.1)


def test_only_sequences_without_tokens_get_zero() -> None:
    seqs = pd.DataFrame({"seq_id": [0, 1, 2, 3], "text": ["a", "b", "c", "empty"]})
    df = sequence_frame(seqs, sequence_sums(_tokens())).set_index("seq_id")
    assert df.loc[3, "num_tokens"] == 0 and df.loc[3, "sum_delta"] == 0.0
    assert math.isnan(df.loc[1, "sum_delta"])
    assert df.loc[1, "num_tokens"] == 3 and df.loc[0, "num_tokens"] == 2


def test_write_run_and_streaming_finalize_agree(tmp_path: Path) -> None:
    tokens = _tokens()
    seqs = pd.DataFrame({"seq_id": [0, 1, 2, 3], "text": ["a", "b", "c", ""]})
    a = write_run(tmp_path / "a", tokens, seqs, new_meta("test"))
    run = RunDir(tmp_path / "b")
    run.path.mkdir()
    run.write_part("tokens", 0, tokens[tokens["seq_id"] < 2])  # whole sequences per part
    run.write_part("tokens", 1, tokens[tokens["seq_id"] >= 2])
    summary = run.finalize(2, seqs)
    assert pq.ParquetFile(run.path / "tokens.parquet").num_row_groups == 2
    pd.testing.assert_frame_equal(read_tokens(a), read_tokens(run.path))
    pd.testing.assert_frame_equal(read_sequences(a), read_sequences(run.path))
    assert summary == RunDir(a).read_meta()["summary"]
    assert summary["num_tokens"] == 6 and summary["num_infinite"] == 2


def test_finalize_fills_a_column_one_part_lacks_with_nulls(tmp_path: Path) -> None:
    tokens = _tokens()
    run = RunDir(tmp_path / "c")
    run.path.mkdir()
    run.write_part("tokens", 0, tokens[tokens["seq_id"] < 2])
    run.write_part("tokens", 1, tokens[tokens["seq_id"] >= 2].drop(columns=["pos"]))
    run.finalize(2)
    pos = read_tokens(run.path)["pos"]
    assert pos.iloc[:5].tolist() == [0, 1, 0, 1, 2] and pd.isna(pos.iloc[5])
    assert read_sequences(run.path)["seq_id"].tolist() == [0, 1, 2]


def test_atomic_writes_get_the_mode_open_would_give(tmp_path: Path) -> None:
    """Written through a temporary file, a run's files still get the umask's mode, not
    mkstemp's 0600 (a run or report page shared on a cluster must be readable)."""
    import os

    from mismatch_cli.runs import _UMASK, atomic_write_bytes

    p = tmp_path / "page.html"
    atomic_write_bytes(p, b"x")
    assert (p.stat().st_mode & 0o777) == (0o666 & ~_UMASK)
    assert os.umask(_UMASK) == _UMASK  # reading it left the process's umask as it was
