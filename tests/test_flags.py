"""Flags out of range on the commands added since the first bad-input pass (rescore,
compare, corrections `--set` / `--rho` / `--edges`, report `--tail` / `--edges` /
`--group-by`, diagnose `--variants`): one line naming the flag, exit 2, before any model
loads or any table is read. Typer's own checks (a choice, a type, min=, a missing or unknown
option) are one line too (`cli.main`), not a boxed panel."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from mismatch_cli.cli import app
from mismatch_cli.correction_rules import parse_sets
from mismatch_cli.diagnose import DEFAULT_VARIANTS, VARIANT_NAMES, parse_variants
from mismatch_cli.errors import MismatchError
from mismatch_cli.synthetic import write_synthetic_run

from .conftest import assert_one_line_error
from .conftest import run_cli as cli

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_run(tmp_path_factory.mktemp("flags") / "run", num_sequences=8)


def bad_flags(run: Path, out: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    r = str(run)
    return {
        # report
        "report --tail 0": (["report", r, "--tail", "0"], ("--tail",)),
        "report --tail 1.5": (["report", r, "--tail", "1.5"], ("--tail",)),
        "report --tail nan": (["report", r, "--tail", "nan"], ("--tail",)),
        "report --edges out of [0, 1]": (["report", r, "--edges", "0,2"], ("--edges", "[0, 1]")),
        "report --edges not increasing": (
            ["report", r, "--edges", "0,0.5,0.5,1"], ("--edges", "increasing")),
        "report --edges one value": (["report", r, "--edges", "0.5"], ("--edges",)),
        "report --group-by unknown": (["report", r, "--group-by", "foo"], ("--group-by",)),
        "report --group-by a field the run lacks": (
            ["report", r, "--group-by", "step"], ("no step column",)),
        "report --eps nan": (["report", r, "--eps", "nan"], ("--eps",)),
        # compare
        "compare one run": (["compare", r], ("two or more runs",)),
        "compare --edges": (["compare", r, r, "--edges", "0,x,1"], ("--edges",)),
        "compare --label count": (["compare", r, r, "--label", "a"], ("--label",)),
        # corrections
        "corrections --set no '='": (["corrections", r, "--set", "icepop.lo"], ("NAME.KEY=VALUE",)),
        "corrections --set empty": (["corrections", r, "--set", ""], ("--set", "empty")),
        "corrections --set unknown method": (
            ["corrections", r, "--set", "foo.C=3"], ("unknown method 'foo'",)),
        "corrections --set unknown key": (
            ["corrections", r, "--set", "tis-token.zz=1"], ("no parameter 'zz'",)),
        "corrections --set not a number": (
            ["corrections", r, "--set", "icepop.lo=abc"], ("not a number",)),
        "corrections --set out of range": (
            ["corrections", r, "--set", "tis-token.C=0"], ("tis-token.C", "> 0")),
        "corrections --set nan": (["corrections", r, "--set", "icepop.lo=nan"], ("icepop.lo",)),
        "corrections --set lo > hi": (
            ["corrections", r, "--set", "icepop.lo=0.8,icepop.hi=0.5"], ("icepop.lo", "<=")),
        "corrections --set twice": (
            ["corrections", r, "--set", "tis-token.C=3", "--set", "tis-token.C=4"],
            ("tis-token.C", "twice")),
        "corrections --set a method not selected": (
            ["corrections", r, "--method", "icepop", "--set", "tis-token.C=3"],
            ("--method does not select",)),
        "corrections --rho out of (0, 1)": (["corrections", r, "--rho", "1"], ("--rho", "(0, 1)")),
        "corrections --rho off the grid": (["corrections", r, "--rho", "0.123"], ("grid",)),
        "corrections --rho without a DVP row": (
            ["corrections", r, "--method", "icepop", "--rho", "0.01"], ("--rho", "DVP")),
        "corrections --method unknown": (["corrections", r, "--method", "foo"], ("unknown method",)),
        "corrections --method empty": (["corrections", r, "--method", ","], ("--method",)),
        "corrections --edges": (["corrections", r, "--edges", "1,0"], ("--edges",)),
        # rescore (refused before the model loads or --out is touched)
        "rescore --rescore-batch-tokens 0": (
            ["rescore", r, "--out", str(out), "--rescore-batch-tokens", "0"],
            ("--rescore-batch-tokens",)),
        "rescore --rescore-memory": (
            ["rescore", r, "--out", str(out), "--rescore-memory", "-5GiB"], ("--rescore-memory",)),
        "rescore --train-dtype": (
            ["rescore", r, "--out", str(out), "--train-dtype", "float8"], ("--train-dtype",)),
        "rescore --infer-dtype with decode": (
            ["rescore", r, "--out", str(out), "--infer-dtype", "float32"], ("--infer-dtype",)),
        "rescore --attn-implementation": (
            ["rescore", r, "--out", str(out), "--attn-implementation", "nope"],
            ("--attn-implementation", "eager")),
        # diagnose --variants (before anything generates)
        "diagnose --variants unknown": (
            ["diagnose", "--variants", "fp8", "--out", str(out)], ("unknown variant 'fp8'",)),
        "diagnose --variants empty": (
            ["diagnose", "--variants", ",", "--out", str(out)], ("--variants", "no variant")),
        "diagnose --variants twice": (
            ["diagnose", "--variants", "null,null", "--out", str(out)], ("null", "twice")),
        "diagnose --variants all and more": (
            ["diagnose", "--variants", "all,null", "--out", str(out)], ("all",)),
    }  # fmt: skip


def test_bad_flags_are_one_line(run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """In process (each is a MismatchError, which `cli.main` prints as one line)."""
    import json

    f = run / "run.json"  # rescore's checks run on a run with a model to load
    meta = json.loads(f.read_text())
    meta["model"]["path"] = str(tiny_model_dir)
    f.write_text(json.dumps(meta))
    out = tmp_path / "out"
    for name, (args, words) in bad_flags(run, out).items():
        r = runner.invoke(app, args)
        e = r.exception
        assert isinstance(e, MismatchError), (name, r.output, e)
        msg = str(e)
        assert "\n" not in msg, (name, msg)
        for w in words:
            assert w in msg, (name, msg)
        assert not out.exists(), name


def test_typer_usage_errors_are_one_line(run: Path, tmp_path: Path) -> None:
    """A choice, a number, min=, a missing argument, an unknown option or command: one line
    naming the flag and the command's --help, exit 2 (Typer's panel is several lines)."""
    r = str(run)
    for args, words in (
        (["rescore", r, "--out", str(tmp_path / "o"), "--infer-side", "foo"], ("--infer-side",)),
        (["report", r, "--by", "foo"], ("--by",)),
        (["report", r, "--tail", "abc"], ("--tail",)),
        (["import", "tokens", r, "--rescore-batch-tokens", "0"], ("--rescore-batch-tokens",)),
        (["report"], ("Missing argument",)),
        (["sweep-threshold", r, "--edges", "0,1"], ("No such option: --edges",)),
        (["nosuchcommand"], ("No such command",)),
    ):
        proc = cli(*args)
        assert_one_line_error(proc, *words, "--help")
        assert proc.returncode == 2
    proc = cli("report", "--help")
    assert proc.returncode == 0 and "Usage" in proc.stdout
    proc = cli()
    assert proc.returncode == 2 and "Usage" in proc.stdout  # `mismatch` alone: the help


def test_parsers() -> None:
    assert parse_variants("null") == ["baseline", "null"]
    # all: the whole matrix (what cannot run here is skipped); none given: the default set
    assert parse_variants("all") == list(VARIANT_NAMES)
    assert parse_variants(None) == list(DEFAULT_VARIANTS)
    assert set(DEFAULT_VARIANTS) < set(VARIANT_NAMES)
    for spec in ("", ",", " , ", "null,null", "all,null"):
        with pytest.raises(MismatchError):
            parse_variants(spec)
    assert parse_sets(["tis-token.C=3", "tis-token.C=3"]) == {"tis-token": {"C": 3.0}}
    with pytest.raises(MismatchError, match="twice"):
        parse_sets(["icepop.lo=0.5,icepop.lo=0.6"])
