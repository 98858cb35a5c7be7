"""analysis.py against hand-computed answers, properties, and a synthetic run with known eps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mismatch_cli import aggregates as G
from mismatch_cli import analysis as A
from mismatch_cli import theory
from mismatch_cli.errors import MismatchError

INF = math.inf
EDGES = (0.0, 0.1, 0.5, 1.0)
# (seq_id, p_train, delta, kept_train): 10 tokens, one infinite (pruned by the training side).
ROWS = [
    (0, 0.05, 0.20, True),
    (0, 0.05, -0.10, True),
    (0, 0.30, 0.05, True),
    (0, 0.90, -0.01, True),
    (0, 1.00, 0.00, True),
    (1, 0.02, 0.30, True),
    (1, 0.60, 0.02, True),
    (1, 0.00, INF, False),
    (2, 0.40, -0.05, True),
    (2, 0.10, 0.10, True),  # p on an edge: bucket [0.1, 0.5), and head for tail = 0.1
]


def hand_table() -> pd.DataFrame:
    seq, p, d, kept = (list(c) for c in zip(*ROWS, strict=True))
    p_infer = [pi * math.exp(di) if k else 0.01 for pi, di, k in zip(p, d, kept, strict=True)]
    return pd.DataFrame(
        {
            "seq_id": seq,
            "delta": d,
            "p_train": p,
            "p_infer": p_infer,
            "eps_hat": [0.01 * i for i in range(1, 11)],
            "kept_train": kept,
        }
    )


def mean(v: list[float]) -> float:
    return sum(v) / len(v)


def se(v: list[float]) -> float:
    m = mean(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) / math.sqrt(len(v))


# ----------------------------------------------------------------------------- buckets


def test_bucket_stats_hand_computed() -> None:
    b = A.bucket_stats(hand_table(), EDGES, eps=0.1)
    assert list(b["lo"]) == [0.0, 0.1, 0.5] and list(b["hi"]) == [0.1, 0.5, 1.0]
    assert list(b["count"]) == [3, 3, 3]
    assert list(b["num_infinite"]) == [1, 0, 0]
    np.testing.assert_allclose(b["share"], [1 / 3] * 3)
    d0, d1, d2 = [0.2, -0.1, 0.3], [0.05, -0.05, 0.1], [-0.01, 0.0, 0.02]
    np.testing.assert_allclose(b["mean_abs_delta"], [0.2, 0.2 / 3, 0.01])
    np.testing.assert_allclose(b["mean_delta"], [mean(d0), mean(d1), mean(d2)])
    np.testing.assert_allclose(b["se_delta"], [se(d0), se(d1), se(d2)])
    assert b["se_delta"][0] == pytest.approx(0.1201850425)
    # |delta| in bucket 0 sorted: 0.1, 0.2, 0.3 (numpy's linear quantile rule)
    assert b["p50_abs_delta"][0] == pytest.approx(0.2)
    assert b["p90_abs_delta"][0] == pytest.approx(0.28)
    assert b["p99_abs_delta"][0] == pytest.approx(0.298)
    np.testing.assert_allclose(b["max_abs_delta"], [0.3, 0.1, 0.02])
    x = (0.96, 2.2 / 3, 0.5 / 3)  # mean 1 - p: (.95 .95 .98), (.7 .6 .9), (.1 0 .4)
    np.testing.assert_allclose(b["mean_one_minus_p"], x)
    np.testing.assert_allclose(b["abs_delta_per_one_minus_p"], [0.2 / 0.96, 0.2 / 2.2, 0.06])
    np.testing.assert_allclose(b["envelope_first_order"], [0.192, 0.2 * 2.2 / 3, 0.1 / 3])
    np.testing.assert_allclose(
        b["envelope_exact"], [math.log(1 + xi * math.expm1(0.2)) for xi in x]
    )
    # exact envelope at the token's own p, eps = 0.1: 0.2 > 0.1909 and 0.3 > 0.1963
    np.testing.assert_allclose(b["frac_above_envelope"], [2 / 3, 0, 0])
    np.testing.assert_allclose(b["frac_above_first_order"], [2 / 3, 0, 0])
    np.testing.assert_allclose(b["share_abs_delta"], [0.6 / 0.83, 0.2 / 0.83, 0.03 / 0.83])


def test_empty_bucket_is_nan_not_zero() -> None:
    b = A.bucket_stats(hand_table(), (0.0, 0.01, 0.1, 1.0), eps=0.1)
    assert b["count"][0] == 0
    for col in ("mean_abs_delta", "mean_delta", "se_delta", "p50_abs_delta", "max_abs_delta"):
        assert math.isnan(b[col][0])
    assert b["num_infinite"][0] == 1  # p_train = 0 for the pruned token
    js = A.json_ready(b)
    assert js[0]["mean_abs_delta"] is None and js[0]["count"] == 0


def test_bucket_by_infer_uses_p_infer() -> None:
    df = hand_table()
    b = A.bucket_stats(df, EDGES, by="infer", eps=0.1)
    p = df["p_infer"][df["kept_train"]]
    assert list(b["count"]) == [
        int((p < 0.1).sum()),
        int(((p >= 0.1) & (p < 0.5)).sum()),
        int((p >= 0.5).sum()),
    ]
    x = 1 - p[(p >= 0.5)]
    assert b["mean_one_minus_p"][2] == pytest.approx(x.mean())
    assert b["num_infinite"][0] == 1  # its p_infer (0.01) is in the first bucket


@settings(max_examples=200, deadline=None)
@given(
    p=st.lists(
        st.one_of(st.sampled_from(G.DEFAULT_EDGES), st.floats(0, 1)), min_size=1, max_size=200
    ),
    extra=st.lists(st.floats(0.001, 0.999), max_size=5),
)
def test_buckets_partition_the_tokens(p: list[float], extra: list[float]) -> None:
    edges = np.unique(np.concatenate([[0.0, 1.0], extra]))
    pa = np.asarray(p)
    idx = G.bucket_index(pa, edges)
    assert np.all(idx >= 0)  # edges cover [0, 1]: every token has exactly one bucket
    lo, hi = edges[idx], edges[idx + 1]
    last = idx == len(edges) - 2
    assert np.all((lo <= pa) & ((pa < hi) | (last & (pa == hi))))
    df = pd.DataFrame({"seq_id": 0, "delta": 0.01, "p_train": pa, "p_infer": pa, "eps_hat": 0.1})
    assert A.bucket_stats(df, edges, eps=0.1)["count"].sum() == len(p)


def test_tokens_outside_the_edges_are_counted() -> None:
    r = A.analyze(hand_table(), edges=(0.2, 1.0), eps=0.1)
    assert r["num_outside_edges"] == 4  # p = 0.05, 0.05, 0.02, 0.1
    assert r["buckets"][0]["count"] == 5


@pytest.mark.parametrize(
    "edges",
    ["0.5,0.1,1", "0,0.5,0.5,1", "-0.1,0.5,1", "0,0.5,1.5", "0,abc,1", "0.5", "0,nan,1"],
)
def test_bad_edges(edges: str) -> None:
    with pytest.raises(MismatchError, match="--edges"):
        G.parse_edges(edges)


def test_parse_edges_default_and_text() -> None:
    np.testing.assert_array_equal(G.parse_edges(None), G.DEFAULT_EDGES)
    np.testing.assert_array_equal(G.parse_edges("0, 1e-3,0.1,1"), [0, 1e-3, 0.1, 1])


# ----------------------------------------------------------------------------- bound, tail


def test_envelope_check_fit_and_eps() -> None:
    df = hand_table()
    env = A.envelope_check(df, 0.1)
    assert env["exact"]["num_above"] == 2 and env["exact"]["frac_above"] == pytest.approx(2 / 9)
    assert env["first_order"]["num_above"] == 2
    assert env["two_eps"]["num_above"] == 1  # only 0.3 > 0.2
    x = [1 - p for _, p, _, k in ROWS if k]
    y = [abs(d) for _, _, d, k in ROWS if k]
    slope = sum(a * b for a, b in zip(x, y, strict=True)) / sum(a * a for a in x)
    ss_res = sum((b - slope * a) ** 2 for a, b in zip(x, y, strict=True))
    ss_tot = sum((b - mean(y)) ** 2 for b in y)
    fit = A.fit_slope(np.array(x), np.array(y))
    assert fit["slope"] == pytest.approx(slope) and fit["r2"] == pytest.approx(1 - ss_res / ss_tot)
    # eps_hat 0.01..0.10 for all 10 positions: numpy's q0.99
    assert A.frame_eps(df) == pytest.approx(0.01 + 0.99 * 9 * 0.01)


def test_tail_bias_hand_computed() -> None:
    t = A.tail_bias(hand_table(), 0.1)
    tail, head = [0.2, -0.1, 0.3], [0.05, -0.01, 0.0, 0.02, -0.05, 0.1]
    assert t["n"] == 3 and t["head"]["n"] == 6
    assert t["token_share"] == pytest.approx(3 / 9)
    assert t["abs_delta_share"] == pytest.approx(0.6 / 0.83)
    assert t["mean_delta"] == pytest.approx(mean(tail))
    assert t["se"] == pytest.approx(se(tail))
    assert t["z"] == pytest.approx(mean(tail) / se(tail))
    assert t["p_value"] == pytest.approx(math.erfc(abs(t["z"]) / math.sqrt(2)))
    assert t["head"]["mean_delta"] == pytest.approx(mean(head))
    assert t["diff"] == pytest.approx(mean(tail) - mean(head))
    # clustered by sequence: tail tokens are in seq 0 (0.2, -0.1) and seq 1 (0.3)
    m = mean(tail)
    se_seq = math.sqrt((0.2 - m + -0.1 - m) ** 2 + (0.3 - m) ** 2) / 3
    assert t["se_seq"] == pytest.approx(se_seq)
    with pytest.raises(MismatchError, match="--tail"):
        A.tail_bias(hand_table(), 1.5)


# ----------------------------------------------------------------------------- sequences, metrics


def test_sequence_stats_hand_computed() -> None:
    s = A.sequence_stats(hand_table())
    assert list(s["seq_id"]) == [0, 1, 2]
    assert list(s["num_tokens"]) == [5, 3, 2]
    assert list(s["num_infinite"]) == [0, 1, 0]
    assert s["sum_delta"][0] == pytest.approx(0.14) and s["sum_delta"][1] == INF
    assert s["sum_delta"][2] == pytest.approx(0.05)
    np.testing.assert_allclose(s["sum_one_minus_p"], [2.7, 0.98 + 0.4 + 1.0, 1.5])
    np.testing.assert_allclose(s["mean_delta"][[0, 2]], [0.14 / 5, 0.05 / 2])
    acc = A.accumulation(s)
    assert acc["num_sequences"] == 2
    # two finite sequences: the line through (5, 0.14) and (2, 0.05)
    assert acc["vs_length"]["slope"] == pytest.approx(0.03)
    assert acc["vs_length"]["corr"] == pytest.approx(1.0)
    assert sum(b["count"] for b in acc["length_bins"]) == 2


def test_rl_metrics_hand_computed() -> None:
    df = hand_table()
    m = A.rl_metrics(df)
    d = np.array([x for _, _, x, k in ROWS if k])
    dd = -d
    assert m["k1"] == pytest.approx(0.51 / 9)
    assert m["k2"] == pytest.approx(float(np.mean(dd**2 / 2)))
    assert m["k3"] == pytest.approx(float(np.mean(np.exp(dd) - 1 - dd)))
    assert m["mean_abs_delta"] == pytest.approx(0.83 / 9)
    assert m["max_abs_delta"] == pytest.approx(0.3)
    fin = df[df["kept_train"]]
    dp = (fin["p_train"] - fin["p_infer"]).abs()
    assert m["mean_abs_dp"] == pytest.approx(dp.mean()) and m["max_abs_dp"] == pytest.approx(
        dp.max()
    )
    assert m["pearson_p"] == pytest.approx(fin["p_train"].corr(fin["p_infer"]))
    gaps = [0.14 / 5, 0.05 / 2]  # sequence 1 holds an infinite delta: excluded
    assert m["log_ppl_gap_mean"] == pytest.approx(mean(gaps))
    assert m["log_ppl_gap_abs_mean"] == pytest.approx(mean(gaps))
    assert m["ppl_ratio"] == pytest.approx(mean([math.exp(g) for g in gaps]))
    assert m["chi2_token"] == pytest.approx(float(np.mean(np.exp(2 * dd) - 1)))
    assert m["chi2_seq"] == pytest.approx(mean([math.expm1(-0.28), math.expm1(-0.1)]))
    w = np.exp(-np.array([0.14, 0.05]))
    assert m["is_seq_mean"] == pytest.approx(w.mean()) and m["is_seq_min"] == pytest.approx(w.min())
    assert m["ess_seq"] == pytest.approx(1 / np.mean((w / w.mean()) ** 2))
    rho = np.exp(dd)
    assert m["is_token_max"] == pytest.approx(math.exp(0.1))
    assert m["ess_token"] == pytest.approx(1 / np.mean((rho / rho.mean()) ** 2))
    assert m["frac_token_above_cap_2"] == 0.0 and m["frac_seq_above_cap_5"] == 0.0
    assert all(math.isfinite(v) for v in m.values())  # the infinite token poisons nothing


def test_caps_count_ratios_above_the_cap() -> None:
    df = pd.DataFrame(
        {
            "seq_id": [0, 0, 1, 1],
            "delta": [-1.0, -0.5, 0.0, -2.0],  # rho = e, e^0.5, 1, e^2
            "p_train": [0.5] * 4,
            "p_infer": [0.5] * 4,
        }
    )
    m = A.rl_metrics(df)
    assert m["frac_token_above_cap_2"] == pytest.approx(0.5)  # e and e^2
    assert m["frac_token_above_cap_3"] == pytest.approx(0.25)  # e^2 = 7.39
    assert m["frac_token_above_cap_5"] == pytest.approx(0.25)
    # sequences: exp(1.5) = 4.48 and exp(2) = 7.39
    assert m["frac_seq_above_cap_3"] == pytest.approx(1.0)
    assert m["frac_seq_above_cap_5"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- analyze


def test_analyze_dataframe_json_schema() -> None:
    r = A.analyze(hand_table(), edges=EDGES, tail=0.1)
    s = json.dumps(r, allow_nan=False)  # strict JSON: NaN became null
    assert json.loads(s) == r
    for key in (
        "buckets",
        "eps_hat",
        "envelope",
        "fit",
        "tail",
        "metrics",
        "num_tokens",
        "num_sequences",
        "num_infinite",
        "eps",
        "eps_estimator",
        "verdict",
    ):
        assert key in r
    for b in r["buckets"]:
        for key in (
            "lo",
            "hi",
            "count",
            "mean_abs_delta",
            "mean_delta",
            "se_delta",
            "max_abs_delta",
            "mean_one_minus_p",
            "frac_above_envelope",
            "share_abs_delta",
        ):
            assert key in b
    assert set(r["envelope"]) >= {"first_order", "exact"}
    assert set(r["fit"]) >= {"slope", "r2"}
    assert set(r["tail"]) >= {"threshold", "token_share", "abs_delta_share", "mean_delta", "se"}
    for key in (
        "k1",
        "k2",
        "k3",
        "mean_abs_delta",
        "max_abs_delta",
        "mean_abs_dp",
        "pearson_p",
        "log_ppl_gap_mean",
        "log_ppl_gap_abs_mean",
        "chi2_token",
        "chi2_seq",
        "ess_token",
        "ess_seq",
    ):
        assert key in r["metrics"]
    assert (r["num_tokens"], r["num_infinite"], r["num_sequences"]) == (10, 1, 3)
    assert r["num_sequences_infinite"] == 1
    assert r["eps_estimator"] == "q0.99 of eps_hat"
    assert r["eps"] == pytest.approx(0.0991)


def test_analyze_eps_override_and_verdict_numbers() -> None:
    r = A.analyze(hand_table(), edges=EDGES, eps=0.1)
    assert r["eps"] == 0.1 and r["eps_estimator"] == "--eps"
    assert r["eps_hat"] == pytest.approx(0.0991)  # still reported
    v = r["verdict"]
    assert "77.8%" in v  # 1 - 2/9 of tokens under the exact envelope
    assert "33.3% of tokens" in v and "72.3% of total |delta|" in v  # 3/9, 0.6/0.83
    assert "1 of 10 tokens" in v


def test_analyze_rejects_bad_options_and_empty() -> None:
    with pytest.raises(MismatchError, match="empty"):
        A.analyze(hand_table().iloc[:0])
    with pytest.raises(MismatchError, match="--eps"):
        A.analyze(hand_table(), eps=-1.0)
    with pytest.raises(MismatchError, match="--by"):
        A.analyze(hand_table(), by="both")
    with pytest.raises(MismatchError, match="lacks column"):
        A.analyze(hand_table().drop(columns=["p_infer"]))


def test_all_infinite_still_reports() -> None:
    df = hand_table()
    df["kept_train"] = False
    r = A.analyze(df)
    assert r["num_infinite"] == 10 and r["num_finite"] == 0
    assert r["metrics"]["k1"] is None and r["buckets"][-1]["count"] == 0
    json.dumps(r, allow_nan=False)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory):
    from mismatch_cli.synthetic import write_synthetic_run

    return write_synthetic_run(
        tmp_path_factory.mktemp("an") / "run", num_sequences=48, max_len=40, eps=0.1
    )


def test_synthetic_run_obeys_the_bound_at_its_true_eps(synthetic_run) -> None:
    r = A.analyze(synthetic_run, eps=0.1)
    assert r["run"]["model"] == "synthetic" and r["warnings"] == []
    assert r["envelope"]["exact"]["num_above"] == 0
    assert r["envelope"]["two_eps"]["num_above"] == 0
    # eps_hat is a lower bound on the true eps, and close to it with 64-token vocabularies
    assert 0.05 < r["eps_hat"] <= 0.1 + 1e-6
    # at a smaller eps the bound must be violated: the check can fail
    assert A.analyze(synthetic_run, eps=0.02)["envelope"]["exact"]["num_above"] > 0
    # reading a path gives the same numbers as the DataFrame it holds
    df = pd.read_parquet(synthetic_run / "tokens.parquet")
    r2 = A.analyze(df, eps=0.1)
    assert r2["buckets"] == r["buckets"] and r2["metrics"] == r["metrics"]


def test_analysis_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, mismatch_cli.analysis, mismatch_cli.render; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_theory_envelope_is_the_one_used() -> None:
    b = A.bucket_stats(hand_table(), EDGES, eps=0.3)
    np.testing.assert_allclose(
        b["envelope_exact"], theory.envelope_exact(b["mean_one_minus_p"].to_numpy(), 0.3)
    )


def test_verl_named_metrics_clamp_the_log_ratio_like_verl(tmp_path: Path) -> None:
    """verl clamps d = -delta to +-20 (SAFETY_BOUND, verl/trainer/ppo/rollout_corr_helper.py
    @1dda039) in k2, chi2_token and the token IS statistics; k3 (`k3_kl`) is unclamped."""
    from mismatch_cli.cli import app
    from mismatch_cli.runs import write_run
    from mismatch_cli.synthetic import synthetic_meta, synthetic_tables

    tokens, seqs = synthetic_tables(num_sequences=6, max_len=12, seed=3)
    tokens.loc[0, "delta"] = -30.0  # d = +30: ratio e^30, clamped to e^20
    tokens.loc[1, "delta"] = 30.0  # d = -30
    run = write_run(tmp_path / "run", tokens, seqs, synthetic_meta())
    res = CliRunner().invoke(app, ["report", str(run), "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.output)["metrics"]

    d = -tokens["delta"].to_numpy()  # every delta is finite here
    dc = np.clip(d, -20, 20)
    w = np.exp(dc)
    assert m["k2"] == pytest.approx(np.mean(0.5 * dc**2), rel=1e-12)
    assert m["chi2_token"] == pytest.approx(np.mean(w**2) - 1, rel=1e-9)
    assert m["is_token_max"] == pytest.approx(math.exp(20), rel=1e-12)
    assert m["is_token_min"] == pytest.approx(math.exp(-20), rel=1e-12)
    assert m["is_token_mean"] == pytest.approx(w.mean(), rel=1e-12)
    assert m["ess_token"] == pytest.approx(1 / np.mean((w / w.mean()) ** 2), rel=1e-9)
    assert m["k3"] == pytest.approx(np.mean(np.expm1(d) - d), rel=1e-9)  # unclamped
    assert m["k3"] > np.mean(np.expm1(dc) - dc) * 1e3  # e^30 is really in it


def test_p99_and_ratio_band_metrics_equal_numpy() -> None:
    """`p99_abs_delta` and `frac_ratio_outside_0.5_2` (the monitor's names) against numpy."""
    import math

    from mismatch_cli.synthetic import synthetic_tables

    tokens, _ = synthetic_tables(num_sequences=24, eps=0.8, seed=7)
    m = A.analyze(tokens)["metrics"]
    d = tokens["delta"].to_numpy()
    d = d[np.isfinite(d) & tokens["kept_train"].to_numpy()]
    assert m["p99_abs_delta"] == pytest.approx(float(np.quantile(np.abs(d), 0.99)), rel=1e-12)
    want = float(np.mean(np.abs(d) > math.log(2)))
    assert m["frac_ratio_outside_0.5_2"] == pytest.approx(want, rel=1e-12)
    assert 0 < want < 1  # the case tests something
