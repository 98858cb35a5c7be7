"""`mismatch report`: tables, --json, --csv, options, and every bad input as one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from mismatch_cli import aggregates as G
from mismatch_cli import analysis as A
from mismatch_cli.cli import app
from mismatch_cli.render import print_report

from .conftest import assert_one_line_error
from .conftest import cli_in_process as cli

runner = CliRunner()


def token_table(n_seq: int = 40, seed: int = 0) -> pd.DataFrame:
    """A token table with the (1 - p) shape and one infinite delta, built with numpy."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 30, n_seq)
    N = int(lengths.sum())
    p = np.exp(-rng.exponential(1.0, N) * rng.choice([0.1, 3.0], N))
    delta = 0.2 * (1 - p) * rng.uniform(-1, 1, N) + 0.01 * (1 - p)
    kept = np.ones(N, bool)
    kept[7] = False
    delta[7] = np.inf
    return pd.DataFrame(
        {
            "seq_id": np.repeat(np.arange(n_seq), lengths),
            "pos": np.concatenate([np.arange(n) for n in lengths]),
            "delta": delta,
            "p_train": np.where(kept, p, 0.0),
            "p_infer": np.minimum(p * np.exp(np.where(kept, delta, 0)), 1),
            "eps_hat": rng.uniform(0.05, 0.1, N),
            "kept_train": kept,
        }
    )


def write_run(path: Path, df: pd.DataFrame | None, status: str = "complete") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "status": status,
        "model": {"name": "tiny-model"},
        "config": {
            "infer_engine": "vllm",
            "infer_dtype": "bfloat16",
            "train_dtype": "float32",
            "temperature": 1.0,
            "top_p": 0.9,
            "top_k": -1,
            "min_p": 0.0,
        },
    }
    (path / "run.json").write_text(json.dumps(meta))
    if df is not None:
        df.to_parquet(path / "tokens.parquet")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_run(tmp_path_factory.mktemp("rep") / "run", token_table())


# ----------------------------------------------------------------------------- output


def test_report_tables(run: Path) -> None:
    r = runner.invoke(app, ["report", str(run)], env={"COLUMNS": "160"})
    assert r.exit_code == 0, r.output
    for text in (
        "Mismatch by p_train bucket",
        "|delta| by p_train bucket",
        "(1 - p) bound",
        "Tail bias",
        "Accumulation",
        "Metrics RL frameworks log",
        "verdict",
        "tiny-model",
        "vllm bfloat16 vs transformers float32",
        "infinite delta",
    ):
        assert text in r.output, text


def test_report_json_matches_the_api(run: Path) -> None:
    r = runner.invoke(app, ["report", str(run), "--json"])
    assert r.exit_code == 0, r.output

    def no_nan(x: str) -> None:
        raise AssertionError(f"non-strict JSON constant {x}")

    data = json.loads(r.stdout, parse_constant=no_nan)
    api = A.analyze(run)
    assert data["buckets"] == api["buckets"] and data["metrics"] == api["metrics"]
    assert data["num_infinite"] == 1 and data["num_tokens"] == len(token_table())
    assert len(data["buckets"]) == len(G.DEFAULT_EDGES) - 1
    r = runner.invoke(app, ["report", str(run), "--json", "--edges", "0,0.5,0.9999999,1"])
    empty = json.loads(r.stdout, parse_constant=no_nan)["buckets"][2]
    assert empty["count"] == 0 and empty["mean_abs_delta"] is None  # null, never 0


def test_report_options(run: Path) -> None:
    r = runner.invoke(
        app,
        [
            "report",
            str(run),
            "--json",
            "--edges",
            "0,0.5,1",
            "--by",
            "infer",
            "--tail",
            "0.3",
            "--eps",
            "0.2",
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [b["lo"] for b in data["buckets"]] == [0.0, 0.5]
    assert data["by"] == "infer" and data["tail"]["threshold"] == 0.3
    assert data["eps"] == 0.2 and data["eps_estimator"] == "--eps"
    df = token_table()
    fin = df[df["kept_train"]]
    assert data["buckets"][1]["count"] == int((fin["p_infer"] >= 0.5).sum())
    r = runner.invoke(app, ["report", str(run), "--by", "infer"], env={"COLUMNS": "160"})
    assert "Mismatch by p_infer bucket" in r.output


def test_report_csv(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "csv"
    r = runner.invoke(app, ["report", str(run), "--csv", str(out), "--json"])
    assert r.exit_code == 0, r.output
    names = {p.name for p in out.iterdir()}
    assert names >= {"buckets.csv", "bound.csv", "tail.csv", "metrics.csv", "length_bins.csv"}
    b = pd.read_csv(out / "buckets.csv")
    data = json.loads(r.stdout)
    assert len(b) == len(data["buckets"])
    np.testing.assert_allclose(
        b["mean_delta"].to_numpy(dtype=float),
        [np.nan if x["mean_delta"] is None else x["mean_delta"] for x in data["buckets"]],
    )
    m = pd.read_csv(out / "metrics.csv").set_index("name")["value"]
    assert m["k3"] == pytest.approx(data["metrics"]["k3"])


def test_print_report_api(run: Path) -> None:
    con = Console(record=True, width=120)
    print_report(A.analyze(run), con)
    text = con.export_text()
    assert "verdict" in text and "k3" in text


def test_help_states_conventions() -> None:
    r = runner.invoke(app, ["report", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert "logp_infer - logp_train" in r.output and "p_train" in r.output


# ----------------------------------------------------------------------------- bad input


def test_not_a_run(tmp_path: Path) -> None:
    assert_one_line_error(cli("report", str(tmp_path / "missing")), "not found")
    (tmp_path / "file.txt").write_text("x")
    assert_one_line_error(cli("report", str(tmp_path / "file.txt")), "not a run directory")
    assert_one_line_error(cli("report", str(tmp_path)), "not a mismatch run")


def test_missing_column(tmp_path: Path) -> None:
    run = write_run(tmp_path / "r", token_table().drop(columns=["eps_hat"]))
    assert_one_line_error(cli("report", str(run)), "eps_hat")


def test_incomplete_run_without_tokens(tmp_path: Path) -> None:
    run = write_run(tmp_path / "r", None, status="incomplete")
    assert_one_line_error(cli("report", str(run)), "tokens.parquet", "incomplete")


def test_incomplete_run_with_tokens_is_refused(tmp_path: Path) -> None:
    """Nothing half-written passes for complete: the report of an incomplete run is refused
    (the library can still read one, with a warning: `analyze(..., complete=False)`)."""
    run = write_run(tmp_path / "r", token_table(), status="incomplete")
    assert_one_line_error(cli("report", str(run)), "not complete", "run.json", "incomplete")
    src = A.report_tokens(run, complete=False)
    assert len(src.warnings) == 1 and "incomplete" in src.warnings[0]


def test_empty_run(tmp_path: Path) -> None:
    run = write_run(tmp_path / "r", token_table().iloc[:0])
    assert_one_line_error(cli("report", str(run)), "no tokens")


@pytest.mark.parametrize(
    ("edges", "word"),
    [("0.5,0.1,1", "increasing"), ("0,0.5,2", "[0, 1]"), ("0,x,1", "comma-separated")],
)
def test_bad_edges(run: Path, edges: str, word: str) -> None:
    assert_one_line_error(cli("report", str(run), "--edges", edges), "--edges", word)


def test_bad_tail_and_eps(run: Path) -> None:
    assert_one_line_error(cli("report", str(run), "--tail", "0"), "--tail")
    assert_one_line_error(cli("report", str(run), "--eps", "-1"), "--eps")


def test_unwritable_csv_dir(run: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert_one_line_error(cli("report", str(run), "--csv", str(blocker / "sub")), "cannot write")
