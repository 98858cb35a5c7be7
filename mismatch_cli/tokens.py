"""Reading a run's token table: the columns `report` needs, split once into finite and
infinite deltas (TokenArrays), so every statistic downstream works on flat arrays.

A token has an "infinite delta" when one side's truncation prunes the token the other side
sampled (kept_train False, logp_train = -inf) or when delta is otherwise not finite: such
tokens are counted (`num_infinite`) and excluded from every mean.
Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import MismatchError
from .schema import STATUS_COMPLETE, TOKENS_FILE

# The columns `report` reads from tokens.parquet (and nothing else).
REQUIRED_COLUMNS: tuple[str, ...] = (
    "seq_id",
    "delta",
    "p_train",
    "p_infer",
    "eps_hat",
    "kept_train",
)
SIDES = ("train", "infer")


def check_by(by: str) -> str:
    """`by` if it names a side (train, infer); else a one-line MismatchError."""
    if by not in SIDES:
        raise MismatchError(f"--by must be one of {', '.join(SIDES)}, got {by!r}")
    return by


@dataclass
class TokenArrays:
    """The token table as flat arrays, split once into finite and infinite deltas.

    Arrays of the finite tokens have shape [n]; per-sequence arrays [S]. `p` is the
    bucketing side's probability (p_train or p_infer, per `by`).
    """

    by: str
    num_tokens: int  # N, all tokens
    delta: np.ndarray  # [n] finite deltas
    p: np.ndarray  # [n] probability of the bucketing side
    p_train: np.ndarray  # [n]
    p_infer: np.ndarray  # [n]
    seq: np.ndarray  # [n] sequence index in 0..S-1
    eps_hat: np.ndarray  # [N] per-position eps_hat (all tokens)
    p_infinite: np.ndarray  # [N - n] bucketing-side p of the tokens with an infinite delta
    seq_infinite: np.ndarray  # [N - n] their sequence index
    seq_ids: np.ndarray  # [S] the seq_id of each sequence index

    @property
    def num_finite(self) -> int:
        return int(self.delta.size)

    @property
    def num_infinite(self) -> int:
        return self.num_tokens - self.num_finite

    @property
    def num_sequences(self) -> int:
        return int(self.seq_ids.size)

    @property
    def one_minus_p(self) -> np.ndarray:
        return 1.0 - self.p


def token_arrays(df: pd.DataFrame | TokenArrays, by: str | None = None) -> TokenArrays:
    """Split a token DataFrame into finite / infinite deltas (see TokenArrays).

    Needs seq_id, delta, p_train, p_infer; eps_hat (NaN if absent) and kept_train (True if
    absent) are optional. A delta is infinite when kept_train is False or delta is not finite.
    `by` None: "train" for a DataFrame; a TokenArrays keeps its own (and must match `by`).
    """
    if isinstance(df, TokenArrays):
        if by is not None and df.by != by:
            raise ValueError(f"TokenArrays built with by={df.by!r}, asked for by={by!r}")
        return df
    by = check_by(by or "train")
    missing = [c for c in ("seq_id", "delta", "p_train", "p_infer") if c not in df.columns]
    if missing:
        raise MismatchError(f"token table lacks column(s) {', '.join(missing)}")
    N = len(df)
    delta = df["delta"].to_numpy(dtype=np.float64, copy=False)  # [N]
    p_all = df[f"p_{by}"].to_numpy(dtype=np.float64, copy=False)  # [N]
    finite = np.isfinite(delta)
    if "kept_train" in df.columns:
        finite &= df["kept_train"].to_numpy(dtype=bool, copy=False)
    codes, uniques = pd.factorize(df["seq_id"], sort=True)  # [N], [S]
    eps_hat = (
        df["eps_hat"].to_numpy(dtype=np.float64, copy=False)
        if "eps_hat" in df.columns
        else np.full(N, np.nan)
    )
    all_finite = bool(finite.all())

    def keep(a: np.ndarray) -> np.ndarray:
        return a if all_finite else a[finite]

    inf = ~finite
    return TokenArrays(
        by=by,
        num_tokens=N,
        delta=keep(delta),
        p=keep(p_all),
        p_train=keep(df["p_train"].to_numpy(dtype=np.float64, copy=False)),
        p_infer=keep(df["p_infer"].to_numpy(dtype=np.float64, copy=False)),
        seq=keep(codes),
        eps_hat=eps_hat,
        p_infinite=p_all[inf],
        seq_infinite=codes[inf],
        seq_ids=np.asarray(uniques),
    )


def load_tokens(
    path: str | Path, columns: Sequence[str] = REQUIRED_COLUMNS
) -> tuple[pd.DataFrame, dict[str, Any], list[str]]:
    """Read only `columns` of a run's tokens.parquet: (tokens, run.json, warnings).

    Raises MismatchError for a path that is not a run, a run without tokens.parquet, a table
    lacking a column, or an empty table; an incomplete run yields a warning, not an error.
    """
    from .runs import finish_hint, open_run, read_tokens

    run, meta = open_run(path)
    status = meta.get("status", "incomplete")
    if not (run.path / TOKENS_FILE).is_file():
        raise MismatchError(
            f"run {run.path} has no {TOKENS_FILE} (status: {status}): nothing to report yet; "
            f"{finish_hint(run.path, meta)}"
        )
    warnings = []
    if status != STATUS_COMPLETE:
        warnings.append(
            f"run {run.path} is {status}, not complete: reporting the {TOKENS_FILE} it has, "
            "which may not hold every prompt"
        )
    df = read_tokens(run.path, columns=list(columns))
    if len(df) == 0:
        raise MismatchError(f"run {run.path} has no tokens: nothing to report")
    return df, meta, warnings


__all__ = [
    "BATCH_ROWS",
    "REQUIRED_COLUMNS",
    "SIDES",
    "TokenArrays",
    "iter_token_batches",
    "load_tokens",
    "num_token_rows",
    "token_arrays",
]


# Rows per batch when a token table is streamed: ~4M rows x a few float64 columns stays
# well under 1 GB however large the run.
BATCH_ROWS = 1 << 22


def iter_token_batches(
    path: str | Path, columns: Sequence[str], batch_rows: int = BATCH_ROWS
) -> Any:
    """Stream columns of a run's tokens.parquet as dicts of numpy arrays, `batch_rows` rows
    at a time, in file order (a sequence's rows are contiguous but may span two batches).
    Memory holds one batch: no pre-buffering of row groups (Arrow would otherwise keep
    every row group's pages of a 10^8-row file). Null floats come back as NaN."""
    import pyarrow.parquet as pq

    file = Path(path) / TOKENS_FILE
    pf = pq.ParquetFile(file, pre_buffer=False, buffer_size=1 << 22)
    for batch in pf.iter_batches(columns=list(columns), batch_size=batch_rows):
        yield {
            name: col.to_numpy(zero_copy_only=False)
            for name, col in zip(batch.schema.names, batch.columns, strict=True)
        }


def num_token_rows(path: str | Path) -> int:
    """Rows of a run's tokens.parquet, from the file footer (nothing else is read)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(Path(path) / TOKENS_FILE).metadata.num_rows
