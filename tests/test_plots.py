"""`mismatch plot`: every figure from one run and two overlaid, valid non-blank images of the
expected size, drawn data equal to `report`'s numbers, and every bad input as one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mismatch_cli import analysis as A
from mismatch_cli import plots as P

from .conftest import assert_one_line_error
from .conftest import cli_in_process as cli

DPI = 60  # small images keep the tests fast; one test checks the default 200 dpi


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from mismatch_cli.synthetic import write_synthetic_run

    base = tmp_path_factory.mktemp("plots")
    a = write_synthetic_run(base / "fp32", num_sequences=40, max_len=48, eps=0.1, seed=1)
    b = write_synthetic_run(base / "bf16", num_sequences=40, max_len=48, eps=0.03, seed=2)
    for run in (a, b):  # training steps, as imported runs carry them (the drift figure)
        tok = pd.read_parquet(run / "tokens.parquet")
        tok["step"] = (tok["seq_id"] // 10).astype(np.int64)
        tok.to_parquet(run / "tokens.parquet")
    return a, b


def assert_image(path: Path, size: tuple[int, int] | None = None) -> None:
    """A readable PNG of the expected size with real content (not blank)."""
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        if size is not None:
            assert abs(im.size[0] - size[0]) <= 1 and abs(im.size[1] - size[1]) <= 1, im.size
        px = np.asarray(im.convert("RGB"), dtype=np.int16)
    ink = (px < 235).any(axis=2).mean()  # share of non-white pixels
    assert ink > 0.02, f"{path.name} looks blank ({ink:.3%} ink)"
    assert len(np.unique(px.reshape(-1, 3), axis=0)) > 30
    assert px.std() > 10


def expected_size(name: str, runs: list[P.RunData], dpi: int) -> tuple[int, int]:
    fig = P.figure(name, runs)
    w, h = fig.get_size_inches()
    P.plt.close(fig)
    return round(w * dpi), round(h * dpi)


@pytest.mark.parametrize("name", P.DEFAULT_FIGURES)
def test_each_figure_one_run(two_runs: tuple[Path, Path], tmp_path: Path, name: str) -> None:
    if name == "sweep":
        pytest.importorskip("mismatch_cli.sweep")
    notes: list[str] = []
    files = P.make_figures([two_runs[0]], tmp_path, ["png"], figures=[name], dpi=DPI, notes=notes)
    assert notes == [] and files == [tmp_path / f"{name}.png"]
    runs = P.load_runs([two_runs[0]])
    assert_image(files[0], expected_size(name, runs, DPI))


@pytest.mark.parametrize("name", P.FIGURES)
def test_each_figure_two_runs_overlaid(
    two_runs: tuple[Path, Path], tmp_path: Path, name: str
) -> None:
    if name == "sweep":
        pytest.importorskip("mismatch_cli.sweep")
    files = P.make_figures(
        list(two_runs), tmp_path, ["png"], ["float32", "bfloat16"], figures=[name], dpi=DPI
    )
    runs = P.load_runs(list(two_runs), ["float32", "bfloat16"])
    assert_image(files[0], expected_size(name, runs, DPI))
    fig = P.figure(name, runs)
    artists = [a for ax in fig.axes for a in (*ax.get_lines(), *ax.patches)]
    gids = {a.get_gid() for a in artists if a.get_gid()}
    P.plt.close(fig)
    assert any(g.endswith(":float32") for g in gids) and any(g.endswith(":bfloat16") for g in gids)


def test_default_dpi_and_other_formats(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    files = P.make_figures([two_runs[0]], tmp_path, ["png", "pdf", "svg"], figures=["bound"])
    assert [f.name for f in files] == ["bound.png", "bound.pdf", "bound.svg"]
    runs = P.load_runs([two_runs[0]])
    assert_image(files[0], expected_size("bound", runs, P.DEFAULT_DPI))
    assert (tmp_path / "bound.pdf").read_bytes()[:5] == b"%PDF-"
    assert "<svg" in (tmp_path / "bound.svg").read_text()[:2000]


def test_bound_and_bias_data_equal_the_report(two_runs: tuple[Path, Path]) -> None:
    runs = P.load_runs(list(two_runs), ["a", "b"])
    for r, path in zip(runs, two_runs, strict=True):
        rep = pd.DataFrame(A.analyze(path)["buckets"])  # what `report --json` prints
        nonempty = rep["count"] > 0
        fig = P.figure("bound", runs)
        drawn = nonempty & (rep["mean_one_minus_p"] > 0) & (rep["mean_abs_delta"] > 0)
        np.testing.assert_allclose(
            P.plotted(fig, f"bucket-mean:{r.label}"), rep["mean_abs_delta"][drawn], rtol=1e-12
        )
        np.testing.assert_allclose(
            P.plotted(fig, f"bucket-p99:{r.label}"), rep["p99_abs_delta"][drawn], rtol=1e-12
        )
        P.plt.close(fig)
        fig = P.figure("bias", runs)
        np.testing.assert_allclose(
            P.plotted(fig, f"bias-mean:{r.label}"), rep["mean_delta"][nonempty], rtol=1e-12
        )
        P.plt.close(fig)


def test_envelope_drawn_at_the_estimated_eps(two_runs: tuple[Path, Path]) -> None:
    runs = P.load_runs([two_runs[0]])
    fig = P.figure("bound", runs)
    line = next(
        ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid() == "envelope-exact:fp32"
    )
    x, y = line.get_xdata(), line.get_ydata()
    eps = A.analyze(two_runs[0])["eps"]
    np.testing.assert_allclose(y, np.log1p(x * np.expm1(2 * eps)))
    P.plt.close(fig)


def test_empty_buckets_are_skipped_not_zero(two_runs: tuple[Path, Path]) -> None:
    edges = (0.0, 0.5, 0.9999999, 1.0)  # the last bucket holds no synthetic token
    runs = P.load_runs([two_runs[0]], edges=edges)
    assert runs[0].buckets["count"].iloc[-1] == 0
    fig = P.figure("bias", runs)
    means = P.plotted(fig, "bias-mean:fp32")
    P.plt.close(fig)
    assert means.size == 2 and np.all(means != 0)


def test_cumulative_by_position_matches_a_direct_computation(two_runs: tuple[Path, Path]) -> None:
    r = P.load_runs([two_runs[0]])[0]
    c = P.cumulative_by_position(r)
    df = pd.read_parquet(two_runs[0] / "tokens.parquet", columns=["seq_id", "pos", "delta"])
    df = df.sort_values(["seq_id", "pos"])
    df["cum"] = df.groupby("seq_id")["delta"].cumsum()
    at3 = df[df["pos"] == 3]["cum"]
    row = c[c["pos"] == 3].iloc[0]
    assert row["n"] == len(at3) and row["mean"] == pytest.approx(at3.mean())
    assert row["se"] == pytest.approx(at3.std(ddof=1) / np.sqrt(len(at3)))


def test_sweep_figure_marks_the_recommendation(two_runs: tuple[Path, Path]) -> None:
    S = pytest.importorskip("mismatch_cli.sweep")
    runs = P.load_runs([two_runs[0]])
    sw = S.sweep(two_runs[0])
    fig = P.figure("sweep", runs)
    y = P.plotted(fig, "sweep-kept_mean_abs_delta:fp32")
    np.testing.assert_allclose(y, [row["kept_mean_abs_delta"] for row in sw["rows"]])
    stars = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_marker() == "*"]
    assert len(stars) == (2 if sw["recommended"]["rho"] is not None else 0)
    P.plt.close(fig)


def test_run_without_pruning_grid_skips_only_the_sweep(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 400
    p = rng.uniform(0.001, 1, n)
    d = 0.1 * (1 - p) * rng.uniform(-1, 1, n)
    run = tmp_path / "nogrid"
    run.mkdir()
    pd.DataFrame(
        {
            "seq_id": np.repeat(np.arange(20), 20),
            "pos": np.tile(np.arange(20), 20),
            "delta": d,
            "p_train": p,
            "p_infer": p * np.exp(d),
            "eps_hat": np.full(n, 0.05),
            "kept_train": True,
        }
    ).to_parquet(run / "tokens.parquet")
    (run / "run.json").write_text(json.dumps({"status": "complete", "config": {}}))
    notes: list[str] = []
    files = P.make_figures([run], tmp_path / "out", dpi=DPI, notes=notes)
    assert {f.stem for f in files} == {"bound", "bias", "sequence", "distribution", "corrections"}
    assert len(notes) == 1 and notes[0].startswith("sweep: skipped")  # drift does not apply:
    # a measured run has no steps, so the default set leaves it out without a note
    notes = []
    P.make_figures([run], tmp_path / "out", figures=["drift"], dpi=DPI, notes=notes)
    assert len(notes) == 1 and notes[0].startswith("drift: skipped (no step column")


# ----------------------------------------------------------------------------- CLI


def test_cli_plot_two_runs_with_table(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "figs"
    proc = cli(
        "plot",
        *map(str, two_runs),
        "--out",
        str(out),
        "--label",
        "a",
        "--label",
        "b",
        "--figure",
        "bias",
        "--format",
        "svg",
        "--show-table",
        "--dpi",
        "60",
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "bias.svg").is_file() and not (out / "bound.svg").exists()
    assert proc.stdout.count("verdict") == 2


def test_cli_bad_inputs(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    run = str(two_runs[0])
    assert_one_line_error(cli("plot"), "no runs given")
    assert_one_line_error(cli("plot", str(tmp_path / "nope"), "--out", str(tmp_path)), "not found")
    assert_one_line_error(
        cli("plot", str(tmp_path), "--out", str(tmp_path / "o")), "not a mismatch run"
    )
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(cli("plot", run, "--out", str(blocker / "sub")), "cannot write")
    assert_one_line_error(cli("plot", run, "--out", str(tmp_path), "--format", "gif"), "--format")
    assert_one_line_error(cli("plot", run, run, "--out", str(tmp_path), "--label", "x"), "--label")
    assert_one_line_error(cli("plot", run, "--out", str(tmp_path), "--figure", "pie"), "figure")
    assert_one_line_error(cli("plot", run, "--edges", "1,0"), "--edges")


def test_skipped_figures_are_named_with_the_reason(tmp_path: Path) -> None:
    """measure and demo end with draw_figures: a figure that cannot be drawn gets one line."""
    import io

    from rich.console import Console

    from mismatch_cli.commands.common import draw_figures
    from mismatch_cli.runs import write_run
    from mismatch_cli.synthetic import synthetic_meta, synthetic_tables

    tokens, seqs = synthetic_tables(num_sequences=1, max_len=1, seed=1)
    tokens = tokens.drop(columns=["pruned_mass_minp", "pruned_mass_abs"])
    run = write_run(tmp_path / "tiny", tokens, seqs, synthetic_meta())
    buf = io.StringIO()
    files = draw_figures(run, Console(file=buf, width=300))
    out = buf.getvalue()
    assert "note: figure sweep: skipped" in out and "pruning grid" in out
    assert "note: figure sequence: skipped (too few sequences" in out
    assert {f.stem for f in files} == {"bound", "bias", "distribution", "corrections"}


def test_drift_axes_draw_a_flat_series_flat() -> None:
    """A series that moves by 0.4% is not stretched over the whole panel; an all-zero share
    keeps 0 at the bottom."""
    import matplotlib.pyplot as plt

    from mismatch_cli.plots.drift import _at_least

    fig, ax = plt.subplots()
    _at_least(ax, np.array([0.00881, 0.00881, 0.008781]))
    lo, hi = ax.get_ylim()
    assert lo < 0.008781 and hi > 0.00881 and hi - lo >= 0.2 * 0.00881
    _at_least(ax, np.zeros(3))
    assert ax.get_ylim() == (-0.0005, 0.01)
    plt.close(fig)
