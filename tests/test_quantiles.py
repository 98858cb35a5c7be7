"""The quantile sketch: within 1% of numpy's quantiles, mergeable, exact counts / min / max."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mismatch_cli.quantiles import QuantileSketch

QS = (0.0, 0.01, 0.5, 0.9, 0.99, 0.999, 1.0)


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


@pytest.mark.parametrize(
    "draw",
    [
        lambda r, n: r.lognormal(-4, 3, n),  # |delta|-like: many decades
        lambda r, n: r.exponential(0.03, n),
        lambda r, n: np.where(r.random(n) < 0.2, 0.0, r.uniform(0, 1, n)),  # exact zeros
        lambda r, n: r.uniform(0.05, 0.3, n),  # eps_hat-like: narrow range
    ],
)
def test_quantiles_within_one_percent_of_numpy(draw) -> None:
    rng = np.random.default_rng(0)
    x = draw(rng, 200_000)
    s = QuantileSketch()
    s.add(x)
    got = s.quantile(QS)[0]
    assert _rel_err(got, np.quantile(x, QS)) <= 0.01
    assert got[0] == x.min() and got[-1] == x.max() and s.count[0] == x.size


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0, 1e6, allow_nan=False, allow_subnormal=False), min_size=1, max_size=300),
    st.lists(st.floats(0, 1), min_size=1, max_size=5),
)
def test_small_samples_within_one_percent(values: list[float], qs: list[float]) -> None:
    x = np.asarray(values)
    x = x[(x == 0) | (x >= 1e-30)]  # the documented range
    if x.size == 0:
        return
    s = QuantileSketch()
    s.add(x)
    assert _rel_err(s.quantile(qs)[0], np.quantile(x, qs)) <= 0.01


def test_groups_merge_and_ignore_nonfinite() -> None:
    rng = np.random.default_rng(1)
    x = rng.lognormal(-3, 2, 50_000)
    g = rng.integers(0, 3, x.size)
    whole = QuantileSketch(groups=3)
    whole.add(np.r_[x, np.inf, np.nan], np.r_[g, 0, 1])
    parts = QuantileSketch(groups=3)
    for chunk in np.array_split(np.arange(x.size), 7):
        piece = QuantileSketch(groups=3)
        piece.add(x[chunk], g[chunk])
        parts.merge(piece)
    np.testing.assert_array_equal(whole.counts, parts.counts)
    np.testing.assert_array_equal(whole.quantile(QS), parts.quantile(QS))
    for k in range(3):
        assert _rel_err(whole.quantile(QS)[k], np.quantile(x[g == k], QS)) <= 0.01
    assert whole.count.tolist() == np.bincount(g).tolist()
    assert np.isnan(QuantileSketch(groups=2).quantile([0.5])).all()
    with pytest.raises(ValueError, match="non-negative"):
        whole.add(np.array([-1.0]))


def test_accumulator_is_exact_until_its_limit_then_within_one_percent() -> None:
    from mismatch_cli.quantiles import QuantileAccumulator

    rng = np.random.default_rng(2)
    x, g = rng.lognormal(-4, 2, 30_000), rng.integers(0, 4, 30_000)
    small = QuantileAccumulator(groups=4, exact_limit=10**6)
    big = QuantileAccumulator(groups=4, exact_limit=5_000)
    for chunk in np.array_split(np.arange(x.size), 10):
        small.add(x[chunk], g[chunk])
        big.add(x[chunk], g[chunk])
    assert small.exact and not big.exact
    for k in range(4):
        expect = np.quantile(x[g == k], QS)
        np.testing.assert_array_equal(small.quantile(QS)[k], expect)
        assert _rel_err(big.quantile(QS)[k], expect) <= 0.01


@pytest.mark.parametrize("groups", [1, 5])
def test_quantiles_asked_together_equal_each_alone_and_follow_new_values(groups: int) -> None:
    """`quantiles(per_group, merged)` (one copy of the kept values, partitioned in place,
    cached) gives exactly numpy's quantiles of each group and of all values; a value added
    afterwards is seen (the cache is dropped), and the caller's arrays are its own."""
    from mismatch_cli.quantiles import QuantileAccumulator

    rng = np.random.default_rng(5)
    v, g = rng.exponential(1.0, 3000), rng.integers(0, groups, 3000)
    acc = QuantileAccumulator(groups)
    acc.add(v[:2000], g[:2000])
    qs, qm = (0.5, 0.9, 1.0), (0.99, 0.1)
    for n in (2000, 3000):
        per, every = acc.quantiles(qs, qm)
        for k in range(groups):
            np.testing.assert_array_equal(per[k], np.quantile(v[:n][g[:n] == k], qs))
        np.testing.assert_array_equal(every, np.quantile(v[:n], qm))
        np.testing.assert_array_equal(acc.quantile_merged(qm), every)
        per[:] = -1.0  # the cached result is not the caller's array
        np.testing.assert_array_equal(acc.quantiles(qs, qm)[0], acc.quantile(qs))
        assert (acc.quantile(qs) >= 0).all()
        if n == 2000:
            acc.add(v[2000:], g[2000:])


def test_group_extremes_are_exact() -> None:
    """Per group, min and max are the exact extremes, with zeros, values clamped into the
    end buckets, values on bucket edges and a group holding only zeros, over batches."""
    rng = np.random.default_rng(7)
    s = QuantileSketch(groups=5)
    want_min, want_max = np.full(5, np.inf), np.full(5, -np.inf)
    edges = s.gamma ** np.arange(-40, 40)  # values on (or a rounding away from) bucket edges
    for _ in range(4):
        x = np.concatenate([
            rng.lognormal(-4, 3, 3000), np.zeros(50), rng.choice(edges, 200),
            [1e-40, 1e-31, 1e12, 5e10],  # below MIN_VALUE / above MAX_VALUE: end buckets
        ])  # fmt: skip
        g = rng.integers(0, 4, x.size)  # group 4 holds zeros only
        x, g = np.r_[x, 0.0, 0.0], np.r_[g, 4, 4]
        s.add(x, g)
        np.minimum.at(want_min, g, x)
        np.maximum.at(want_max, g, x)
    np.testing.assert_array_equal(s.min, want_min)
    np.testing.assert_array_equal(s.max, want_max)
    q = s.quantile([0.0, 1.0])
    np.testing.assert_array_equal(q[:, 0], want_min)
    np.testing.assert_array_equal(q[:, 1], want_max)
