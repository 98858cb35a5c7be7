"""sweep-threshold: monotonicity, a hand-computed table, the recommendation rule, output
formats and every bad input through the real CLI (one line, non-zero exit, no traceback)."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from mismatch_cli import sweep as sw
from mismatch_cli.errors import MismatchError
from mismatch_cli.runs import RunDir, atomic_write_table
from mismatch_cli.schema import RHO_GRID, TOKENS_FILE
from mismatch_cli.synthetic import write_synthetic_run

REQUIRED_ROW_KEYS = {
    "rho",
    "pruned_token_frac",
    "pruned_seq_frac",
    "pruned_abs_delta_share",
    "kept_mean_abs_delta",
    "kept_mean_delta",
    "kept_k3",
    "mean_pruned_mass",
    "max_pruned_mass",
    "seq_bias_bound_mean",
    "seq_bias_bound_p95",
    "kept_p99_abs_delta",
    "kept_max_abs_delta",
    "kept_frac_ratio_outside_0.5_2",
}
MONOTONE_KEYS = (
    "pruned_tokens",
    "pruned_token_frac",
    "pruned_seq_frac",
    "pruned_abs_delta_share",
    "mean_pruned_mass",
    "max_pruned_mass",
    "seq_bias_bound_mean",
    "seq_bias_bound_p95",
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_run(
        tmp_path_factory.mktemp("syn") / "run", num_sequences=48, eps=0.2, seed=3
    )


def write_run(path: Path, tokens: pd.DataFrame, grid=RHO_GRID) -> Path:
    """A minimal complete run directory holding `tokens` (enough for the sweep)."""
    path.mkdir(parents=True)
    atomic_write_table(path / TOKENS_FILE, pa.Table.from_pandas(tokens, preserve_index=False))
    RunDir(path).write_meta({"format_version": 1, "status": "complete", "rho_grid": list(grid)})
    return path


# --- a tiny table computed by hand ----------------------------------------------------
# grid (0.01, 0.2). Token ratios p / p_max: 1, 0.1, 0.5 | 0.0222, 1, 0 (t5: the training
# side's truncation removed it, delta = +inf). At rho = 0.2, t1 and t3 (and t5) are pruned.
HAND_GRID = (0.01, 0.2)


def hand_table() -> pd.DataFrame:
    p = [0.9, 0.05, 0.3, 0.02, 0.7, 0.0]
    p_max = [0.9, 0.5, 0.6, 0.9, 0.7, 0.8]
    return pd.DataFrame(
        {
            "seq_id": [0, 0, 0, 1, 1, 1],
            "p_train": np.asarray(p, dtype=np.float32).astype(np.float64),
            "p_max_train": np.asarray(p_max, dtype=np.float32).astype(np.float64),
            "delta": [0.01, 0.3, -0.1, 0.5, -0.02, math.inf],
            "kept_train": [True, True, True, True, True, False],
            "pruned_mass_minp": [
                np.array(m, dtype=np.float32)
                for m in ([0, 0.05], [0.01, 0.2], [0, 0.1], [0.02, 0.08], [0, 0.3], [0.05, 0.15])
            ],
            "pruned_mass_abs": [np.array([0.5, 0.5], dtype=np.float32)] * 6,
        }
    )


def k3_by_hand(deltas: list[float]) -> float:
    return sum(math.exp(-x) - 1 + x for x in deltas) / len(deltas)


def test_hand_computed_rows() -> None:
    res = sw.sweep(hand_table(), grid=HAND_GRID)
    base, (lo, hi) = res["baseline"], res["rows"]
    approx = pytest.approx

    assert res["num_infinite"] == 1
    # no pruning: only t5 is outside the support; means over the 5 finite deltas
    assert base["pruned_token_frac"] == approx(1 / 6)
    assert base["pruned_seq_frac"] == approx(0.5)
    assert base["pruned_abs_delta_share"] == 0.0
    assert base["kept_mean_abs_delta"] == approx(0.93 / 5)
    assert base["kept_mean_delta"] == approx(0.69 / 5)
    assert base["kept_seq_mean_abs_sum_delta"] == approx((0.21 + 0.48) / 2)
    assert base["seq_bias_bound_mean"] == 0.0

    # rho = 0.01 keeps every supported token
    assert lo["rho"] == 0.01 and lo["pruned_tokens"] == 1
    assert lo["kept_mean_abs_delta"] == approx(base["kept_mean_abs_delta"])
    assert lo["mean_pruned_mass"] == approx(0.08 / 6)
    assert lo["max_pruned_mass"] == approx(0.05)
    assert lo["seq_bias_bound_mean"] == approx((0.01 + 0.07) / 2)
    assert lo["seq_bias_bound_p95"] == approx(0.01 + 0.95 * 0.06)

    # rho = 0.2 prunes t1 and t3 too; kept deltas are 0.01, -0.1 | -0.02
    kept = [0.01, -0.1, -0.02]
    assert hi["rho"] == 0.2 and hi["pruned_tokens"] == 3
    assert hi["pruned_token_frac"] == approx(0.5)
    assert hi["pruned_seq_frac"] == approx(1.0)
    assert hi["pruned_abs_delta_share"] == approx(0.8 / 0.93)
    assert hi["kept_mean_abs_delta"] == approx(0.13 / 3)
    assert hi["kept_mean_delta"] == approx(-0.11 / 3)
    assert hi["kept_k3"] == approx(k3_by_hand(kept))
    assert hi["kept_seq_mean_abs_sum_delta"] == approx((0.09 + 0.02) / 2)
    assert hi["kept_mean_abs_delta_rel"] == approx((0.13 / 3) / (0.93 / 5))
    assert hi["kept_k3_rel"] == approx(k3_by_hand(kept) / base["kept_k3"])
    assert hi["mean_pruned_mass"] == approx(0.88 / 6)
    assert hi["max_pruned_mass"] == approx(0.3)
    assert hi["seq_bias_bound_mean"] == approx((0.35 + 0.53) / 2)
    assert hi["seq_bias_bound_p95"] == approx(0.35 + 0.95 * 0.18)
    # the tail of the kept tokens: |delta| sorted 0.01, 0.02, 0.1 (p99: linear interpolation)
    assert hi["kept_p99_abs_delta"] == approx(0.02 + 0.98 * 0.08)
    assert hi["kept_max_abs_delta"] == approx(0.1)
    assert hi["kept_frac_ratio_outside_0.5_2"] == 0.0
    assert base["kept_max_abs_delta"] == approx(0.5)
    assert base["kept_frac_ratio_outside_0.5_2"] == 0.0  # r = exp(-0.5) = 0.61 is inside


def test_tail_columns_count_ratios_outside_half_to_two() -> None:
    approx = pytest.approx
    t = hand_table()
    t["delta"] = [0.01, 0.3, -0.8, 0.7, -0.02, math.inf]  # r = 2.23 and 0.497 are outside
    base = sw.sweep(t, grid=HAND_GRID)["baseline"]
    assert base["kept_frac_ratio_outside_0.5_2"] == approx(2 / 5)
    assert base["kept_max_abs_delta"] == approx(0.8)


def test_absolute_rule_reads_its_own_column() -> None:
    res = sw.sweep(hand_table(), rule="absolute", grid=HAND_GRID)
    assert res["rule"] == "absolute"
    lo, hi = res["rows"]
    assert (lo["pruned_tokens"], hi["pruned_tokens"]) == (1, 3)  # p >= 0.01 / p >= 0.2
    assert lo["mean_pruned_mass"] == pytest.approx(0.5)  # pruned_mass_abs, not _minp


def test_kept_decision_is_the_float32_comparison_at_the_boundary() -> None:
    # sampled token exactly at float32(rho) * p_max: kept (>=), as vLLM's min-p and dvp
    pmax = np.float32(0.7)
    at = pmax * np.float32(1e-3)
    below = np.nextafter(at, np.float32(0))
    p = np.array([at, below], dtype=np.float32)
    assert sw.kept_mask(p, np.array([pmax, pmax]), 1e-3).tolist() == [True, False]
    tau = np.float32(0.05)
    p = np.array([tau, np.nextafter(tau, np.float32(0))], dtype=np.float32)
    assert sw.kept_mask(p, None, 0.05, "absolute").tolist() == [True, False]


# --- recommendation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_bias", "target", "expected"),
    [
        (0.05, None, 0.01),  # bound 0.04 at 0.01, 0.44 at 0.2
        (0.5, None, 0.2),
        (0.441, None, 0.2),
        (0.439, None, 0.01),
        (0.01, None, None),
        (0.05, 0.1, 0.2),  # kept mean |delta| 0.186 at 0.01, 0.0433 at 0.2
        (0.05, 0.2, 0.01),
        (0.05, 0.01, None),
    ],
)
def test_recommendation_rule(max_bias: float, target: float | None, expected) -> None:
    res = sw.sweep(hand_table(), grid=HAND_GRID, max_bias=max_bias, target_mismatch=target)
    rec = res["recommended"]
    assert rec["rho"] == (pytest.approx(expected) if expected is not None else None)
    assert rec["criterion"] == ("max-bias" if target is None else "target-mismatch")
    if expected is None:
        assert rec["reason"].startswith("no rho")
    else:
        assert f"rho={expected:g}" in rec["reason"]


def test_target_mismatch_reason_flags_excess_bias() -> None:
    rec = sw.sweep(hand_table(), grid=HAND_GRID, target_mismatch=0.1)["recommended"]
    assert "above --max-bias 0.05" in rec["reason"] and "0.44" in rec["reason"]


def test_max_bias_reason_quotes_numbers() -> None:
    rec = sw.sweep(hand_table(), grid=HAND_GRID)["recommended"]
    assert rec["reason"].startswith("largest rho with mean per-sequence bias bound <= 0.05")
    assert "(0.04 at rho=0.01" in rec["reason"]


# --- on a synthetic run ---------------------------------------------------------------


@pytest.mark.parametrize("rule", ["min-p", "absolute"])
def test_monotone_in_rho(run_dir: Path, rule: str) -> None:
    rows = sw.sweep(run_dir, rule=rule)["rows"]
    assert [r["rho"] for r in rows] == sorted(RHO_GRID)
    for key in MONOTONE_KEYS:
        vals = [r[key] for r in rows]
        assert all(a <= b for a, b in itertools.pairwise(vals)), key
        assert vals[-1] > vals[0], key  # and the sweep is not trivially flat
    # the largest threshold removes tail tokens, whose |delta| is larger (the (1-p) bound)
    assert rows[-1]["kept_mean_abs_delta_rel"] < 1.0


def test_recommended_row_is_the_boundary(run_dir: Path) -> None:
    res = sw.sweep(run_dir, max_bias=0.05)
    rows, rho = res["rows"], res["recommended"]["rho"]
    i = [r["rho"] for r in rows].index(rho)
    assert rows[i]["seq_bias_bound_mean"] <= 0.05 < rows[i + 1]["seq_bias_bound_mean"]


def test_subset_of_grid_and_tolerance(run_dir: Path) -> None:
    full = {r["rho"]: r for r in sw.sweep(run_dir)["rows"]}
    res = sw.sweep(run_dir, rhos=[0.01, 1.0000000001e-3, 0.001])
    assert [r["rho"] for r in res["rows"]] == [0.001, 0.01]  # sorted, de-duplicated, snapped
    assert res["rows"][1] == full[0.01]


def test_dataframe_and_path_agree(run_dir: Path) -> None:
    from mismatch_cli.runs import read_tokens

    assert sw.sweep(read_tokens(run_dir))["rows"] == sw.sweep(run_dir)["rows"]


def test_json_is_strict_and_complete(run_dir: Path) -> None:
    res = sw.sweep(run_dir, rhos=[1e-3])
    text = json.dumps(res, allow_nan=False)  # raises on NaN / inf
    assert {"rule", "rows", "recommended", "baseline"} <= set(json.loads(text))
    assert REQUIRED_ROW_KEYS <= set(res["rows"][0])
    assert list(res["rows"][0]) == list(sw.ROW_KEYS) == list(res["baseline"])
    assert {"rho", "reason"} <= set(res["recommended"])


def test_run_grid_makes_off_default_values_exact(tmp_path: Path) -> None:
    """A run measured on another grid accepts that grid's values (they are exact there)."""
    run = write_run(tmp_path / "r", hand_table(), grid=HAND_GRID)
    assert [r["rho"] for r in sw.sweep(run, rhos=[0.2])["rows"]] == [0.2]
    with pytest.raises(MismatchError, match=r"not on the run's pruning grid.*0\.01, 0\.2"):
        sw.sweep(run, rhos=[1e-3])


def test_library_bad_inputs() -> None:
    t = hand_table()
    with pytest.raises(MismatchError, match="at least one value"):
        sw.sweep(t, rhos=[], grid=HAND_GRID)
    with pytest.raises(MismatchError, match="without the pruning grid"):
        sw.sweep(t.drop(columns="pruned_mass_minp"))
    with pytest.raises(MismatchError, match="grid has 24"):
        sw.sweep(t)  # 2 values per token against the default 24-value grid
    with pytest.raises(MismatchError, match="no generated tokens"):
        sw.sweep(t.iloc[:0], grid=HAND_GRID)


# --- the CLI --------------------------------------------------------------------------


def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str):
    """Run `mismatch ARGS` in-process through the real entry point: (exit code, out, err)."""
    from mismatch_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["mismatch", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    out, err = capsys.readouterr()
    code = exc.value.code
    return (0 if code is None else code), out, err


def test_cli_table(run_dir: Path, monkeypatch, capsys) -> None:
    code, out, _ = cli(monkeypatch, capsys, "sweep-threshold", str(run_dir))
    assert code == 0
    assert "recommended rho = " in out and "*" in out
    assert "0.5" in out and "1e-08" in out


def test_cli_json_and_csv(run_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    csv = tmp_path / "rows.csv"
    args = ["sweep-threshold", str(run_dir), "--json", "--csv", str(csv)]
    code, out, _ = cli(monkeypatch, capsys, *args, "--rho", "1e-4,1e-3", "--rho", "0.01")
    assert code == 0
    res = json.loads(out)
    assert [r["rho"] for r in res["rows"]] == [1e-4, 1e-3, 0.01]
    df = pd.read_csv(csv)
    assert list(df["rho"]) == [1e-4, 1e-3, 0.01]
    assert df["recommended"].sum() == 1
    assert df.loc[df["recommended"], "rho"].item() == res["recommended"]["rho"]


def test_cli_no_rho_satisfies(run_dir: Path, monkeypatch, capsys) -> None:
    code, out, _ = cli(monkeypatch, capsys, "sweep-threshold", str(run_dir), "--max-bias", "0")
    assert code == 0
    assert "no recommendation:" in out and "no rho keeps" in out
    code, out, _ = cli(
        monkeypatch, capsys, "sweep-threshold", str(run_dir), "--json", "--max-bias", "0"
    )
    assert json.loads(out)["recommended"]["rho"] is None


@pytest.fixture(scope="module")
def no_grid_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mismatch_cli.synthetic import synthetic_tables

    tokens, _ = synthetic_tables(num_sequences=4)
    tokens = tokens.drop(columns=["pruned_mass_minp", "pruned_mass_abs"])
    path = tmp_path_factory.mktemp("old") / "run"
    return write_run(path, tokens)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rho", "1.5"], "rho must be in (0, 1)"),
        (["--rho", "0"], "rho must be in (0, 1)"),
        (["--rho", "1"], "rho must be in (0, 1)"),
        (["--rho", "-0.1"], "rho must be in (0, 1)"),
        (["--rho", ""], "--rho needs at least one value"),
        (["--rho", " , "], "--rho needs at least one value"),
        (["--rho", "abc"], "not a number"),
        (["--rho", "3e-3"], "not on the run's pruning grid"),
        (["--max-bias", "-0.01"], "--max-bias must be >= 0"),
        (["--target-mismatch", "-1"], "--target-mismatch must be >= 0"),
        (["--rule", "top-p"], "unknown rule"),
        (["--csv", "/nonexistent-dir/x.csv"], "cannot write"),
    ],
)
def test_cli_bad_input(run_dir: Path, monkeypatch, capsys, args: list[str], message: str) -> None:
    code, out, err = cli(monkeypatch, capsys, "sweep-threshold", str(run_dir), *args)
    assert code != 0
    text = out + err
    assert "Traceback" not in text
    assert len(text.strip().splitlines()) == 1, text
    assert message in text


def test_cli_off_grid_message_names_the_grid(run_dir: Path, monkeypatch, capsys) -> None:
    _, _, err = cli(monkeypatch, capsys, "sweep-threshold", str(run_dir), "--rho", "3e-3")
    assert "1e-08, 2e-08, 5e-08" in err and "0.2, 0.5" in err


def test_cli_run_without_grid(no_grid_run: Path, monkeypatch, capsys) -> None:
    code, out, err = cli(monkeypatch, capsys, "sweep-threshold", str(no_grid_run))
    assert code != 0 and "Traceback" not in out + err
    assert len((out + err).strip().splitlines()) == 1
    assert "without the pruning grid" in err and "mismatch measure" in err
    assert "format_version >= 1" in err


def test_cli_missing_run(tmp_path: Path, monkeypatch, capsys) -> None:
    code, out, err = cli(monkeypatch, capsys, "sweep-threshold", str(tmp_path / "nope"))
    assert code != 0 and "Traceback" not in out + err and "not found" in err


def test_sweep_module_does_not_import_torch() -> None:
    code = "import sys, mismatch_cli.sweep; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- every row against a direct computation, one threshold at a time -----------------------


def direct_row(tokens: pd.DataFrame, rule: str, rho: float, g: int) -> dict:
    """A sweep row computed the plain way: the kept mask at rho, then each statistic."""
    p = tokens["p_train"].to_numpy(np.float32)
    pmax = tokens["p_max_train"].to_numpy(np.float32)
    delta = tokens["delta"].to_numpy()
    support = (p > 0) & tokens["kept_train"].to_numpy(bool)
    kept = support & sw.kept_mask(p, pmax, rho, rule)
    use = kept & np.isfinite(delta)
    d = delta[use]
    fin_abs = np.abs(np.where(np.isfinite(delta), delta, 0.0))
    mass = np.stack(tokens[sw.MASS_COLUMN[rule]].to_numpy())[:, g].astype(np.float64)
    df = pd.DataFrame({"s": tokens["seq_id"], "pruned": ~kept, "use": use,
                       "d": np.where(use, delta, 0.0), "m": mass})  # fmt: skip
    per = df.groupby("s").agg(pruned=("pruned", "any"), use=("use", "any"), d=("d", "sum"),
                              m=("m", "sum"))  # fmt: skip
    return {
        "pruned_tokens": int((~kept).sum()),
        "pruned_seq_frac": per["pruned"].mean(),
        "pruned_abs_delta_share": fin_abs[~kept].sum() / fin_abs.sum(),
        "kept_mean_abs_delta": np.abs(d).mean(),
        "kept_mean_delta": d.mean(),
        "kept_k3": np.mean(np.exp(-d) - 1 + d),
        "kept_seq_mean_abs_sum_delta": per.loc[per["use"], "d"].abs().mean(),
        "kept_p99_abs_delta": np.percentile(np.abs(d), 99),
        "kept_max_abs_delta": np.abs(d).max(),
        "kept_frac_ratio_outside_0.5_2": np.mean((np.exp(-d) < 0.5) | (np.exp(-d) > 2)),
        "mean_pruned_mass": mass.mean(),
        "max_pruned_mass": mass.max(),
        "seq_bias_bound_mean": per["m"].mean(),
        "seq_bias_bound_p95": np.percentile(per["m"], 95),
    }


@pytest.mark.parametrize("rule", ["min-p", "absolute"])
def test_rows_equal_a_direct_computation(run_dir: Path, rule: str) -> None:
    """The level-based table (one pass for all thresholds) against one mask per threshold,
    from the run (streamed in batches that split sequences) and from the table with its
    rows shuffled (not grouped by sequence)."""
    from mismatch_cli.runs import read_tokens

    tokens = read_tokens(run_dir)
    shuffled = tokens.sample(frac=1.0, random_state=0).reset_index(drop=True)
    for res in (sw.sweep(run_dir, rule=rule, batch_rows=37), sw.sweep(shuffled, rule=rule)):
        for g, row in enumerate(res["rows"]):
            want = direct_row(tokens, rule, row["rho"], g)
            for k, v in want.items():
                rel = 1e-5 if k == "seq_bias_bound_p95" else 1e-9  # float32 per-seq sums
                assert row[k] == pytest.approx(v, rel=rel, abs=1e-12), (row["rho"], k)
