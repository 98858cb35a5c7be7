"""Every quantile the package computes over a stream of values: exact while the values fit
(numpy's linear quantile), a mergeable sketch with a bounded relative error beyond. What
lets `report`, `sweep-threshold`, `corrections` and the figures give quantiles of 10^8
values in bounded memory.

- `QuantileSketch`: the sketch (below), G independent groups;
- `QuantileAccumulator`: values in G fixed groups (the report's probability buckets);
- `KeyedQuantiles`: values with an integer key, quantiles of any subset of keys chosen by a
  test (the sweep's nested kept sets, the tokens each correction leaves);
- both keep every value (exact) up to `EXACT_LIMIT` values, then move to the sketch
  (`_ExactThenSketch`, one mechanism); `TopValues` reads quantiles of many masked subsets
  of one array without copying them.

The sketch's scheme is DDSketch's (Masson, Rim, Lee, VLDB 2019): a value x > 0 goes to the bucket
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
from collections.abc import Callable, Sequence

import numpy as np

from . import kernels

DEFAULT_ALPHA = 0.005
MIN_VALUE = 1e-30
MAX_VALUE = 1e10
EXACT_LIMIT = 1 << 20  # values kept for exact quantiles (cheap to partition); beyond, the sketch
_LOG_BLOCK = 1 << 14  # values whose logs `QuantileSketch.add` computes at a time


def sketch_label(exact: bool, alpha: float = DEFAULT_ALPHA) -> str:
    """What results say of their quantiles: 'exact' or 'sketch (relative error <= 0.005)'."""
    return "exact" if exact else f"sketch (relative error <= {alpha:g})"


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
        """Add non-negative values [n] to their groups [n] (group 0 if None): numpy's log of a
        block of values, then one compiled pass over it (`kernels.sketch_add`: the bucket key,
        the count, the exact min and max). NaN and infinite values are ignored (callers
        count those themselves); a negative value is a ValueError, nothing added."""
        x = np.ascontiguousarray(values, dtype=np.float64)
        if x.size == 0:
            return
        if kernels.any_negative(x):
            raise ValueError("QuantileSketch takes non-negative values")
        g = None if group is None else np.ascontiguousarray(group, np.intp)
        if g is not None and (g.size != x.size or g.min() < 0 or g.max() >= self.groups):
            raise ValueError(f"groups must be {x.size} labels in 0..{self.groups - 1}")
        none = np.empty(0, np.intp)
        args = (self.counts, self.zeros, self.min, self.max, self._inv_log_gamma, self._k0)
        logs = np.empty(min(x.size, _LOG_BLOCK))
        for i in range(0, x.size, _LOG_BLOCK):  # blocks that stay in the cache
            xb = x[i : i + _LOG_BLOCK]
            lb = logs[: xb.size]
            with np.errstate(divide="ignore", invalid="ignore"):
                np.log(xb, out=lb)
            kernels.sketch_add(xb, lb, none if g is None else g[i : i + _LOG_BLOCK], *args)

    add_finite = add  # the kernel skips NaN / inf itself: no check to save

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

    def union(self, pick: np.ndarray) -> QuantileSketch:
        """One group holding the union of the groups `pick` (indices [k] or a mask [G]):
        counts add, so the merged quantiles keep the sketch's error bound."""
        one = QuantileSketch(1, self.alpha)
        one.counts = self.counts[pick].sum(axis=0, keepdims=True)
        one.zeros = self.zeros[pick].sum(keepdims=True).reshape(1)
        one.min = np.array([self.min[pick].min(initial=np.inf)])
        one.max = np.array([self.max[pick].max(initial=-np.inf)])
        return one

    def add_groups(self, other: QuantileSketch, at: np.ndarray) -> None:
        """Add the groups of `other` (same alpha) into this sketch's groups `at` [other.groups]."""
        self.counts[at] += other.counts
        self.zeros[at] += other.zeros
        self.min[at] = np.minimum(self.min[at], other.min)
        self.max[at] = np.maximum(self.max[at], other.max)


def _group_or_zero(g: np.ndarray | None, mask: np.ndarray) -> np.ndarray:
    """The groups of the masked values, or zeros (one group) when g is None."""
    return np.zeros(int(np.count_nonzero(mask)), np.int64) if g is None else g[mask]


class _ExactThenSketch:
    """The one "exact, then sketch" mechanism: values [n] arrive with labels [n] (a group,
    a key); every value is kept while at most `exact_limit` were added (quantiles are then
    numpy's, exactly), after which the kept values move into a sketch and later ones go
    straight there. Subclasses say how labels are stored and how values reach a sketch."""

    def __init__(self, exact_limit: int, alpha: float | None) -> None:
        self.exact_limit = int(exact_limit)
        self.alpha = DEFAULT_ALPHA if alpha is None else float(alpha)
        self._values: list[np.ndarray] = []  # kept while exact
        self._labels: list[np.ndarray] = []  # (empty when labels are not needed)
        self._n = 0
        self.sketch: QuantileSketch | None = None

    @property
    def exact(self) -> bool:
        """True while every value is kept (quantiles are exact)."""
        return self.sketch is None

    @property
    def label(self) -> str:
        """`sketch_label` of these quantiles."""
        return sketch_label(self.exact, self.alpha)

    def _keep(self, values: np.ndarray, labels: np.ndarray | None) -> None:
        """Keep finite values [n] (copied) with their labels [n], or hand them to the
        sketch; past the limit, every kept value moves to the sketch."""
        if self.sketch is not None:
            self._to_sketch(values, labels)
            return
        self._values.append(values.copy())
        if labels is not None:
            self._labels.append(labels)
        self._n += values.size
        if self._n > self.exact_limit:
            self.sketch = self._new_sketch()
            kept = zip(self._values, self._labels or [None] * len(self._values), strict=True)
            self._values, self._labels = [], []
            for v, g in kept:
                self._to_sketch(v, g)

    def _new_sketch(self) -> QuantileSketch:
        raise NotImplementedError

    def _to_sketch(self, values: np.ndarray, labels: np.ndarray | None) -> None:
        raise NotImplementedError


class QuantileAccumulator(_ExactThenSketch):
    """Quantiles of a stream of values in G groups: exact (numpy's linear quantiles of the
    values kept) while at most `exact_limit` values have been added, a `QuantileSketch`
    (relative error <= alpha) beyond. Small runs therefore get exactly what an in-memory
    computation gives; runs of 10^8 tokens get bounded memory. While exact, a value costs
    8 bytes plus its group in the smallest integer type (none for one group)."""

    def __init__(
        self, groups: int = 1, exact_limit: int = EXACT_LIMIT, alpha: float = DEFAULT_ALPHA
    ) -> None:
        super().__init__(exact_limit, alpha)
        self.groups = int(groups)
        self._gtype = np.min_scalar_type(max(self.groups - 1, 0))

    @property
    def count(self) -> int:
        """Finite values added, over every group."""
        return self._n if self.sketch is None else int(self.sketch.count.sum())

    def add(
        self, values: np.ndarray, group: np.ndarray | None = None, *, finite: bool = False
    ) -> None:
        """Add finite values [n] to their groups [n] (0 if None); non-finite ones are ignored
        (`finite=True`: the caller has dropped them, no check)."""
        x = np.asarray(values, dtype=np.float64)
        g = None if group is None else np.asarray(group)
        if self.sketch is not None:  # its kernel leaves out the non-finite values itself
            self.sketch.add(x, None if self.groups == 1 else g)
            return
        if not finite:
            ok = np.isfinite(x)
            if not ok.all():
                x = x[ok]
                g = None if g is None else g[ok]
        if self.groups == 1:
            g = None
        if self.sketch is None and g is not None:
            g = g.astype(self._gtype)
        self._keep(x, g)

    def _new_sketch(self) -> QuantileSketch:
        return QuantileSketch(self.groups, self.alpha)

    def _to_sketch(self, values: np.ndarray, labels: np.ndarray | None) -> None:
        assert self.sketch is not None
        self.sketch.add_finite(values, labels)  # `add` dropped the non-finite values

    def _kept(self) -> tuple[np.ndarray, np.ndarray]:
        """Every kept value [n] and its group [n] (exact mode)."""
        v = np.concatenate(self._values) if self._values else np.empty(0)
        if self._labels:
            return v, np.concatenate(self._labels)
        return v, np.zeros(v.size, dtype=self._gtype)

    def quantile(self, qs: Sequence[float] | float) -> np.ndarray:
        """numpy's linear quantiles per group, [G, Q] (NaN for an empty group)."""
        return self.quantiles(qs)[0]

    def quantiles(
        self, qs: Sequence[float] | float, merged: Sequence[float] = ()
    ) -> tuple[np.ndarray, np.ndarray]:
        """numpy's linear quantiles `qs` per group [G, Q] (NaN for an empty group) and
        `merged` of every group's values together [Q'], from one copy of the kept values
        (the exact mode's cost is that copy and the partitions: no sort of the values).
        Read again with no value added in between, they are not computed again."""
        q = np.atleast_1d(np.asarray(qs, dtype=np.float64))
        qm = np.atleast_1d(np.asarray(merged, dtype=np.float64))
        key = (self.count, q.tobytes(), qm.tobytes())
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache.clear()  # one entry: values were added since, or other quantiles asked
            cache[key] = self._quantiles(q, qm)
        per, all_ = cache[key]
        return per.copy(), all_.copy()

    def _quantiles(self, q: np.ndarray, qm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.sketch is not None:
            every = self.sketch.union(np.arange(self.groups)).quantile(qm)[0] if qm.size else qm
            return self.sketch.quantile(q), every
        out = np.full((self.groups, q.size), np.nan)
        every = np.full(qm.size, np.nan)
        if not self._n:
            return out, every
        v, g = self._kept()  # fresh arrays: partitioned in place below
        if self.groups == 1:
            both = np.quantile(v, np.r_[q, qm], overwrite_input=True)
            return both[: q.size].reshape(1, -1), both[q.size :]
        if qm.size:
            every = np.quantile(v.copy(), qm, overwrite_input=True)
        order = np.argsort(g, kind="stable")  # a radix sort for small integer types
        v, counts = v[order], np.bincount(g, minlength=self.groups)
        ends = np.cumsum(counts)
        for k in np.flatnonzero(counts):  # a loop over groups, never over values
            out[k] = np.quantile(v[ends[k] - counts[k] : ends[k]], q, overwrite_input=True)
        return out, every

    def quantile_merged(
        self, qs: Sequence[float] | float, select: Sequence[int] | None = None
    ) -> np.ndarray:
        """numpy's linear quantiles of the union of the groups in `select` (None: all),
        [Q] (NaN if they hold no value): exact while exact, else from the merged sketch."""
        q = np.atleast_1d(np.asarray(qs, dtype=np.float64))
        if select is None:
            return self.quantiles((), q)[1]
        pick = np.asarray(select, np.int64)
        if self.sketch is not None:
            return self.sketch.union(pick).quantile(q)[0]
        v, g = self._kept()
        v = v[np.isin(g, pick)]
        return np.quantile(v, q, overwrite_input=True) if v.size else np.full(q.size, np.nan)


class TopValues:
    """The largest values of an array, sorted once, from which the q-quantile of any masked
    subset is read without copying the subset (np.quantile's linear rule, same result).

    values [N], valid [N] bool (the candidates). The top K = max(min_k, frac N) valid
    values are kept in descending order; `quantile` needs the subset's mask evaluated on
    them (`index`), and computes the whole subset only when too few of them are in it.
    """

    def __init__(
        self, values: np.ndarray, valid: np.ndarray, frac: float = 0.04, min_k: int = 4096
    ) -> None:
        a = np.where(valid, values, -np.inf)
        K = min(a.size, max(min_k, int(frac * a.size)))
        top = np.argpartition(a, a.size - K)[a.size - K :] if K < a.size else np.arange(a.size)
        self.index = top[np.argsort(-a[top], kind="stable")]  # [K] largest first
        self.values = a[self.index]  # [K]
        self.source = values

    def quantile(
        self, in_top: np.ndarray, n: int, q: float, subset: Callable[[], np.ndarray]
    ) -> float:
        """q-quantile of the n values of a subset; in_top [K] bool = the subset's mask at
        `index`; subset() returns the subset's mask [N] (used only as a fallback)."""
        if n == 0:
            return float("nan")
        k, gamma = quantile_rank(n, q)
        r = n - 1 - k  # the k-th smallest, counted from the largest (0-based)
        c = np.cumsum(in_top)  # [K]
        if c.size == 0 or c[-1] < r + 1:
            return float(np.quantile(np.compress(subset(), self.source), q))
        lo = float(self.values[np.searchsorted(c, r + 1)])
        hi = float(self.values[np.searchsorted(c, r)]) if r >= 1 else lo
        return lerp_quantile(lo, hi, gamma)


def lerp_quantile(lo: float, hi: float, gamma: float) -> float:
    """numpy's linear interpolation between two order statistics (its `_lerp`): exact at
    both ends, so a quantile built from order statistics equals np.quantile's."""
    diff = hi - lo
    return hi - diff * (1 - gamma) if gamma >= 0.5 else lo + diff * gamma


def quantile_rank(n: int, q: float) -> tuple[int, float]:
    """(floor index, gamma) of the q-quantile of n sorted values, numpy's linear method."""
    virtual = q * (n - 1)
    k = math.floor(virtual)
    return k, virtual - k


class KeyedQuantiles(_ExactThenSketch):
    """Quantiles of many overlapping subsets of one stream of non-negative values: each
    value comes with an integer key [n], a subset is chosen by a test on keys
    (`select(keys) -> bool mask`), e.g. "level >= t" for the sweep's nested kept sets or
    "bit m set" for the tokens each correction leaves.

    Exact (numpy's linear quantile, read from the largest values with `TopValues`) while at
    most `exact_limit` values have been added; beyond, a `QuantileSketch` with one group per
    distinct key, merged over the selected keys when asked (counts are exact, values within
    alpha = 0.5% relative error, the maximum exact). Each value is added once, whatever the
    number of subsets; memory beyond the limit is (distinct keys) x ~9,000 buckets."""

    def __init__(self, exact_limit: int = EXACT_LIMIT, alpha: float | None = None) -> None:
        super().__init__(exact_limit, alpha)
        self._top: tuple[TopValues, np.ndarray] | None = None
        self.key_ids: np.ndarray | None = None  # [K] sorted distinct keys (sketch mode)

    def add(self, values: np.ndarray, keys: np.ndarray) -> None:
        """Add finite values >= 0 [n] with their keys [n] (integers >= 0)."""
        v = np.asarray(values, dtype=np.float64)
        if v.size == 0:
            return
        self._top = None
        self._keep(v, np.asarray(keys).copy() if self.sketch is None else np.asarray(keys))

    def _new_sketch(self) -> QuantileSketch:
        self.key_ids = np.empty(0, dtype=np.int64)
        return QuantileSketch(0, self.alpha)

    def _to_sketch(self, values: np.ndarray, labels: np.ndarray | None) -> None:
        assert self.sketch is not None and self.key_ids is not None and labels is not None
        uniq, inv = _key_groups(labels)
        part = QuantileSketch(uniq.size, self.alpha)
        part.add(values, inv)
        ids = np.union1d(self.key_ids, uniq)
        if ids.size > self.key_ids.size:  # new keys: a sketch with more groups
            grown = QuantileSketch(ids.size, self.alpha)
            grown.add_groups(self.sketch, np.searchsorted(ids, self.key_ids))
            self.sketch, self.key_ids = grown, ids
        self.sketch.add_groups(part, np.searchsorted(self.key_ids, uniq))

    def quantile(self, select: Callable[[np.ndarray], np.ndarray], q: float) -> float:
        """numpy's linear q-quantile of the values whose key passes `select` (NaN if none)."""
        if self.sketch is not None:
            assert self.key_ids is not None
            sel = np.asarray(select(self.key_ids), dtype=bool)  # [K]
            return float(self.sketch.union(sel).quantile(q)[0, 0])
        if self._top is None:
            v = np.concatenate(self._values) if self._values else np.empty(0)
            k = np.concatenate(self._labels) if self._labels else np.empty(0, np.int64)
            self._top = (TopValues(v, np.ones(v.size, dtype=bool)), k)
        top, keys = self._top
        mask = np.asarray(select(keys), dtype=bool)  # [n]
        in_top = mask[top.index]
        return top.quantile(in_top, int(np.count_nonzero(mask)), q, lambda: mask)


def _key_groups(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct keys [u], group of each value in 0..u-1 [n]); a lookup table for small keys."""
    if k.dtype.kind in "iu" and k.size and int(k.min()) >= 0 and int(k.max()) < (1 << 20):
        present = np.bincount(k, minlength=int(k.max()) + 1) > 0
        uniq = np.flatnonzero(present)
        lut = np.zeros(present.size, dtype=np.int64)
        lut[uniq] = np.arange(uniq.size)
        return uniq, lut[k]
    uniq, inv = np.unique(k, return_inverse=True)
    return uniq.astype(np.int64), inv


__all__ = [
    "DEFAULT_ALPHA",
    "EXACT_LIMIT",
    "KeyedQuantiles",
    "QuantileAccumulator",
    "QuantileSketch",
    "TopValues",
    "lerp_quantile",
    "quantile_rank",
    "sketch_label",
]
