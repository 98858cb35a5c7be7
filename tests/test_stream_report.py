"""`report`, `compare` and the figures stream the token table (issue 12 §3): batches of a
few rows, which split every sequence, give the one-batch answer; `compare.moved` gives one
answer on each of its paths (row against row, merge join by sequence, whole join); the
figures' streamed histograms and running sums equal a direct numpy computation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mismatch_cli import compare as C
from mismatch_cli import metrics as M
from mismatch_cli import pairing as P
from mismatch_cli.aggregates import DEFAULT_EDGES, bucket_index
from mismatch_cli.analysis import analyze
from mismatch_cli.plots.data import BoundHist, DeltaHist, run_data
from mismatch_cli.runs import atomic_write_json, read_sequences, read_tokens, write_run
from mismatch_cli.synthetic import synthetic_meta, write_synthetic_run

TINY = 7  # rows per batch: every sequence (12..48 tokens) spans several batches
WHOLE = 1 << 20
INF_ROWS = (5, 100, 101, 400)  # tokens given an infinite delta (one sequence gets two)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic run (~900 tokens, 30 sequences) with a few infinite deltas."""
    d = tmp_path_factory.mktemp("stream_report")
    src = write_synthetic_run(d / "src", num_sequences=30, eps=0.5, seed=11)
    tok = read_tokens(src)
    i = list(INF_ROWS)
    tok.loc[i, "delta"], tok.loc[i, "p_train"], tok.loc[i, "kept_train"] = np.inf, 0.0, False
    tok.loc[i, "logp_train"] = -np.inf
    return write_run(d / "run", tok, read_sequences(src), synthetic_meta())


# --- report -----------------------------------------------------------------------------------


def differences(got: Any, want: Any, rel: float, path: str = "") -> list[str]:
    """Paths where `got` differs from `want`: floats beyond `rel` relative (or 1e-12
    absolute), anything else unequal; NaN (None in a report) equals itself."""
    if isinstance(want, dict):
        assert set(got) == set(want), path
        return [d for k in want for d in differences(got[k], want[k], rel, f"{path}.{k}")]
    if isinstance(want, list):
        assert len(got) == len(want), path
        return [
            d
            for i, (a, b) in enumerate(zip(got, want, strict=True))
            for d in differences(a, b, rel, f"{path}[{i}]")
        ]
    if isinstance(want, float) and isinstance(got, float):
        return [] if got == pytest.approx(want, rel=rel, abs=1e-12) else [path]
    return [] if got == want else [path]


def is_quantile(path: str) -> bool:
    """A report key that comes from a quantile (a sketch beyond the exact limit)."""
    key = path.rsplit(".", 1)[-1]
    return (
        any(q in key for q in ("p50", "p90", "p99"))
        or ".eps_hat" in path
        or key == "eps_needed_q99"
    )


def test_report_in_tiny_batches_equals_one_batch(run: Path) -> None:
    """Every field (counts, means, standard errors, bucket stats, per-sequence sums and
    their accumulation, k3, the tail split, quantiles, the verdict) to summation order."""
    whole = analyze(run, batch_rows=WHOLE)
    tiny = analyze(run, batch_rows=TINY)
    assert whole["num_infinite"] == len(INF_ROWS) and whole["num_sequences_infinite"] == 3
    assert whole["quantiles"] == tiny["quantiles"] == "exact"
    assert differences(tiny, whole, rel=1e-9) == []
    # the exact fields are what numpy says of the whole table
    tok = read_tokens(run)
    d = tok["delta"].to_numpy()
    fin = np.isfinite(d)
    assert tiny["num_tokens"] == len(d) and tiny["num_finite"] == int(fin.sum())
    assert tiny["metrics"]["k3"] == pytest.approx(M.k3(d[fin]), rel=1e-12)
    assert tiny["metrics"]["mean_abs_delta"] == pytest.approx(np.abs(d[fin]).mean(), rel=1e-12)
    idx = bucket_index(tok["p_train"].to_numpy()[fin], np.asarray(DEFAULT_EDGES))
    ad = np.abs(d[fin])
    for i, b in enumerate(tiny["buckets"]):
        assert b["count"] == int((idx == i).sum())
        if b["count"]:
            assert b["mean_abs_delta"] == pytest.approx(ad[idx == i].mean(), rel=1e-12)
            assert b["p90_abs_delta"] == pytest.approx(np.quantile(ad[idx == i], 0.9), rel=1e-12)
    tail = (tok["p_train"].to_numpy()[fin] < tiny["tail"]["threshold"]).sum()
    assert tiny["tail"]["n"] == int(tail)


def test_sketched_quantiles_stay_within_the_documented_error(run: Path) -> None:
    """Past the exact limit (20 values here) only quantiles change, each within the sketch's
    0.5% relative error (1% allowed: exact quantiles interpolate between neighbours); eps is
    fixed so the envelopes do not move with the sketched eps_hat. The label of the
    quantiles and the verdict's text (it quotes eps_needed) change with them."""
    whole = analyze(run, batch_rows=WHOLE, eps=0.4)
    sk = analyze(run, batch_rows=TINY, eps=0.4, exact_limit=20)
    assert sk["quantiles"].startswith("sketch")
    text = (".conventions.quantiles", ".quantiles", ".verdict")
    changed = [p for p in differences(sk, whole, rel=1e-9) if p not in text]
    assert changed and all(is_quantile(p) for p in changed), changed
    assert [p for p in differences(sk, whole, rel=0.01) if p not in text] == []


@pytest.mark.parametrize("drop_eps_hat", [False, True])
@pytest.mark.parametrize(
    "floor_share, limit", [(0.5, 1 << 23), (0.0, 1 << 23), (1e6, 1 << 23), (0.5, 3)]
)
def test_envelopes_counted_in_the_main_pass_equal_a_pass_at_that_eps(
    run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    drop_eps_hat: bool,
    floor_share: float,
    limit: int,
) -> None:
    """eps is learnt from the main pass (q0.99 of eps_hat, or of the eps needed without
    it) and the envelope counts come from the candidates kept in that same pass: they
    equal the counts of a scan told that eps beforehand, whether the candidates suffice
    (floor below eps), or not (a floor above eps, more candidates than the limit) and a
    pass of their own counts them; eps itself equals `theory.estimate_eps`."""
    from mismatch_cli import aggregates as G
    from mismatch_cli import theory

    if drop_eps_hat:
        tok = read_tokens(run).assign(eps_hat=np.nan)  # an import: no eps_hat
        run = write_run(tmp_path / "no_eps_hat", tok, read_sequences(run), synthetic_meta())
    monkeypatch.setattr(G, "FLOOR_SHARE", floor_share)
    monkeypatch.setattr(G, "CANDIDATE_LIMIT", limit)
    passes = []
    real = G.Aggregates.count_envelopes
    monkeypatch.setattr(
        G.Aggregates, "count_envelopes", lambda self, b: (passes.append(1), real(self, b))
    )
    edges = G.parse_edges(None)
    src = G.report_tokens(run, TINY)
    one = G.scan(src, edges=edges)
    assert one.eps is not None and math.isfinite(one.eps)
    tok = read_tokens(run)
    if not drop_eps_hat:
        assert one.eps == theory.estimate_eps(tok["eps_hat"].to_numpy())
    told = G.scan(G.report_tokens(run, TINY), edges=edges, eps=one.eps)
    assert one.envelope_check() == told.envelope_check()
    pd.testing.assert_frame_equal(one.buckets(), told.buckets())
    assert sum(v["num_above"] for k, v in one.envelope_check().items() if k != "eps") > 0
    assert len(passes) == (1 if floor_share > 1 or limit == 3 else 0)


# --- compare.moved ----------------------------------------------------------------------------


def write_tokens(path: Path, tok: pd.DataFrame) -> Path:
    """A run directory holding only tokens.parquet (what `moved` reads) and a run.json."""
    path.mkdir(parents=True)
    pq.write_table(pa.Table.from_pandas(tok, preserve_index=False), path / "tokens.parquet")
    atomic_write_json(path / "run.json", {**synthetic_meta(), "status": "complete"})
    return path


def reference_moved(ta: pd.DataFrame, tb: pd.DataFrame) -> dict[str, Any]:
    """`moved`'s numbers from one in-memory join (the pre-streaming implementation)."""
    j = ta.merge(tb, on=["seq_id", "pos"], suffixes=("_a", "_b"))
    e = np.asarray(DEFAULT_EDGES)
    idx = bucket_index(j["p_train_a"].to_numpy(), e)
    out: dict[str, Any] = {
        "num_common": len(j),
        "num_only_a": len(ta) - len(j),
        "num_only_b": len(tb) - len(j),
    }
    for side in ("infer", "train"):
        la, lb = j[f"logp_{side}_a"].to_numpy(), j[f"logp_{side}_b"].to_numpy()
        ok = np.isfinite(la) & np.isfinite(lb)
        m = lb[ok] - la[ok]
        bi = idx[ok]
        out[side] = {
            "num_tokens": int(ok.sum()),
            "num_not_finite": int((~ok).sum()),
            "mean_abs": float(np.abs(m).mean()),
            "max_abs": float(np.abs(m).max()),
            "frac_identical": float((m == 0).mean()),
            "k3": M.k3(m),
            "counts": [int((bi == i).sum()) for i in range(len(e) - 1)],
        }
    return out


def assert_moved(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["shared"], got["reason"]
    for k in ("num_common", "num_only_a", "num_only_b"):
        assert got[k] == want[k], k
    for side in ("infer", "train"):
        g, w = got[side], want[side]
        assert [b["count"] for b in g["buckets"]] == w["counts"], side
        for k in ("num_tokens", "num_not_finite"):
            assert g[k] == w[k], (side, k)
        for k in ("mean_abs", "max_abs", "frac_identical", "k3"):
            assert g[k] == pytest.approx(w[k], rel=1e-9, abs=1e-15), (side, k)


@pytest.fixture(scope="module")
def moved_runs(run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run a's tokens and b's: a's training side plus noise, a few log-probs -inf in b;
    b written aligned, shuffled within sequences with 3 sequences dropped and 2 added
    (sorted by seq_id, not row-aligned), and in descending seq_id (not sorted)."""
    d = tmp_path_factory.mktemp("moved")
    rng = np.random.default_rng(5)
    ta = read_tokens(run, C._MOVE_COLUMNS)
    tb = ta.copy()
    tb["logp_train"] = tb["logp_train"] + rng.normal(0, 0.02, len(tb))
    tb.loc[[3, 60, 61], "logp_train"] = -np.inf
    tb.loc[tb.index % 4 == 0, "logp_train"] = ta["logp_train"]  # some tokens do not move
    shuffled = tb.sample(frac=1.0, random_state=1)
    shuffled = shuffled[~shuffled["seq_id"].isin([0, 7, 29])]  # only in a
    extra = tb[tb["seq_id"].isin([3, 4])].assign(seq_id=lambda f: f["seq_id"] + 1000)
    shuffled = pd.concat([shuffled, extra]).sort_values("seq_id", kind="stable")  # only in b
    return {
        "a": (run, ta),
        "aligned": (write_tokens(d / "aligned", tb), tb),
        "merge": (write_tokens(d / "merge", shuffled), shuffled),
        "unsorted": (write_tokens(d / "unsorted", shuffled[::-1]), shuffled),
    }


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("aligned", ["aligned"]),
        ("merge", ["not aligned", "merge join"]),
        ("unsorted", ["not aligned", "not merge join"]),  # then the whole join
    ],
)
@pytest.mark.parametrize("batch_rows", [TINY, WHOLE])
def test_moved_is_the_same_on_every_path(
    moved_runs: dict[str, Any], name: str, path: list[str], batch_rows: int, monkeypatch
) -> None:
    taken = []
    for fn, label in ((P._aligned, "aligned"), (P._joined, "merge join")):

        def spy(*args: Any, _fn: Any = fn, _label: str = label) -> bool:
            ok = _fn(*args)
            taken.append(_label if ok else f"not {_label}")
            return ok

        monkeypatch.setattr(P, fn.__name__, spy)
    (a, ta), (b, tb) = moved_runs["a"], moved_runs[name]
    got = C.moved(a, b, batch_rows=batch_rows)
    assert taken == path
    want = reference_moved(ta, tb)
    if name != "aligned":
        assert want["num_only_a"] > 0 and want["num_only_b"] > 0
    assert want["train"]["num_not_finite"] > 0 and 0 < want["train"]["frac_identical"] < 1
    assert_moved(got, want)
    assert got["infer"]["max_abs"] == 0.0  # the inference side did not move


def test_moved_with_an_empty_table(moved_runs: dict[str, Any], tmp_path: Path) -> None:
    """An empty token table (either side, or both) ends the join: nothing in common."""
    a, ta = moved_runs["a"]
    empty = write_tokens(tmp_path / "empty", ta.iloc[:0])
    for x, y, only_a, only_b in ((a, empty, len(ta), 0), (empty, a, 0, len(ta))):
        m = C.moved(x, y, batch_rows=TINY)
        assert not m["shared"] and m["num_common"] == 0
        assert (m["num_only_a"], m["num_only_b"]) == (only_a, only_b)
    m = C.moved(empty, empty)
    assert not m["shared"] and m["num_common"] == m["num_only_a"] == m["num_only_b"] == 0


def test_run_summary_in_tiny_batches(run: Path) -> None:
    """compare's per-run numbers: the streamed p99 of |delta| is numpy's."""
    s = C.run_summary(run, batch_rows=TINY)
    assert differences(s, C.run_summary(run), rel=1e-9) == []
    d = read_tokens(run, ["delta"])["delta"].to_numpy()
    ad = np.abs(d[np.isfinite(d)])
    assert s["p99_abs_delta"] == pytest.approx(np.quantile(ad, 0.99), rel=1e-12)
    assert s["k3"] == pytest.approx(M.k3(d[np.isfinite(d)]), rel=1e-12)


# --- the figures' streamed data ---------------------------------------------------------------


def test_figure_data_in_tiny_batches_equal_numpy(run: Path) -> None:
    tiny = run_data(run, batch_rows=TINY)
    whole = run_data(run, batch_rows=WHOLE)
    tok = read_tokens(run)
    d, p = tok["delta"].to_numpy(), tok["p_train"].to_numpy()
    fin = np.isfinite(d)
    for r in (tiny, whole):
        # distribution: the drawn histogram of delta is numpy's on the same edges
        lt = DeltaHist.linear_threshold([r.deltas])
        vmax = max(r.deltas.max_abs, lt * 1.01)
        edges = r.deltas.edges(lt, vmax)
        got = r.deltas.counts(lt, (edges.size - 5) // 2)
        want, _ = np.histogram(np.clip(d[fin], edges[0], edges[-1]), edges)
        np.testing.assert_array_equal(got, want)
        assert r.deltas.max_abs == np.abs(d[fin]).max()
        # bound: the |delta| marginal of the 2-D counts is numpy's histogram on the Y grid
        ad, x = np.abs(d[fin]), 1 - p[fin]
        ok = (ad > 0) & (x > 0) & (p[fin] > 0)
        ye = BoundHist.Y.edge(np.arange(BoundHist.Y.size + 1))
        y = np.clip(ad[ok], ye[0], np.nextafter(ye[-1], 0))
        for kind in BoundHist.KINDS:
            h = r.bound.h[kind]
            assert h.sum() + r.bound.below[kind] == int(ok.sum())
        np.testing.assert_array_equal(
            r.bound.h["p"].sum(axis=0), np.histogram(y, ye)[0]
        )  # p >= 1e-12 here: none left of the x grid
        # sequence: count, sum and sum of squares of the running sums by position
        good = tok[~tok["seq_id"].isin(tok.loc[~fin, "seq_id"])].sort_values(["seq_id", "pos"])
        cum = good.groupby("seq_id")["delta"].cumsum().to_numpy()
        pos = good["pos"].to_numpy()
        ps = r.positions
        assert ps.ordered
        np.testing.assert_array_equal(ps.n, np.bincount(pos))
        np.testing.assert_allclose(ps.s1, np.bincount(pos, weights=cum), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(
            ps.s2, np.bincount(pos, weights=cum * cum), rtol=1e-12, atol=1e-12
        )
    for kind in BoundHist.KINDS:
        np.testing.assert_array_equal(tiny.bound.h[kind], whole.bound.h[kind])
    assert tiny.buckets.equals(whole.buckets) or np.allclose(
        tiny.buckets.to_numpy(float), whole.buckets.to_numpy(float), rtol=1e-9, equal_nan=True
    )
    assert math.isclose(tiny.metrics["k3"], whole.metrics["k3"], rel_tol=1e-12)


def test_report_of_rows_in_any_order_equals_the_sorted_table(run: Path, tmp_path: Path) -> None:
    """The one-pass scan adds sequences as batches bring them: rows in another order (a
    batch's sequences below ones already seen) are merged into the index, so the report
    equals that of the table in the writers' order, to summation order, in any batching."""
    tok = read_tokens(run)
    shuffled = tok.sample(frac=1.0, random_state=3).reset_index(drop=True)
    assert not shuffled["seq_id"].is_monotonic_increasing
    other = write_run(tmp_path / "shuffled", shuffled, read_sequences(run), synthetic_meta())
    assert not read_tokens(other)["seq_id"].is_monotonic_increasing  # stored as shuffled
    want = analyze(run, batch_rows=WHOLE)
    for rows in (TINY, 100):
        got = analyze(other, batch_rows=rows)
        assert got["num_sequences"] == want["num_sequences"] == tok["seq_id"].nunique()
        assert differences(got, want, rel=1e-9) == [".run.path"]
