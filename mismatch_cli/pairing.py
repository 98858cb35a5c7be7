"""Two runs over the same rollouts, token against token: `pair_runs` streams the rows both
runs hold, matched on (seq_id, pos), into an accumulator (`compare.moved`'s movement of each
side, `attribution.side_errors`'s per-side errors against a reference run). Memory: about a
batch per run, whatever the runs' size. Reads run directories only (no torch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import pandas as pd

from .runs import read_tokens
from .tokens import TokenBatches, open_run_tokens, prefetch

KEYS = ("seq_id", "pos")


class PairAccumulator(Protocol):
    """What `pair_runs` feeds: matched rows (`add(a, b)`, row i of a matching row i of b,
    each a dict of the requested columns) and the rows only one run holds."""

    num_only_a: int
    num_only_b: int

    def add(self, a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None: ...


A = TypeVar("A", bound=PairAccumulator)


class PairCounts:
    """The counts every accumulator of two runs keeps: matched rows (`num_common`), rows
    only one run holds, and matched rows holding different tokens (`num_diff`)."""

    def __init__(self) -> None:
        self.num_common = self.num_only_a = self.num_only_b = self.num_diff = 0

    def count(self, a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> int:
        """Count a batch of matched rows (and those whose token_id differs); return its size."""
        n = len(a["seq_id"])
        self.num_common += n
        if n:
            self.num_diff += int(np.count_nonzero(a["token_id"] != b["token_id"]))
        return n

    def unshared(self) -> str | None:
        """Why the two runs do not share rollouts (None if they do)."""
        if not self.num_common:
            return "no (seq_id, pos) in common"
        if self.num_diff:
            return (
                f"{self.num_diff:,} of {self.num_common:,} common positions hold different tokens"
            )
        return None


def _source(path: str | Path, columns: Sequence[str], batch_rows: int, verb: str) -> TokenBatches:
    """A run's tokens.parquet as TokenBatches with `columns` (an empty table pairs nothing;
    an incomplete run is paired as it is)."""
    return open_run_tokens(
        path, verb=verb, needed=list(columns), batch_rows=batch_rows, allow_empty=True
    )


def _aligned(src_a: TokenBatches, src_b: TokenBatches, cols: list[str], acc: A) -> bool:
    """Runs sharing rollouts store the same (seq_id, pos) in the same row order: pair them
    batch against batch. False (acc then holds partial sums) at the first batch whose keys
    differ."""
    if src_a.num_rows != src_b.num_rows:
        return False
    pairs = zip(prefetch(src_a.read(cols)), prefetch(src_b.read(cols)), strict=True)
    for a, b in pairs:
        if not all(np.array_equal(a[k], b[k]) for k in KEYS):
            return False
        acc.add(a, b)
    return True


def _join(fa: pd.DataFrame, fb: pd.DataFrame, cols: list[str], acc: A) -> None:
    """Match rows of two chunks holding the same sequences on (seq_id, pos) into acc."""
    j = fa.merge(fb, on=list(KEYS), suffixes=("_a", "_b"))
    acc.num_only_a += len(fa) - len(j)
    acc.num_only_b += len(fb) - len(j)
    keys = {k: j[k].to_numpy() for k in KEYS}
    rest = [c for c in cols if c not in KEYS]
    acc.add(
        {**keys, **{c: j[f"{c}_a"].to_numpy() for c in rest}},
        {**keys, **{c: j[f"{c}_b"].to_numpy() for c in rest}},
    )


def _joined(src_a: TokenBatches, src_b: TokenBatches, cols: list[str], acc: A) -> bool:
    """A merge join on (seq_id, pos) for runs whose rows are in another order, a batch of
    sequences at a time: both tables are read in seq_id order, and the sequences below the
    smaller of the two last seq_ids read are complete on both sides, so they are joined and
    dropped (memory: about a batch per run). False at once if a table is not sorted by
    seq_id (acc then holds partial sums)."""
    its = {"a": prefetch(src_a.read(cols)), "b": prefetch(src_b.read(cols))}
    frames = {k: pd.DataFrame(columns=cols) for k in its}
    done = dict.fromkeys(its, False)

    def last(k: str) -> float:
        """The largest seq_id read from k (+inf once k is exhausted, -inf before any)."""
        if done[k]:
            return math.inf
        return float(frames[k]["seq_id"].iat[-1]) if len(frames[k]) else -math.inf

    while not all(done.values()):
        k = min((k for k in its if not done[k]), key=last)  # read where it is behind
        batch = next(its[k], None)
        if batch is None:
            done[k] = True
        else:
            sid = batch["seq_id"]
            if sid.size and (np.any(sid[1:] < sid[:-1]) or sid[0] < last(k)):
                return False
            frames[k] = pd.concat([frames[k], pd.DataFrame(batch)], ignore_index=True)
        upto = min(last(x) for x in its)  # sequences below it are complete on both sides
        if -math.inf < upto < math.inf:
            ma, mb = (frames[x]["seq_id"].to_numpy() < upto for x in ("a", "b"))
            _join(frames["a"][ma], frames["b"][mb], cols, acc)
            frames["a"], frames["b"] = frames["a"][~ma], frames["b"][~mb]
    _join(frames["a"], frames["b"], cols, acc)
    return True


def pair_runs(
    a: str | Path,
    b: str | Path,
    columns: Sequence[str],
    new_acc: Callable[[], A],
    *,
    batch_rows: int,
    verb: str = "compare",
) -> A:
    """Feed every row the runs `a` and `b` both hold (matched on (seq_id, pos); `columns`
    must include both keys) into a fresh `new_acc()`, and return it. Row against row when
    both store the same keys in the same order (a rescored run and its source do), else a
    streamed merge join by sequence, else (tables not sorted by seq_id) a join of the whole
    tables. `verb` names the command in a read error."""
    cols = list(columns)
    src_a, src_b = (_source(p, cols, batch_rows, verb) for p in (a, b))
    acc = new_acc()
    if _aligned(src_a, src_b, cols, acc):
        return acc
    acc = new_acc()
    if _joined(src_a, src_b, cols, acc):
        return acc
    acc = new_acc()
    _join(read_tokens(a, cols), read_tokens(b, cols), cols, acc)
    return acc


__all__ = ["KEYS", "PairAccumulator", "PairCounts", "pair_runs"]
