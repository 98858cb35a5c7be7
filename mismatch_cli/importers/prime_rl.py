"""prime-rl token exports (`trainer.enable_token_export`, PrimeIntellect-ai/prime-rl @ 559b447).

Files: `{output_dir}/token_exports/step_{N}/rank_{R}.jsonl`, one JSON object per packed
sample, and an empty `STABLE` file in the step folder once every rank has written it.
Per-token arrays run over the WHOLE sample (context + sampled tokens) and share one index:
`inference_logprobs[i]` and `trainer_logprobs[i]` are log-probs of `token_ids[i]` given
`token_ids[<i]`; only `loss_mask` positions are model tokens (position 0 holds garbage from
the trainer's shift and is never masked in). A sample starts where `position_ids` restart at
0; the prompt is what precedes its first loss-masked token. Floats are null when non-finite.
Sign: prime-rl's `log_importance_ratio = trainer_logprobs - inference_logprobs` = -delta.

Parsing is Arrow's JSON reader over blocks of whole lines, with only the fields read here
in the schema (the ratio, weight and mask arrays are skipped unparsed); everything after is
vectorised per block.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from .toolkit import Chunk, ReadContext, jsonl_tables, list_column, missing, per_token_column

NAME = "prime-rl"
PATTERNS = ("rank_*.jsonl",)
PICKLE = False
SIDES = "both"
SIGN = (
    "prime-rl: log_importance_ratio = trainer_logprobs - inference_logprobs = -delta; "
    "imported as delta = inference_logprobs - trainer_logprobs"
)
STABLE = "STABLE"

_LIST = {
    "token_ids": pa.list_(pa.int64()),
    "position_ids": pa.list_(pa.int64()),
    "loss_mask": pa.list_(pa.bool_()),
    "inference_logprobs": pa.list_(pa.float64()),
    "trainer_logprobs": pa.list_(pa.float64()),
    "advantages": pa.list_(pa.float64()),
}
SCHEMA = pa.schema(
    [("step", pa.int64()), ("rank", pa.int64()), ("env_name", pa.string()),
     *((k, t) for k, t in _LIST.items())]
)  # fmt: skip
_REQUIRED = ("token_ids", "position_ids", "loss_mask", "inference_logprobs", "trainer_logprobs")


def step_of(path: Path) -> int | None:
    """N of a `step_N` folder, else None."""
    m = re.fullmatch(r"step_(\d+)", path.parent.name)
    return int(m.group(1)) if m else None


def select(files: Sequence[Path], warn, explicit: set[Path]) -> list[Path]:
    """Drop files of step folders without the STABLE marker (still being written), saying
    so; a file named on the command line is kept, with a warning."""
    out, unstable = [], set()
    for f in files:
        if step_of(f) is None or (f.parent / STABLE).exists():
            out.append(f)
        elif f.resolve() in explicit:
            warn(f"{f.parent} has no {STABLE} marker: importing {f.name}, which may be incomplete")
            out.append(f)
        else:
            unstable.add(f.parent)
    for d in sorted(unstable):
        warn(f"skipped {d}: no {STABLE} marker (prime-rl writes it once every rank is done)")
    return out


def read(path: Path, ctx: ReadContext) -> Iterator[Chunk]:
    """The samples of one rank file, one Chunk per block of lines."""
    dir_step = step_of(path)
    for first, table in jsonl_tables(path, SCHEMA):
        yield _chunk(table, first, path, dir_step)


def _chunk(table: pa.Table, first: int, path: Path, dir_step: int | None) -> Chunk:
    where = f"{path}"
    absent = [k for k in _REQUIRED if table.column(k).null_count == table.num_rows]
    if absent:
        raise missing(f"{where} record {first}", absent, " (is this a prime-rl token export?)")
    lens, tok = list_column(table, "token_ids", where, np.int64)
    arrays = {}
    for k in (*_REQUIRED[1:], "advantages"):
        if k == "advantages" and table.column(k).null_count == table.num_rows:
            continue
        dtype = bool if k == "loss_mask" else np.float64
        arrays[k] = per_token_column(table, k, where, dtype, lens, first, "token_ids")
    T = tok.size
    rec = np.repeat(np.arange(table.num_rows), lens)  # [T] record of each position
    rec_start = np.zeros(T, bool)
    rec_start[np.concatenate([[0], np.cumsum(lens)[:-1]])[lens > 0]] = True
    start = rec_start | (arrays["position_ids"] == 0)  # a new sample where positions restart
    sid = np.cumsum(start) - 1  # [T] sample of each position
    M = int(start.sum())
    mask = arrays["loss_mask"]
    m_idx = np.flatnonzero(mask)
    first_model = np.full(M, -1, np.int64)
    u, fi = np.unique(sid[m_idx], return_index=True)
    first_model[u] = m_idx[fi]
    has_model = first_model >= 0  # [M] samples holding at least one model token
    fm = first_model[sid]
    completion = (fm >= 0) & (np.arange(T) >= fm)  # [T]
    prompt = (fm >= 0) & ~completion
    sample_rec = rec[np.flatnonzero(start)][has_model]  # [S] record of each kept sample

    steps = table.column("step").to_numpy(zero_copy_only=False)
    step = np.asarray(steps, dtype=float)[sample_rec]
    if np.isnan(step).any():
        if dir_step is None:
            raise missing(f"{where} record {first + int(sample_rec[np.isnan(step)][0])}", ["step"])
        step = np.where(np.isnan(step), dir_step, step)
    env = np.asarray(table.column("env_name").to_pylist(), dtype=object)[sample_rec]
    token_extra = {}
    if "advantages" in arrays:
        token_extra["advantage"] = arrays["advantages"][completion]
    return Chunk(
        prompt_lens=np.bincount(sid[prompt], minlength=M)[has_model].astype(np.int64),
        prompt_ids=tok[prompt],
        lens=np.bincount(sid[completion], minlength=M)[has_model].astype(np.int64),
        token_ids=tok[completion],
        logp_infer=arrays["inference_logprobs"][completion],
        logp_train=arrays["trainer_logprobs"][completion],
        loss_mask=mask[completion],
        token_extra=token_extra,
        seq_extra={"step": step.astype(np.int64), "env": env, "source_row": first + sample_rec},
    )


def warnings(steps: set[int]) -> list[str]:
    """prime-rl is asynchronous: the trainer scores rollouts made by older weights."""
    return [
        "prime-rl trains asynchronously: a rollout of step N can come from weights up to "
        "orchestrator.max_off_policy_steps (default 8) versions older than the trainer's, so "
        "this mismatch mixes weight staleness with numerical mismatch"
    ]
