"""`report`'s by_position table and the position figure (issue 20, section 3): the streamed
per-bucket numbers against a direct pandas computation, in any batching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mismatch_cli import metrics as M
from mismatch_cli.analysis import analyze
from mismatch_cli.plots import make_figures, plotted
from mismatch_cli.plots.data import run_data
from mismatch_cli.plots.position import plot_position
from mismatch_cli.positions import POSITION_EDGES, position_bucket, position_labels
from mismatch_cli.render import position_table
from mismatch_cli.runs import read_sequences, read_tokens, write_run
from mismatch_cli.synthetic import synthetic_meta, write_synthetic_run

from .conftest import run_cli


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic run whose completions reach past 256 tokens, with two infinite deltas."""
    d = tmp_path_factory.mktemp("positions")
    src = write_synthetic_run(d / "src", num_sequences=6, max_len=400, vocab=16, eps=0.4, seed=3)
    tok = read_tokens(src)
    i = [3, 300]
    tok.loc[i, "delta"], tok.loc[i, "p_train"], tok.loc[i, "kept_train"] = np.inf, 0.0, False
    tok.loc[i, "logp_train"] = -np.inf
    return write_run(d / "run", tok, read_sequences(src), synthetic_meta())


def expected(tok: pd.DataFrame, tail: float) -> list[dict]:
    """The per-bucket numbers computed directly from the whole table."""
    b = position_bucket(tok["pos"].to_numpy())
    out = []
    for i in range(len(POSITION_EDGES)):
        t = tok[b == i]
        d = t["delta"].to_numpy()
        fin = np.isfinite(d)
        df, ad = d[fin], np.abs(d[fin])
        tail_ad = ad[t["p_train"].to_numpy()[fin] < tail].sum()
        out.append({
            "num_tokens": len(t), "num_infinite": int((~fin).sum()),
            "num_sequences": t["seq_id"].nunique(),
            "mean_abs_delta": ad.mean() if fin.any() else None,
            "k3": M.k3(df) if fin.any() else None,
            "tail_abs_delta_share": tail_ad / ad.sum() if fin.any() else None,
        })  # fmt: skip
    return out


def test_buckets_and_labels() -> None:
    assert position_labels() == ["0-63", "64-255", "256-1023", "1024-4095", ">=4096"]
    got = position_bucket(np.array([0, 63, 64, 255, 256, 1023, 1024, 4095, 4096, 10**6]))
    assert got.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


@pytest.mark.parametrize("batch_rows", [7, 1 << 20])
def test_by_position_equals_a_direct_computation(run: Path, batch_rows: int) -> None:
    rep = analyze(run, batch_rows=batch_rows)
    rows = rep["by_position"]
    assert [r["position"] for r in rows] == position_labels()
    assert sum(r["num_tokens"] for r in rows) == rep["num_tokens"]
    tok = read_tokens(run)
    assert tok["pos"].max() >= 256  # the fixture fills three buckets
    for got, want in zip(rows, expected(tok, rep["tail"]["threshold"]), strict=True):
        for k, v in want.items():
            if v is None or isinstance(v, int):
                assert got[k] == v, (got["position"], k)
            else:
                assert got[k] == pytest.approx(v, rel=1e-12), (got["position"], k)
    assert rows[0]["num_infinite"] == 1 and rows[1]["num_infinite"] + rows[2]["num_infinite"] == 1
    assert rows[-1]["num_tokens"] == 0 and rows[-1]["k3"] is None and rows[-1]["pos_hi"] is None


@settings(max_examples=25, deadline=None)
@given(
    pos=st.lists(st.integers(0, 5000), min_size=1, max_size=60),
    split=st.integers(1, 60),
)
def test_any_batching_gives_the_same_sums(pos: list[int], split: int) -> None:
    """A table of arbitrary positions: counts exact, means to summation order, in batches
    of `split` rows or one."""
    n = len(pos)
    rng = np.random.default_rng(n)
    frame = pd.DataFrame({
        "seq_id": np.arange(n) // 3, "pos": pos, "delta": rng.normal(0, 0.1, n),
        "p_train": rng.uniform(0, 1, n), "p_infer": rng.uniform(0, 1, n),
    })  # fmt: skip
    one, many = analyze(frame, batch_rows=n)["by_position"], analyze(frame, batch_rows=split)[
        "by_position"]  # fmt: skip
    counts = np.bincount(position_bucket(np.array(pos)), minlength=len(POSITION_EDGES))
    assert [r["num_tokens"] for r in one] == [r["num_tokens"] for r in many] == counts.tolist()
    for a, b in zip(one, many, strict=True):
        for k in ("mean_abs_delta", "k3", "tail_abs_delta_share"):
            assert (a[k] is None) == (b[k] is None)
            if a[k] is not None:
                assert b[k] == pytest.approx(a[k], rel=1e-9, abs=1e-15)


def test_a_table_without_positions_has_no_table() -> None:
    frame = pd.DataFrame({"seq_id": [0, 0], "delta": [0.1, -0.1], "p_train": [0.5, 0.9],
                          "p_infer": [0.5, 0.9]})  # fmt: skip
    rep = analyze(frame)
    assert rep["by_position"] is None and position_table(rep) is None


def test_terminal_table_lists_the_filled_buckets(run: Path) -> None:
    t = position_table(analyze(run))
    assert t is not None and t.row_count == 3  # 0-63, 64-255, 256-1023


def test_figure_draws_report_numbers_and_overlays_runs(run: Path, tmp_path: Path) -> None:
    rd = run_data(run, label="a")
    rep = analyze(run)
    fig = plot_position([rd])
    y = plotted(fig, "position-mean_abs_delta:a")
    want = [r["mean_abs_delta"] for r in rep["by_position"] if r["num_tokens"]]
    np.testing.assert_allclose(y, want, rtol=1e-12)
    # two runs overlaid (the CLI path), and the figure is only drawn when named
    proc = run_cli("plot", str(run), str(run), "--label", "a", "--label", "b", "--figure", "position",
                   "--out", str(tmp_path / "fig"), check=True)  # fmt: skip
    assert (tmp_path / "fig" / "position.png").is_file(), proc.stdout
    assert "position" not in make_figures.__globals__["DEFAULT_FIGURES"]


def test_by_position_in_any_batches_equals_the_direct_computation(tmp_path: Path) -> None:
    """A sequence's positions in order: the compiled per-group sums (`kernels.keyed_sums`)
    give the direct computation (counts exact, sums to rounding), in one batch and in
    batches that split sequences."""
    src = write_synthetic_run(tmp_path / "r", num_sequences=8, max_len=400, vocab=16, seed=5)
    tok = read_tokens(src)
    assert np.isfinite(tok["delta"]).all() and tok["pos"].max() >= 256
    for rows in (len(tok), 97):
        rep = analyze(src, batch_rows=rows)
        for got, want in zip(rep["by_position"], expected(tok, rep["tail"]["threshold"]),
                             strict=True):  # fmt: skip
            for k, v in want.items():
                if v is None or isinstance(v, int):
                    assert got[k] == v, (rows, got["position"], k)
                else:
                    assert got[k] == pytest.approx(v, rel=1e-12), (rows, got["position"], k)


def test_keyed_sums_equal_numpy_with_null_keys_and_infinite_rows() -> None:
    """Rows without a key (-1) are left out, infinite rows count as rows only, and a pair
    (group, seq_id) is noted where either changes between keyed rows."""
    from mismatch_cli import kernels

    rng = np.random.default_rng(2)
    n, G = 3000, 5
    g = rng.integers(-1, G, n)
    g[:40] = 3  # a run
    sid = np.sort(rng.integers(0, 60, n))
    fin = rng.random(n) > 0.1
    m = int(fin.sum())
    d = rng.normal(0, 0.5, m)
    ad, k3, p = np.abs(d), M.k3_per_token(d), rng.random(m)
    sums = np.zeros((7, G))
    pg, ps = np.empty(n, np.intp), np.empty(n, np.int64)
    k = kernels.keyed_sums(g, fin, d, ad, k3, p, sid, 0.1, np.log(2), sums, pg, ps)
    keyed, gf = g >= 0, g[fin]
    kf = gf >= 0
    want = np.zeros((7, G))
    want[0] = np.bincount(g[keyed], minlength=G)
    for i, w in enumerate((np.ones(m), ad, d, k3, np.where(p < 0.1, ad, 0.0), ad > np.log(2))):
        want[i + 1] = np.bincount(gf[kf], weights=w[kf], minlength=G)
    np.testing.assert_array_equal(sums[[0, 1, 6]], want[[0, 1, 6]])
    np.testing.assert_allclose(sums, want, rtol=1e-12, atol=1e-15)
    kg, ks = g[keyed], sid[keyed]
    change = np.r_[True, (kg[1:] != kg[:-1]) | (ks[1:] != ks[:-1])]
    np.testing.assert_array_equal(pg[:k], kg[change])
    np.testing.assert_array_equal(ps[:k], ks[change])
