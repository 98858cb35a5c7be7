"""The compiled loops (`mismatch_cli.kernels`) against the numpy they replaced, written out
independently here: the same counts, extremes and per-value arrays, sums to the order of
float additions; and the worker thread of a streamed pass changes nothing and is gone after
an error."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from mismatch_cli import kernels as K
from mismatch_cli import metrics as M
from mismatch_cli import theory
from mismatch_cli.aggregates import DEFAULT_EDGES, parse_edges, report_tokens, scan
from mismatch_cli.errors import MismatchError
from mismatch_cli.quantiles import MAX_VALUE, MIN_VALUE, QuantileSketch
from mismatch_cli.synthetic import write_synthetic_run

REL = 1e-12


def numpy_sketch(x: np.ndarray, g: np.ndarray, s: QuantileSketch) -> tuple[np.ndarray, ...]:
    """DDSketch's keys with numpy (the code `kernels.sketch_add` replaced): counts [G, B],
    zeros [G], min [G], max [G] of the finite values."""
    ok = np.isfinite(x)
    x, g = x[ok], g[ok]
    counts = np.zeros_like(s.counts)
    pos = x > 0
    k = np.ceil(np.log(x[pos]) * s._inv_log_gamma).astype(np.int64)
    k = np.clip(k, s._k0, s._k0 + s.num_buckets - 1) - s._k0
    np.add.at(counts, (g[pos], k), 1)
    zeros = np.bincount(g[~pos], minlength=s.groups)
    lo, hi = np.full(s.groups, np.inf), np.full(s.groups, -np.inf)
    np.minimum.at(lo, g, x)
    np.maximum.at(hi, g, x)
    return counts, zeros, lo, hi


def test_sketch_add_equals_the_numpy_keys() -> None:
    rng = np.random.default_rng(3)
    x = np.concatenate([
        rng.lognormal(-5, 4, 20_000), np.zeros(300), [np.nan, np.inf, -np.inf] * 10,
        [MIN_VALUE / 10, MAX_VALUE * 10, 1.0],  # clamped into the end buckets
    ])  # fmt: skip
    g = rng.integers(0, 6, x.size)
    s = QuantileSketch(groups=6)
    s.add(x[:7000], g[:7000])
    s.add(x[7000:], g[7000:])  # two batches: the state carries over
    for got, want in zip((s.counts, s.zeros, s.min, s.max), numpy_sketch(x, g, s), strict=True):
        np.testing.assert_array_equal(got, want)
    one = QuantileSketch()  # one group: no group array at all
    one.add(x)
    np.testing.assert_array_equal(one.counts[0], s.counts.sum(axis=0))


def test_a_negative_value_is_refused_and_adds_nothing() -> None:
    s = QuantileSketch(groups=2)
    with pytest.raises(ValueError, match="non-negative"):
        s.add(np.array([1.0, 2.0, -1e-9]), np.array([0, 1, 0]))
    assert s.count.sum() == 0 and np.isinf(s.min).all()


def test_bucket_codes_equal_a_search_of_the_edges() -> None:
    edges = parse_edges(DEFAULT_EDGES)
    rng = np.random.default_rng(5)
    p = np.concatenate([rng.random(5000), edges, [np.nan, -0.1, 1.1, 0.0, 1.0]])
    got = np.empty(p.size, np.intp)
    K.bucket_codes(p, edges, got)
    want = np.searchsorted(edges, p, side="right") - 1
    want[p == edges[-1]] = len(edges) - 2  # 1.0 in the last bucket
    want[~((p >= edges[0]) & (p <= edges[-1]))] = len(edges) - 1  # outside or NaN
    np.testing.assert_array_equal(got, want)


def test_group_sums_leave_out_and_count_the_nonfinite() -> None:
    v = np.array([1.0, np.nan, 2.0, np.inf, 4.0, -np.inf])
    g = np.array([0, 0, 1, 1, 1, 2])
    inf, sums = np.zeros(3, np.int64), np.zeros(3)
    K.group_sums(v, g, inf, sums)
    np.testing.assert_array_equal(inf, [1, 1, 1])
    np.testing.assert_array_equal(sums, [1.0, 6.0, 0.0])


def test_finite_sums_equal_numpy() -> None:
    """Every output of `finite_sums` against numpy: deltas beyond the +-20 clamp, p = 1
    (an infinite eps to cover), the tail, a dozen buckets, sequences, envelope candidates."""
    rng = np.random.default_rng(9)
    m = 4000
    d = rng.normal(0, 0.3, m)
    d[:5] = [25.0, -30.0, 0.0, 1e-9, -21.0]
    p = rng.random(m) ** 3
    p[5:8] = 1.0
    pt, pi = p, np.clip(p * np.exp(-d), 0, 1)
    edges = parse_edges(DEFAULT_EDGES)
    bucket = np.empty(m, np.intp)
    K.bucket_codes(p, edges, bucket)
    local = np.sort(rng.integers(0, 37, m))
    tail, line, G, S = 0.1, 0.05, 2 * len(edges), 37
    out = {n: np.empty(m) for n in ("ad", "x", "k3", "cover")}
    grp = [np.empty(G, np.int64)] + [np.empty(G) for _ in range(4)]
    above = np.zeros(len(M.CAPS), np.int64)
    seq = [np.empty(S) for _ in range(5)]
    cand, sums = np.empty(m, np.intp), np.empty(len(K.SUMS))
    K.finite_sums(
        d, p, pt, pi, bucket, local, tail, np.asarray(M.CAPS), math.log(2.0),
        M.LOG_RATIO_CLAMP, G, S, line, *out.values(), *grp, above, *seq, cand, sums,
    )  # fmt: skip
    v = dict(zip(K.SUMS, sums, strict=True))
    ad, x = np.abs(d), 1.0 - p
    np.testing.assert_array_equal(out["ad"], ad)
    np.testing.assert_array_equal(out["x"], x)
    np.testing.assert_allclose(out["k3"], M.k3_per_token(d), rtol=REL)
    np.testing.assert_allclose(out["cover"], theory.eps_to_cover(ad, x), rtol=REL)
    assert v["n_cover_inf"] == np.isinf(theory.eps_to_cover(ad, x)).sum() > 0
    c = M.clamped_log_ratio(d)
    r = np.exp(c)
    want = {
        "sum_ad": ad.sum(), "sxx": x @ x, "sxy": x @ ad, "syy": ad @ ad, "max_ad": ad.max(),
        "sum_k2": c @ c, "sum_k3": M.k3_per_token(d).sum(), "sum_r": r.sum(), "sum_r2": r @ r,
        "min_r": r.min(), "max_r": r.max(), "sum_chi2": np.expm1(2 * c).sum(),
        "n_outside": (ad > math.log(2.0)).sum(), "sum_dp": np.abs(pt - pi).sum(),
        "max_dp": np.abs(pt - pi).max(), "sum_pt": pt.sum(), "sum_pi": pi.sum(),
        "m2_ad": ((ad - ad.mean()) ** 2).sum(), "m2_pt": ((pt - pt.mean()) ** 2).sum(),
        "m2_pi": ((pi - pi.mean()) ** 2).sum(),
        "co_p": ((pt - pt.mean()) * (pi - pi.mean())).sum(),
    }  # fmt: skip
    for k, w in want.items():
        assert v[k] == pytest.approx(w, rel=1e-10, abs=1e-12), k
    np.testing.assert_array_equal(above, [(r > cap).sum() for cap in M.CAPS])
    gi = bucket * 2 + (p < tail)
    df = pd.DataFrame({"g": gi, "d": d, "ad": ad, "x": x})
    by = df.groupby("g")
    n_g, mean_g, m2_g, ad_g, x_g = grp
    idx = by.size().index.to_numpy()
    np.testing.assert_array_equal(n_g[idx], by.size().to_numpy())
    assert (n_g[np.setdiff1d(np.arange(G), idx)] == 0).all()
    np.testing.assert_allclose(mean_g[idx], by["d"].mean(), rtol=1e-10)
    np.testing.assert_allclose(m2_g[idx], by["d"].var(ddof=0) * by.size(), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(ad_g[idx], by["ad"].sum(), rtol=1e-10)
    np.testing.assert_allclose(x_g[idx], by["x"].sum(), rtol=1e-10)
    tl = p < tail
    for got, w in zip(seq, (np.ones(m), d, ad, tl, np.where(tl, d, 0.0)), strict=True):
        np.testing.assert_allclose(got, np.bincount(local, weights=w, minlength=S), rtol=1e-10)
    picks = cand[: int(v["n_cand"])]
    np.testing.assert_array_equal(picks, np.flatnonzero(~(ad <= line * np.minimum(x, 1.0))))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_run(tmp_path_factory.mktemp("kernels") / "run", num_sequences=40)


def test_the_worker_thread_changes_nothing(run: Path) -> None:
    """The same pass with the quantile and distribution-level adds in the caller's thread
    (as `Aggregates` does on its own) and in the scan's worker thread: equal results."""
    from mismatch_cli import aggregates as A

    edges = parse_edges(DEFAULT_EDGES)
    threaded = scan(report_tokens(run, 97), edges=edges)
    orig = A.Aggregates.side_thread
    try:
        A.Aggregates.side_thread = lambda self: None  # type: ignore[method-assign]
        inline = scan(report_tokens(run, 97), edges=edges)
    finally:
        A.Aggregates.side_thread = orig  # type: ignore[method-assign]
    pd.testing.assert_frame_equal(threaded.buckets(), inline.buckets())
    assert threaded.metrics() == inline.metrics()
    assert threaded.eps_hat() == inline.eps_hat()
    np.testing.assert_array_equal(
        threaded.q_ad.quantile([0.5, 0.99]), inline.q_ad.quantile([0.5, 0.99])
    )


def test_a_failed_pass_leaves_no_worker_thread(run: Path, tmp_path: Path) -> None:
    """A token file damaged half way: the one-line error, and the worker thread is gone."""
    table = pq.read_table(run / "tokens.parquet")
    bad = tmp_path / "tokens.parquet"
    pq.write_table(table, bad, row_group_size=200)
    raw = bad.read_bytes()
    cut = len(raw) // 2
    bad.write_bytes(raw[:cut] + bytes(64) + raw[cut + 64 :])  # a later page is garbage
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(MismatchError):
        scan(report_tokens(bad, 100), edges=parse_edges(None))  # batches fed before it
    after = {t.name for t in threading.enumerate()} - before
    assert not any(n.startswith("mismatch-side") for n in after), after


def test_runs_and_their_rows_equal_numpy() -> None:
    """A batch's runs of one sequence (the compiled pass, and numpy's for other dtypes) and
    each row's sequence index from them."""
    from mismatch_cli.per_sequence import BatchSeqs, runs

    sid = np.array([7, 7, 9, 9, 9, 12, 15, 15], np.int64)
    starts, first = runs(sid)
    np.testing.assert_array_equal(starts, [0, 2, 5, 6])
    np.testing.assert_array_equal(first, [7, 9, 12, 15])
    s2, _ = runs(sid.astype(str))  # not a number: numpy's way, the same runs
    np.testing.assert_array_equal(s2, starts)
    assert runs(np.empty(0, np.int64))[0].size == 0
    at = np.array([3, 4, 6, 7])  # sequence 5 has no row in this batch
    bs = BatchSeqs.grouped(at, starts, sid.size)
    np.testing.assert_array_equal(bs.seq, [3, 3, 4, 4, 4, 6, 7, 7])
    np.testing.assert_array_equal(bs.local, bs.seq - 3)
    np.testing.assert_array_equal(bs.ids, [3, 4, 5, 6, 7])
    want = BatchSeqs(bs.seq)
    v = np.arange(sid.size, dtype=np.float64)
    np.testing.assert_array_equal(bs.part.sum(v), want.part.sum(v))


def test_a_group_out_of_range_is_refused() -> None:
    s = QuantileSketch(groups=2)
    for bad in ([2], [-1]):
        with pytest.raises(ValueError, match=r"labels in 0\.\.1"):
            s.add(np.array([1.0]), np.array(bad))
    assert s.count.sum() == 0


def test_per_sequence_sums_survive_a_pickle_between_batches() -> None:
    """The per-sequence arrays are views of buffers with room to spare; a pickled (or
    copied) Aggregates has arrays of its own, and growing it keeps what was added."""
    import pickle

    from mismatch_cli.aggregates import Aggregates
    from mismatch_cli.quantiles import QuantileAccumulator

    agg = Aggregates(parse_edges(None), "train", 0.1, np.empty(0, np.int64), QuantileAccumulator())
    agg.extend_sequences(np.array([0, 1, 2]))
    agg.seq_n[2] += 5
    back = pickle.loads(pickle.dumps(agg))
    back.seq_n[2] += 7
    back.add_sequences(np.array([2, 3]))
    np.testing.assert_array_equal(back.seq_n, [0, 0, 12, 0])
    np.testing.assert_array_equal(back.seq_ids, [0, 1, 2, 3])
    np.testing.assert_array_equal(agg.seq_n, [0, 0, 5])  # the original is untouched


def test_sweep_level_sums_equal_the_bincounts_they_replaced() -> None:
    """`level_sums`: a sweep batch's per-level counts, sums and maxima are the weighted
    bincounts and `np.maximum.at` of before, bit for bit (both sum the rows in order)."""
    rng = np.random.default_rng(3)
    n, nb = 5000, 26
    L = rng.integers(0, nb, n).astype(np.int16)
    fin = rng.random(n) > 0.1
    delta = np.where(fin, rng.normal(0, 0.3, n), np.inf)
    absd, d = np.where(fin, np.abs(delta), 0.0), np.where(fin, delta, 0.0)
    k3 = np.expm1(d) - d
    outside = fin & (np.abs(d) > math.log(2))
    counts, level_max = np.full(nb, 7, np.int64), np.full(nb, -np.inf)
    level_max[3] = 99.0  # an earlier batch's maximum stays
    sums = np.full((5, nb), np.nan)  # written, not added into
    K.level_sums(L, fin, absd, d, k3, outside, counts, sums, level_max)
    np.testing.assert_array_equal(counts, 7 + np.bincount(L, minlength=nb))
    for row, w in zip(sums, (fin, absd, d, k3, outside), strict=True):
        np.testing.assert_array_equal(row, np.bincount(L, weights=w, minlength=nb))
    want = np.full(nb, -np.inf)
    want[3] = 99.0
    np.maximum.at(want, L, np.where(fin, absd, -np.inf))
    np.testing.assert_array_equal(level_max, want)


def test_grid_column_stats_equal_numpy() -> None:
    """`column_stats`: the pruned-mass grid's float64 column totals are numpy's
    `sum(axis=0, dtype=float64)` bit for bit, its maxima `np.maximum`'s, NaN kept."""
    rng = np.random.default_rng(4)
    mass = rng.random((3001, 24)).astype(np.float32) * 1e-3
    mass[17, 5] = np.nan
    total, mx = np.full(24, 0.25), np.full(24, -np.inf)
    mx[0] = 2.0  # an earlier batch's maximum stays
    K.column_stats(mass, total, mx)
    np.testing.assert_array_equal(total, 0.25 + mass.sum(axis=0, dtype=np.float64))
    want = np.full(24, -np.inf)
    want[0] = 2.0
    np.testing.assert_array_equal(mx, np.maximum(want, mass.max(axis=0)))
    assert np.isnan(mx[5]) and not np.isnan(mx[4])


def test_split_and_segment_sums_equal_numpy() -> None:
    """`split_sums` (a correction's kept and masked sums) and `segment_rows` (per-sequence
    float64 sums of a grid) against numpy, to the order of float additions."""
    rng = np.random.default_rng(5)
    x, mask = rng.normal(size=1003), rng.random(1003) > 0.7
    kept, masked = K.split_sums(mask, x)
    assert kept == pytest.approx(x[~mask].sum(), rel=REL)
    assert masked == pytest.approx(x[mask].sum(), rel=REL)
    grid = rng.random((1003, 24)).astype(np.float32)
    starts = np.array([0, 1, 400, 401, 1000], np.int64)
    out = np.empty((starts.size, 24))
    K.segment_rows(grid, starts, out)
    want = np.add.reduceat(grid.astype(np.float64), starts, axis=0)
    np.testing.assert_allclose(out, want, rtol=REL)
    flags = rng.random(1003) > 0.5
    counted = np.empty(starts.size)
    K.segment_counts(flags, starts, counted)
    np.testing.assert_array_equal(counted, np.add.reduceat(flags, starts, dtype=np.float64))
