"""per_sequence and quantiles: per-sequence reductions (reduceat or bincount) and quantiles read from the top
values, against plain numpy."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mismatch_cli.per_sequence import Segments
from mismatch_cli.quantiles import TopValues


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=12),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_segments_equal_bincount(lengths: list[int], shuffle: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    seq = np.repeat(np.arange(len(lengths)), lengths)
    if shuffle:
        seq = rng.permutation(seq)
    v = rng.normal(size=seq.size)
    m = rng.random(seq.size) > 0.6
    seg = Segments.of(seq)
    assert (seg.starts is not None) == bool(np.all(np.diff(seq) >= 0))
    S = len(lengths)
    np.testing.assert_allclose(seg.sum(v), np.bincount(seq, weights=v, minlength=S))
    assert np.array_equal(seg.any(m), np.bincount(seq, weights=m, minlength=S) > 0)
    assert np.array_equal(seg.sizes(), np.bincount(seq, minlength=S))
    for f, ref in ((seg.max, np.maximum), (seg.min, np.minimum)):
        want = np.array([ref.reduce(v[seq == s]) for s in range(S)])
        np.testing.assert_array_equal(f(v), want)
    rows = rng.random((seq.size, 3)).astype(np.float32)
    want = np.stack([rows[seq == s].sum(0, dtype=np.float64) for s in range(S)])
    np.testing.assert_allclose(seg.sum_rows(rows), want, rtol=1e-6)


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 300),
    keep=st.floats(0.0, 1.0),
    q=st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_top_values_quantile_equals_numpy(
    n: int, keep: float, q: float, ties: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    v = rng.exponential(size=n)
    if ties:
        v = np.round(v, 1)
    valid = rng.random(n) > 0.1
    mask = valid & (rng.random(n) < keep)
    top = TopValues(v, valid, frac=0.05, min_k=3)  # small K: both paths are exercised
    got = top.quantile(mask[top.index], int(mask.sum()), q, lambda: mask)
    if not mask.any():
        assert np.isnan(got)
    else:
        assert got == np.quantile(v[mask], q)
