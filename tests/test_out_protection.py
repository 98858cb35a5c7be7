"""`--out` never destroys what exists: import, rescore and diagnose refuse an `--out` that is
their input (the input run, the dump's file or folder), holds it or lies inside it, and any
existing run unless `--overwrite`; even then the new run is written beside the old one and
renamed into place when complete, so the old run survives a failure or Ctrl-C."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mismatch_cli.config import MeasureConfig
from mismatch_cli.diagnose import DIAGNOSE_JSON, run_diagnose
from mismatch_cli.errors import MismatchError
from mismatch_cli.importers.ingest import ImportOptions, run_import
from mismatch_cli.pipeline import Progress
from mismatch_cli.rescore_run import RescoreOptions, rescore_run
from mismatch_cli.runs import replacing
from mismatch_cli.synthetic import write_synthetic_run

from . import import_fixtures as F
from .conftest import assert_one_line_error
from .conftest import cli_in_process as cli
from .test_rescore_run import make_run


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` (relative name -> bytes): what must survive unchanged."""
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def leftovers(parent: Path) -> list[str]:
    """Temporary directories `runs.replacing` may have left beside its target."""
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


class _Interrupt(Progress):
    """A progress callback that raises `error` (Ctrl-C by default) when `when` appears in a
    phase that starts or a line that is logged: a failure half-way through the writing."""

    def __init__(self, when: str, error: BaseException | None = None) -> None:
        self.when, self.error = when, error or KeyboardInterrupt()

    def start(self, phase: str, total: int, done: int = 0) -> None:
        if self.when in phase:
            raise self.error

    def log(self, message: str) -> None:
        if self.when in message:
            raise self.error


# ----------------------------------------------------------------------------- the helper


def test_replacing_keeps_the_old_directory_until_the_new_one_is_complete(tmp_path: Path) -> None:
    out = write_synthetic_run(tmp_path / "run", num_sequences=4)
    before = snapshot(out)
    for exc in (MismatchError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with replacing(out, overwrite=True) as work:
                assert work.parent == out.parent and work != out
                (work / "run.json").write_text("{}")
                raise exc
        assert snapshot(out) == before and leftovers(tmp_path) == []
    with replacing(out, overwrite=True) as work:
        (work / "run.json").write_text('{"status": "complete"}')
        assert snapshot(out) == before  # still the old one while the new one is written
    assert snapshot(out) == {"run.json": b'{"status": "complete"}'}
    assert leftovers(tmp_path) == []
    with pytest.raises(MismatchError, match="--overwrite"):
        with replacing(out) as work:
            raise AssertionError("never reached")


# ----------------------------------------------------------------------------- import


def test_import_out_is_never_the_dump(tmp_path: Path) -> None:
    known = F.known_run(num_sequences=6, max_len=8)
    dump = F.write_tokens_jsonl(known, tmp_path / "dump" / "t.jsonl")
    folder = dump.parent
    run_in_dump = F.write_tokens_jsonl(known, tmp_path / "runA" / "export.jsonl")
    write_synthetic_run(tmp_path / "runA", num_sequences=4)  # a run holding its own dump
    kept = {p: snapshot(p) for p in (folder, tmp_path / "runA")}
    cases = {
        "the dump's file": (str(dump), dump, ("is the dump's file",)),
        "the dump's folder": (str(folder), folder, ("is the dump's folder",)),
        "inside the dump's folder": (str(folder), folder / "run", ("inside the dump's folder",)),
        "a run holding the dump": (str(run_in_dump), tmp_path / "runA", ("holds the dump's file",)),
    }
    for name, (src, out, words) in cases.items():
        for flags in ([], ["--overwrite"]):
            proc = cli("import", "tokens", src, "--out", str(out), *flags)
            try:
                assert_one_line_error(proc, "--out", *words)
            except AssertionError as e:
                raise AssertionError(f"{name} {flags}: {proc.stderr}") from e
    for p, snap in kept.items():
        assert snapshot(p) == snap
    assert not (folder / "run").exists() and leftovers(tmp_path) == []


def test_import_overwrite_replaces_only_when_complete(tmp_path: Path) -> None:
    known = F.known_run(num_sequences=6, max_len=8)
    dump = F.write_tokens_jsonl(known, tmp_path / "dump" / "t.jsonl")
    out = write_synthetic_run(tmp_path / "runs" / "old", num_sequences=4)
    before = snapshot(out)
    # refused without --overwrite, and a folder that is not a run is never replaced
    assert_one_line_error(cli("import", "tokens", str(dump), "--out", str(out)),
                          "holds a complete run", "--overwrite")  # fmt: skip
    other = tmp_path / "runs" / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert_one_line_error(cli("import", "tokens", str(dump), "--out", str(other), "--overwrite"),
                          "not a run", "never deleted")  # fmt: skip
    assert (other / "notes.txt").read_text() == "mine"
    # a failure half-way (the second file is damaged) and Ctrl-C leave the old run as it was
    bad = tmp_path / "dump2"
    F.write_tokens_jsonl(known, bad / "a.jsonl")
    (bad / "b.jsonl").write_text('{"prompt_token_ids": [1], "respo')
    with pytest.raises(MismatchError, match=r"b\.jsonl"):
        run_import(ImportOptions("tokens", [str(bad)], out, overwrite=True))
    assert snapshot(out) == before
    with pytest.raises(KeyboardInterrupt):
        run_import(ImportOptions("tokens", [str(bad)], out, overwrite=True), _Interrupt("read"))
    assert snapshot(out) == before and leftovers(out.parent) == []
    # with --overwrite and a good dump: the new run, complete, in place of the old one
    res = run_import(ImportOptions("tokens", [str(dump)], out, overwrite=True))
    assert res["run"] == str(out)
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "complete" and meta["command"] == "import"
    assert leftovers(out.parent) == []


# ----------------------------------------------------------------------------- rescore


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("prot") / "run", tiny_model_dir)


def test_rescore_out_is_never_the_input_run(tiny_run: Path, tmp_path: Path) -> None:
    before = snapshot(tiny_run)
    for out, words in ((tiny_run, "is the input run"), (tiny_run / "new", "inside the input run")):
        for flags in ([], ["--overwrite"]):
            assert_one_line_error(cli("rescore", str(tiny_run), "--out", str(out), *flags),
                                  "--out", words)  # fmt: skip
    assert snapshot(tiny_run) == before


def test_rescore_overwrite_keeps_the_old_run_until_the_new_one_is_complete(
    tiny_run: Path, tmp_path: Path
) -> None:
    out = write_synthetic_run(tmp_path / "old", num_sequences=4)
    before = snapshot(out)
    assert_one_line_error(cli("rescore", str(tiny_run), "--out", str(out)),
                          "holds a complete run", "--overwrite")  # fmt: skip
    # fails while the new run is written (the disk fills up): the old run is kept
    disk_full = _Interrupt("rescore", MismatchError("no space left on device"))
    with pytest.raises(MismatchError, match="no space"):
        rescore_run(tiny_run, out, RescoreOptions(), overwrite=True, progress=disk_full)
    assert snapshot(out) == before and leftovers(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):
        rescore_run(tiny_run, out, overwrite=True, progress=_Interrupt("rescore"))
    assert snapshot(out) == before and leftovers(tmp_path) == []
    rescore_run(tiny_run, out, overwrite=True)
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "complete" and meta["rescored_from"]["run"] == str(tiny_run)
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- diagnose


def test_diagnose_out_is_never_the_baseline_and_overwrite_is_safe(
    tiny_run: Path, tmp_path: Path
) -> None:
    before = snapshot(tiny_run)
    for out, words in ((tiny_run, "is the --run baseline"),
                       (tiny_run / "diag", "inside the --run baseline")):  # fmt: skip
        assert_one_line_error(cli("diagnose", "--run", str(tiny_run), "--out", str(out),
                                  "--variants", "null"), "--out", words)  # fmt: skip
    assert snapshot(tiny_run) == before
    out = tmp_path / "diag"
    cfg = MeasureConfig()
    first = run_diagnose(cfg, out, "null", run=tiny_run)
    assert first["out"] == str(out)
    old = snapshot(out)
    with pytest.raises(MismatchError, match="--overwrite"):
        run_diagnose(cfg, out, "null", run=tiny_run)
    with pytest.raises(KeyboardInterrupt):
        run_diagnose(cfg, out, "null", run=tiny_run, overwrite=True, progress=_Interrupt("null"))
    assert snapshot(out) == old and leftovers(tmp_path) == []
    again = run_diagnose(cfg, out, "null", run=tiny_run, overwrite=True)
    assert leftovers(tmp_path) == []
    # the paths the result and the variant runs record are the final ones
    saved = json.loads((out / DIAGNOSE_JSON).read_text())
    assert saved == again and saved["out"] == str(out)
    assert {r["run"] for r in saved["variants"] if r["run"]} == {
        str(out / "variants" / "baseline"), str(out / "variants" / "null")}  # fmt: skip
    null = json.loads((out / "variants" / "null" / "run.json").read_text())
    assert null["rescored_from"]["run"] == str(out / "variants" / "baseline")
    shutil.rmtree(out)
