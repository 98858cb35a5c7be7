"""Per-sequence reductions over token rows: what turns a token table into per-sequence sums,
counts, minima and maxima without a Python loop over tokens or sequences. `sweep`,
`corrections` and `analysis` share them.

Writers keep the token rows of one sequence together and in sequence order (`measure`'s
parts, `write_run`), so a reduction is one `ufunc.reduceat` over the segments, several times
faster than `np.bincount` on 10^7 rows; rows in any other order fall back to `np.bincount`.
Sums are float64.

Streaming (runs of 10^8 tokens in bounded memory, batches from `tokens.TokenBatches`):
`SeqIndex` gives each row its sequence index 0..S-1 from a first pass over seq_id, and
`BatchSeqs` adds a batch's per-sequence reductions into S-sized arrays (a sequence split
across batches is reduced in parts). `Segments` reduces one table held in memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from . import kernels


@dataclass(frozen=True)
class Segments:
    """The sequences of a token table: seq [N] (index 0..S-1 of each row's sequence)."""

    seq: np.ndarray  # [N] int64
    num: int  # S, every index 0..S-1 holds at least one row
    starts: np.ndarray | None  # [S] first row of each sequence when rows are grouped in order

    @classmethod
    def of(cls, seq: np.ndarray, num: int | None = None) -> Segments:
        """Segments of `seq` (num: S; default max + 1), with reduceat starts if grouped."""
        seq = np.asarray(seq)
        n = (int(seq.max()) + 1 if seq.size else 0) if num is None else int(num)
        starts = None
        if seq.size and bool(np.all(seq[1:] >= seq[:-1])):
            s = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
            if s.size == n and seq[0] == 0:  # every index present, in order
                starts = s
        return cls(seq, n, starts)

    def sum(self, values: np.ndarray) -> np.ndarray:
        """Per-sequence sum of values [N] (bool counts as 0/1) in float64. -> [S]"""
        if self.starts is not None:
            if values.dtype.kind in "biu":  # counts: exact either way, without a cast
                out = np.empty(self.num)
                kernels.segment_counts(np.ascontiguousarray(values), self.starts, out)
                return out
            return np.add.reduceat(values, self.starts, dtype=np.float64)
        return np.bincount(self.seq, weights=values, minlength=self.num)

    def any(self, mask: np.ndarray) -> np.ndarray:
        """Does the sequence hold a True? mask [N] bool -> [S] bool"""
        if self.starts is not None:
            return np.logical_or.reduceat(mask, self.starts)
        return np.bincount(self.seq, weights=mask, minlength=self.num) > 0

    def max(self, values: np.ndarray) -> np.ndarray:
        """Per-sequence maximum of values [N] -> [S]"""
        if self.starts is not None:
            return np.maximum.reduceat(values, self.starts)
        out = np.full(
            self.num, np.iinfo(values.dtype).min if values.dtype.kind in "iu" else -np.inf
        )
        np.maximum.at(out, self.seq, values)
        return out

    def min(self, values: np.ndarray) -> np.ndarray:
        """Per-sequence minimum of values [N] -> [S]"""
        if self.starts is not None:
            return np.minimum.reduceat(values, self.starts)
        out = np.full(self.num, np.iinfo(values.dtype).max if values.dtype.kind in "iu" else np.inf)
        np.minimum.at(out, self.seq, values)
        return out

    def sizes(self) -> np.ndarray:
        """Token rows per sequence. -> [S] int64"""
        if self.starts is not None:
            return np.diff(np.r_[self.starts, self.seq.size])
        return np.bincount(self.seq, minlength=self.num)

    def broadcast(self, per_seq: np.ndarray) -> np.ndarray:
        """Each row's value of its sequence: per_seq [S] -> [N]"""
        if self.starts is not None:
            return np.repeat(per_seq, self.sizes())
        return per_seq[self.seq]

    def sum_rows(self, values: np.ndarray) -> np.ndarray:
        """Per-sequence sums of a [N, G] array, float64 [S, G]. Grouped rows: one compiled
        pass (`kernels.segment_rows`) that accumulates in float64 whatever the input's
        precision (a float32 grid summed in float32 had a relative error up to T 2^-24 for
        a T-row sequence)."""
        if self.starts is not None:
            out = np.empty((self.num, values.shape[1]))
            kernels.segment_rows(np.ascontiguousarray(values), self.starts, out)
            return out
        out = np.zeros((self.num, values.shape[1]))
        for g in range(values.shape[1]):  # G columns, never N rows
            out[:, g] = np.bincount(self.seq, weights=values[:, g], minlength=self.num)
        return out


@dataclass(frozen=True)
class SeqIndex:
    """The distinct seq_ids of a token table, sorted [S]: row -> sequence index 0..S-1 (the
    order `pd.factorize(..., sort=True)` gives), from a first pass over the seq_id column."""

    ids: np.ndarray  # [S]

    @classmethod
    def scan(cls, chunks: Iterable[np.ndarray]) -> SeqIndex:
        """From the seq_id column in chunks (each [n])."""
        parts = [distinct(np.asarray(c)) for c in chunks]
        return cls(np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64))

    @property
    def num(self) -> int:
        return int(self.ids.size)

    def codes(self, seq_id: np.ndarray) -> np.ndarray:
        """Sequence index of each row: seq_id [n] -> [n] int64. Rows grouped by sequence
        (the writers' order) are searched once per run of equal ids, not once per row."""
        seq_id = np.asarray(seq_id)
        if seq_id.size > 1:
            starts = np.flatnonzero(np.r_[True, seq_id[1:] != seq_id[:-1]])  # [r] runs
            if starts.size <= seq_id.size // 4:
                at = np.searchsorted(self.ids, seq_id[starts]).astype(np.int64, copy=False)
                return np.repeat(at, np.diff(np.r_[starts, seq_id.size]))
        return np.searchsorted(self.ids, seq_id).astype(np.int64, copy=False)


def runs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The runs of equal values of x [n]: (first row of each [r], its value [r]). x is
    grouped in ascending order (the writers' order) exactly when the values strictly rise."""
    x = np.ascontiguousarray(x)
    if x.dtype.kind in "iuf":  # one compiled pass
        out = np.empty(x.size, np.intp)
        starts = out[: kernels.run_starts(x, out)]
    else:
        starts = np.flatnonzero(np.r_[x.size > 0, x[1:] != x[:-1]])
    return starts, x[starts]


def distinct(x: np.ndarray) -> np.ndarray:
    """Distinct values of x, sorted (a linear pass when x is already sorted)."""
    if x.size > 1 and x.dtype.kind in "iuf" and bool(np.all(x[1:] >= x[:-1])):
        return x[np.r_[True, x[1:] != x[:-1]]]
    return np.unique(x)


class BatchSeqs:
    """The sequences of one batch of token rows: seq [n] (global indices 0..S-1) -> ids
    [k], the batch's sequences, and `part`, Segments over the batch-local indices.
    Reductions over the batch are added into S-sized arrays (`add`, `minimum`, ...): a
    sequence split across batches is reduced in parts."""

    def __init__(self, seq: np.ndarray) -> None:
        seq = np.asarray(seq, dtype=np.int64)
        self.seq = seq  # [n]
        if seq.size and bool(np.all(seq[1:] >= seq[:-1])):  # grouped in order (the writers')
            self.ids = np.arange(seq[0], seq[-1] + 1)  # [k]
            local = seq - seq[0]
        else:
            self.ids, local = np.unique(seq, return_inverse=True)
        self.local = local  # [n] index into ids
        self.part = Segments.of(local, self.ids.size)

    @classmethod
    def grouped(cls, at: np.ndarray, starts: np.ndarray, n: int) -> BatchSeqs:
        """`BatchSeqs(seq)` for n rows in runs of one sequence each (first rows `starts` [r],
        `runs`), run j of sequence index at[j] (ascending): seq and local in one compiled
        pass, the runs not searched again."""
        self = cls.__new__(cls)
        self.seq, self.local = np.empty(n, np.int64), np.empty(n, np.int64)
        kernels.expand_runs(np.ascontiguousarray(at, np.int64), starts, self.seq, self.local)
        self.ids = np.arange(int(at[0]), int(at[-1]) + 1)
        whole = starts.size == self.ids.size  # every sequence in between has rows here
        self.part = Segments(self.local, self.ids.size, starts if whole else None)
        return self

    def add(self, acc: np.ndarray, values: np.ndarray) -> None:
        """acc[s] += sum of values [n] over the batch's rows of sequence s (acc [S])."""
        acc[self.ids] += self.part.sum(values)

    def add_rows(self, acc: np.ndarray, values: np.ndarray) -> None:
        """acc[s] += per-sequence sums of the rows of values [n, G] (acc [S, G])."""
        acc[self.ids] += self.part.sum_rows(values)

    def minimum(self, acc: np.ndarray, values: np.ndarray) -> None:
        """acc[s] = min(acc[s], min of values [n] over the batch's rows of s)."""
        acc[self.ids] = np.minimum(acc[self.ids], self.part.min(values))

    def maximum(self, acc: np.ndarray, values: np.ndarray) -> None:
        """acc[s] = max(acc[s], max of values [n] over the batch's rows of s)."""
        acc[self.ids] = np.maximum(acc[self.ids], self.part.max(values))


__all__ = ["BatchSeqs", "Segments", "SeqIndex", "distinct", "runs"]
