"""`tokens`: our generic format, for every trainer without a reader here (TRL, OpenRLHF,
AReaL, in-house code). JSON lines or Parquet, one row per completion:

    prompt_token_ids    list[int]     the prompt as the engine saw it
    response_token_ids  list[int]     the whole completion (tool / observation tokens included)
    logprobs_infer      list[float]   inference log-prob of each response token (null allowed)
    logprobs_train      list[float]   optional: trainer log-prob of each response token
    loss_mask           list[bool|int] optional: 1 = model-generated (default: all 1)
    step                int           optional: training step
    env                 str           optional: environment / task name
    advantage           float | list[float]  optional: per completion or per token
    reward              float         optional
    turn                list[int]     optional: turn index per token (default: runs of model
                                      tokens between masked spans)

Both log-prob lists are natural-log probabilities of the sampled token under each side's
SAMPLING distribution (after temperature and truncation); delta = logprobs_infer -
logprobs_train. docs/import.md has hooks that write this from TRL and OpenRLHF.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import MismatchError
from .toolkit import Chunk, ReadContext, jsonl_tables, list_column, missing, per_token_column

NAME = "tokens"
PATTERNS = ("*.jsonl", "*.parquet")
PICKLE = False
SIDES = "either"
SIGN = "tokens: logprobs_infer and logprobs_train as given; delta = logprobs_infer - logprobs_train"
_REQUIRED = ("prompt_token_ids", "response_token_ids", "logprobs_infer")
FIELDS = (*_REQUIRED, "logprobs_train", "loss_mask", "step", "env", "advantage", "reward", "turn")
PARQUET_ROWS = 4096


def step_of(path: Path) -> int | None:
    return None  # the step is a field of each row


def read(path: Path, ctx: ReadContext) -> Iterator[Chunk]:
    """One Chunk per block of lines (JSONL) or row batch (Parquet)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise MismatchError(f"{path}: not a Parquet file ({e})") from e
        cols = [c for c in FIELDS if c in pf.schema_arrow.names]
        first = 0
        for batch in pf.iter_batches(batch_size=PARQUET_ROWS, columns=cols):
            table = pa.Table.from_batches([batch])
            yield _chunk(table, first, str(path))
            first += table.num_rows
    else:
        for first, table in jsonl_tables(path):
            yield _chunk(table, first, str(path))


def _present(table: pa.Table, name: str) -> bool:
    return name in table.column_names and table.column(name).null_count < table.num_rows


def _chunk(table: pa.Table, first: int, where: str) -> Chunk:
    absent = [k for k in _REQUIRED if not _present(table, k)]
    if absent:
        raise missing(f"{where} record {first}", absent, " (see docs/import.md, `tokens`)")
    plens, pids = list_column(table, "prompt_token_ids", where, np.int64)
    lens, tok = list_column(table, "response_token_ids", where, np.int64)

    def per_token(name: str, dtype) -> np.ndarray:
        return per_token_column(table, name, where, dtype, lens, first, "response_token_ids")

    li = per_token("logprobs_infer", np.float64)
    lt = per_token("logprobs_train", np.float64) if _present(table, "logprobs_train") else None
    mask = per_token("loss_mask", bool) if _present(table, "loss_mask") else np.ones(tok.size, bool)
    token_extra: dict[str, np.ndarray] = {}
    if _present(table, "turn"):
        token_extra["turn"] = per_token("turn", np.int64).astype(np.int32)
    if _present(table, "advantage"):
        col = table.column("advantage")
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            token_extra["advantage"] = per_token("advantage", np.float64)
        else:
            adv = np.asarray(col.cast(pa.float64()).to_numpy(zero_copy_only=False), np.float64)
            token_extra["advantage"] = np.repeat(adv, lens)
    seq_extra: dict[str, np.ndarray] = {"source_row": first + np.arange(table.num_rows)}
    for name in ("step", "env", "reward"):
        if not _present(table, name):
            continue
        col = table.column(name)
        if name == "step":
            if col.null_count:
                r = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
                raise missing(
                    f"{where} record {first + r}", ["step"], " (give it in every record or none)"
                )
            seq_extra["step"] = col.cast(pa.int64()).to_numpy(zero_copy_only=False)
        elif name == "env":
            seq_extra["env"] = np.asarray(col.cast(pa.string()).to_pylist(), dtype=object)
        else:
            seq_extra["reward"] = col.cast(pa.float64()).to_numpy(zero_copy_only=False)
    return Chunk(plens, pids, lens, tok, li, mask, lt, token_extra, seq_extra)
