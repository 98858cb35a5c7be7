"""A mergeable quantile sketch with a bounded relative error, vectorised with numpy: what
lets `report`, `corrections` and the figures give quantiles of 10^8 values in bounded memory.

The scheme is DDSketch's (Masson, Rim, Lee, VLDB 2019): a value x > 0 goes to the bucket
k = ceil(log(x) / log(gamma)), which covers (gamma^(k-1), gamma^k], and a bucket is read
back as 2 gamma^k / (gamma + 1). Every value in the bucket is then within a relative error
alpha = (gamma - 1) / (gamma + 1) of that representative. Counts are exact, so the rank of a
quantile is exact and only the value is approximated:

    |quantile_sketch(q) - quantile_exact(q)| <= alpha * quantile_exact(q)

for numpy's default (linear) quantile, which interpolates between two order statistics that
are each approximated within alpha. The default alpha = 0.005 (0.5%); tests check <= 1%
against np.quantile. Zeros are counted exactly; the minimum and maximum are exact, and
values outside [MIN_VALUE, MAX_VALUE] are clamped into the end buckets (their quantiles
are still clamped to the exact min / max). Hand-written rather than the `ddsketch`
package, whose `add` takes one value at a time (10^8 Python calls).

A sketch holds G independent groups (e.g. the report's probability buckets): add(values,
group) with group [n] in 0..G-1. Sketches of chunks merge by adding their counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

DEFAULT_ALPHA = 0.005
MIN_VALUE = 1e-30
MAX_VALUE = 1e10


class QuantileSketch:
    """Quantiles of non-negative values in G groups, relative error <= alpha (module doc)."""

    def __init__(self, groups: int = 1, alpha: float = DEFAULT_ALPHA) -> None:
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.groups = int(groups)
        self.alpha = float(alpha)
        self.gamma = (1 + alpha) / (1 - alpha)
        self._inv_log_gamma = 1.0 / math.log(self.gamma)
        self._k0 = math.ceil(math.log(MIN_VALUE) * self._inv_log_gamma)  # key of bucket 0
        k1 = math.ceil(math.log(MAX_VALUE) * self._inv_log_gamma)
        self.num_buckets = k1 - self._k0 + 1
        self.counts = np.zeros((self.groups, self.num_buckets), dtype=np.int64)  # [G, B]
        self.zeros = np.zeros(self.groups, dtype=np.int64)  # [G] exact zeros
        self.min = np.full(self.groups, np.inf)  # [G]
        self.max = np.full(self.groups, -np.inf)  # [G]

    @property
    def count(self) -> np.ndarray:
        """Values added per group. [G]"""
        return self.counts.sum(axis=1) + self.zeros

    def add(self, values: np.ndarray, group: np.ndarray | None = None) -> None:
        """Add finite non-negative values [n] to their groups [n] (group 0 if None).
        NaN and infinite values are ignored (callers count those themselves)."""
        x = np.asarray(values, dtype=np.float64)
        g = None if group is None else np.asarray(group)
        ok = np.isfinite(x)
        if not ok.all():  # copies only when something is dropped
            x = x[ok]
            g = None if g is None else g[ok]
        if x.size == 0:
            return
        lo = x.min()
        if lo < 0:
            raise ValueError("QuantileSketch takes non-negative values")
        G, B = self.groups, self.num_buckets
        pos, gp = x, g
        if lo == 0:
            zero = x == 0
            self.zeros += np.bincount(_group_or_zero(g, zero), minlength=G)
            pos = x[~zero]
            gp = None if g is None else g[~zero]
        if pos.size:
            with np.errstate(divide="ignore"):
                k = np.log(pos)  # [n'] then the bucket key, in place
            k *= self._inv_log_gamma
            np.ceil(k, out=k)
            key = k.astype(np.int64)
            key -= self._k0
            np.clip(key, 0, B - 1, out=key)
            if gp is None:  # one group: no composite index
                self.counts[0] += np.bincount(key, minlength=B)
            else:
                key += gp.astype(np.int64) * B
                self.counts += np.bincount(key, minlength=G * B).reshape(G, B)
        if g is None:
            self.min[0] = min(self.min[0], lo)
            self.max[0] = max(self.max[0], x.max())
        else:
            np.minimum.at(self.min, g, x)
            np.maximum.at(self.max, g, x)

    def merge(self, other: QuantileSketch) -> QuantileSketch:
        """Add another sketch's counts (same groups and alpha) into this one; returns self."""
        if (other.groups, other.alpha) != (self.groups, self.alpha):
            raise ValueError("can only merge sketches with the same groups and alpha")
        self.counts += other.counts
        self.zeros += other.zeros
        np.minimum(self.min, other.min, out=self.min)
        np.maximum(self.max, other.max, out=self.max)
        return self

    def _values_at_ranks(self, g: int, ranks: np.ndarray) -> np.ndarray:
        """The (approximate) order statistics of group g at 0-based ranks [R]. -> [R]"""
        z = int(self.zeros[g])
        cum = np.cumsum(self.counts[g])  # [B]
        keys = np.searchsorted(cum, ranks - z, side="right")  # bucket holding each rank
        rep = 2.0 * self.gamma ** (keys + self._k0) / (self.gamma + 1.0)  # [R]
        rep = np.clip(rep, self.min[g], self.max[g])
        return np.where(ranks < z, 0.0, rep)

    def quantile(self, qs: Sequence[float] | float) -> np.ndarray:
        """numpy's linear quantiles of every group: [G, Q] (NaN for an empty group).
        q = 1 gives the exact maximum, q = 0 the exact minimum."""
        q = np.atleast_1d(np.asarray(qs, dtype=np.float64))  # [Q]
        out = np.full((self.groups, q.size), np.nan)
        n = self.count
        for g in np.flatnonzero(n):  # a loop over groups, never over values
            h = q * (n[g] - 1)  # [Q] fractional 0-based rank
            lo, hi = np.floor(h).astype(np.int64), np.ceil(h).astype(np.int64)
            vals = self._values_at_ranks(g, np.concatenate([lo, hi]))
            v_lo, v_hi = vals[: q.size], vals[q.size :]
            out[g] = v_lo + (h - lo) * (v_hi - v_lo)
            out[g, q == 1.0] = self.max[g]
            out[g, q == 0.0] = self.min[g]
        return out


def _group_or_zero(g: np.ndarray | None, mask: np.ndarray) -> np.ndarray:
    """The groups of the masked values, or zeros (one group) when g is None."""
    return np.zeros(int(np.count_nonzero(mask)), np.int64) if g is None else g[mask]


class QuantileAccumulator:
    """Quantiles of a stream of values in G groups: exact (numpy's linear quantiles of the
    values kept) while at most `exact_limit` values have been added, a `QuantileSketch`
    (relative error <= alpha) beyond. Small runs therefore get exactly what an in-memory
    computation gives; runs of 10^8 tokens get bounded memory. While exact, a value costs
    8 bytes plus its group in the smallest integer type (none for one group)."""

    def __init__(
        self, groups: int = 1, exact_limit: int = 1 << 24, alpha: float = DEFAULT_ALPHA
    ) -> None:
        self.groups = int(groups)
        self.exact_limit = int(exact_limit)
        self.alpha = alpha
        self._values: list[np.ndarray] = []  # kept while exact
        self._groups: list[np.ndarray] = []  # (empty for one group)
        self._gtype = np.min_scalar_type(max(self.groups - 1, 0))
        self._n = 0
        self.sketch: QuantileSketch | None = None

    @property
    def exact(self) -> bool:
        """True while every value is kept (quantiles are exact)."""
        return self.sketch is None

    @property
    def count(self) -> int:
        """Finite values added, over every group."""
        return self._n if self.sketch is None else int(self.sketch.count.sum())

    def add(self, values: np.ndarray, group: np.ndarray | None = None) -> None:
        """Add finite values [n] to their groups [n] (0 if None); non-finite ones are ignored."""
        x = np.asarray(values, dtype=np.float64)
        g = None if group is None else np.asarray(group)
        ok = np.isfinite(x)
        if not ok.all():
            x = x[ok]
            g = None if g is None else g[ok]
        if self.groups == 1:
            g = None
        if self.sketch is not None:
            self.sketch.add(x, g)
            return
        self._values.append(x.copy())
        if g is not None:
            self._groups.append(g.astype(self._gtype))
        self._n += x.size
        if self._n > self.exact_limit:
            self.sketch = QuantileSketch(self.groups, self.alpha)
            for i, v in enumerate(self._values):
                self.sketch.add(v, self._groups[i] if self._groups else None)
            self._values, self._groups = [], []

    def _kept(self) -> tuple[np.ndarray, np.ndarray]:
        """Every kept value [n] and its group [n] (exact mode)."""
        v = np.concatenate(self._values) if self._values else np.empty(0)
        if self._groups:
            return v, np.concatenate(self._groups)
        return v, np.zeros(v.size, dtype=self._gtype)

    def quantile(self, qs: Sequence[float] | float) -> np.ndarray:
        """numpy's linear quantiles per group, [G, Q] (NaN for an empty group)."""
        if self.sketch is not None:
            return self.sketch.quantile(qs)
        q = np.atleast_1d(np.asarray(qs, dtype=np.float64))
        out = np.full((self.groups, q.size), np.nan)
        if not self._n:
            return out
        v, g = self._kept()
        if self.groups == 1:
            out[0] = np.quantile(v, q)
            return out
        order = np.argsort(g, kind="stable")  # a radix sort for small integer types
        v, counts = v[order], np.bincount(g, minlength=self.groups)
        ends = np.cumsum(counts)
        for k in np.flatnonzero(counts):  # a loop over groups, never over values
            out[k] = np.quantile(v[ends[k] - counts[k] : ends[k]], q)
        return out

    def quantile_merged(
        self, qs: Sequence[float] | float, select: Sequence[int] | None = None
    ) -> np.ndarray:
        """numpy's linear quantiles of the union of the groups in `select` (None: all),
        [Q] (NaN if they hold no value): exact while exact, else from the merged sketch."""
        q = np.atleast_1d(np.asarray(qs, dtype=np.float64))
        pick = np.arange(self.groups) if select is None else np.asarray(select, np.int64)
        if self.sketch is not None:
            one = QuantileSketch(1, self.alpha)
            sk = self.sketch
            one.counts = sk.counts[pick].sum(axis=0, keepdims=True)
            one.zeros = sk.zeros[pick].sum(keepdims=True).reshape(1)
            one.min = np.array([sk.min[pick].min(initial=np.inf)])
            one.max = np.array([sk.max[pick].max(initial=-np.inf)])
            return one.quantile(q)[0]
        v, g = self._kept()
        if select is not None:
            v = v[np.isin(g, pick)]
        return np.quantile(v, q) if v.size else np.full(q.size, np.nan)


__all__ = ["DEFAULT_ALPHA", "QuantileAccumulator", "QuantileSketch"]
