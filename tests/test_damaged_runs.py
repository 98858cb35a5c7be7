"""Damaged run directories, as a user's broken runs come in: a truncated table, a run.json
that is not JSON, not an object or lacks keys (or holds the wrong types), an incomplete run
with and without tables, a run whose model folder is gone. Every command that reads runs
refuses in one line that names the file and what is wrong (never a traceback, never a
number computed from half a run)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mismatch_cli.cli import app
from mismatch_cli.errors import MismatchError
from mismatch_cli.synthetic import write_synthetic_run

from .conftest import assert_one_line_error
from .conftest import cli_in_process as cli

runner = CliRunner()


def _meta(run: Path, change: Callable[[dict], object]) -> None:
    """Change run.json in place (`change` mutates the dict; what it returns is ignored)."""
    f = run / "run.json"
    m = json.loads(f.read_text())
    change(m)
    f.write_text(json.dumps(m))


def _truncate(name: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        b = (run / name).read_bytes()
        (run / name).write_bytes(b[: len(b) // 2])

    return damage


def _incomplete(tables: bool) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        _meta(run, lambda m: m.update(status="incomplete"))
        if not tables:
            (run / "tokens.parquet").unlink()
            (run / "sequences.parquet").unlink()

    return damage


# damage -> (how, words the one line must hold besides the file's path)
DAMAGES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "truncated tokens.parquet": (_truncate("tokens.parquet"), ("tokens.parquet", "truncated")),
    "empty tokens.parquet": (
        lambda r: (r / "tokens.parquet").write_bytes(b""),
        ("tokens.parquet", "cannot be read"),
    ),
    "truncated sequences.parquet": (
        _truncate("sequences.parquet"),
        ("sequences.parquet", "truncated"),
    ),
    "run.json not JSON": (
        lambda r: (r / "run.json").write_text('{"status": "compl'),
        ("run.json", "not valid JSON"),
    ),
    "run.json not an object": (
        lambda r: (r / "run.json").write_text("[1, 2]"),
        ("run.json", "not an object"),
    ),
    "run.json lacks status": (
        lambda r: _meta(r, lambda m: m.pop("status")),
        ("run.json", "'status'"),
    ),
    "run.json status not a string": (
        lambda r: _meta(r, lambda m: m.update(status=5)),
        ("run.json", "'status'", "not a string"),
    ),
    "run.json summary not an object": (
        lambda r: _meta(r, lambda m: m.update(summary="x")),
        ("run.json", "'summary'", "not an object"),
    ),
    "run.json bad rho_grid": (
        lambda r: _meta(r, lambda m: m.update(rho_grid="abc")),
        ("run.json", "'rho_grid'"),
    ),
    "incomplete with tables": (_incomplete(True), ("not complete", "run.json", "'incomplete'")),
    "incomplete without tables": (_incomplete(False), ("not complete", "tokens.parquet")),
    "complete without tokens.parquet": (
        lambda r: (r / "tokens.parquet").unlink(),
        ("tokens.parquet", "damaged"),
    ),
}


def commands(run: Path, good: Path, tmp: Path) -> dict[str, list[str]]:
    """Every command that reads a run, with `run` in the place it reads."""
    return {
        "report": ["report", str(run)],
        "plot": ["plot", str(run), "--out", str(tmp / "fig")],
        "sweep-threshold": ["sweep-threshold", str(run)],
        "corrections": ["corrections", str(run)],
        "compare (reference)": ["compare", str(run), str(good)],
        "compare (other)": ["compare", str(good), str(run)],
        "rescore": ["rescore", str(run), "--out", str(tmp / "new")],
        "diagnose --run": ["diagnose", "--run", str(run), "--out", str(tmp / "diag")],
    }


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A complete run that looks like a `measure` baseline of the tiny model."""
    run = write_synthetic_run(tmp_path_factory.mktemp("good") / "good", num_sequences=12)

    def as_measure(m: dict) -> None:
        m["command"] = "measure"
        m["model"] = {"name": "tiny", "path": str(tiny_model_dir), "weights_sha256": None}
        m["config"].update(model=str(tiny_model_dir), infer_engine="vllm",
                           infer_dtype="bfloat16", train_dtype="float32",
                           attn_implementation="eager")  # fmt: skip

    _meta(run, as_measure)
    return run


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_every_reader_refuses_a_damaged_run(damage: str, good: Path, tmp_path: Path) -> None:
    how, words = DAMAGES[damage]
    run = tmp_path / "run"
    shutil.copytree(good, run)
    how(run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for name, args in commands(run, good, tmp_path).items():
        r = runner.invoke(app, args)
        e = r.exception
        assert isinstance(e, MismatchError), (damage, name, r.output, e)
        msg = str(e)
        assert "\n" not in msg and str(run) in msg, (damage, name, msg)
        for w in words:
            assert w in msg, (damage, name, msg)
        for out in ("fig", "new", "diag"):
            assert not (tmp_path / out).exists(), (damage, name, out)
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert after == before  # reading a damaged run changes nothing of it


def test_a_run_whose_model_folder_is_gone(good: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """rescore and diagnose --run name the path and how to give the model's new place; the
    analysis commands, which need no model, still read the run."""
    run = tmp_path / "run"
    shutil.copytree(good, run)
    gone = tmp_path / "moved-away" / "tiny"
    _meta(run, lambda m: (m["model"].update(path=str(gone)), m["config"].update(model=str(gone))))
    for args, how in (
        (["rescore", str(run), "--out", str(tmp_path / "new")], "--model PATH"),
        (["diagnose", "--run", str(run), "--out", str(tmp_path / "diag")], "MODEL"),
    ):
        proc = cli(*args)
        assert_one_line_error(proc, "model folder", "is gone", str(gone), "run.json", how)
        assert not (tmp_path / "new").exists() and not (tmp_path / "diag").exists()
    assert runner.invoke(app, ["report", str(run)]).exit_code == 0


def test_rescore_with_the_model_moved(good: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """--model PATH loads the model from where it is now (recorded in the new run)."""
    run = tmp_path / "run"
    shutil.copytree(good, run)
    gone = tmp_path / "moved-away" / "tiny"
    _meta(run, lambda m: m["model"].update(path=str(gone)))
    proc = cli("rescore", str(run), "--out", str(tmp_path / "new"), "--model",
               str(tiny_model_dir), "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "new" / "run.json").read_text())
    assert meta["status"] == "complete" and meta["model"]["path"] == str(tiny_model_dir)
    assert meta["rescored_from"]["changed"]["model_path"] == [str(gone), str(tiny_model_dir)]


def test_damaged_runs_through_the_cli(good: Path, tmp_path: Path) -> None:
    """As a user sees it: one line, exit 2, no traceback (a few of the cases above)."""
    for damage in ("truncated tokens.parquet", "run.json not JSON", "incomplete with tables"):
        run = tmp_path / damage.replace(" ", "_")
        shutil.copytree(good, run)
        DAMAGES[damage][0](run)
        for args in (["report", str(run)], ["rescore", str(run), "--out", str(tmp_path / "n")]):
            proc = cli(*args)
            assert_one_line_error(proc, str(run))
            assert proc.returncode == 2
