"""`import --append` and `mismatch watch`: a run grown file by file (or step by step while a
writer produces them) equals a one-shot import token by token; Ctrl-C mid-import leaves a
complete run that `--append` finishes; a changed file is refused. The Ctrl-C test and the
watcher following a writer run real processes (a signal, a process that runs on); the
others call the CLI in this process (`cli_in_process`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT, assert_one_line_error, cli_in_process, run_cli
from tests.import_fixtures import known_run, write_prime_rl

STEPS = (1, 2, 3, 4)


def _assert_same_run(a: Path, b: Path) -> None:
    """Token and sequence tables equal, row by row and column by column."""
    for table in ("tokens.parquet", "sequences.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(a / table), pd.read_parquet(b / table))
    ma, mb = (json.loads((p / "run.json").read_text()) for p in (a, b))
    # sums over other part boundaries: equal up to the last digits' rounding
    assert mb["summary"] == pytest.approx(ma["summary"], rel=1e-12, nan_ok=True)
    assert mb["source"]["checks"]["slope"] == pytest.approx(
        ma["source"]["checks"]["slope"], rel=1e-12
    )
    assert ma["source"]["steps"] == mb["source"]["steps"]


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prime-rl output folder of four steps (three ranks each, STABLE markers)."""
    root = tmp_path_factory.mktemp("prime") / "out"
    write_prime_rl(known_run(num_sequences=48, steps=STEPS), root)
    return root


def test_append_step_by_step_equals_one_shot(export: Path, tmp_path: Path) -> None:
    one, grown = tmp_path / "one", tmp_path / "grown"
    cli_in_process("import", "prime-rl", str(export), "--out", str(one), check=True)
    steps = sorted((export / "token_exports").iterdir())
    cli_in_process("import", "prime-rl", str(steps[0]), "--out", str(grown), check=True)
    for s in steps[1:3]:
        cli_in_process("import", "prime-rl", str(s), "--out", str(grown), "--append", check=True)
    # the whole folder: only the last step is new
    cli_in_process("import", "prime-rl", str(export), "--out", str(grown), "--append", check=True)
    _assert_same_run(one, grown)
    files = json.loads((grown / "run.json").read_text())["source"]["files"]
    assert len(files) == 12 and all({"bytes", "mtime_ns", "sha256"} <= set(f) for f in files)
    again = cli_in_process("import", "prime-rl", str(export), "--out", str(grown), "--append")
    assert again.returncode == 0 and "nothing to append" in again.stderr


def test_a_changed_file_is_refused_a_touched_one_is_not(export: Path, tmp_path: Path) -> None:
    dump = tmp_path / "dump"
    shutil.copytree(export, dump)
    run = tmp_path / "run"
    cli_in_process("import", "prime-rl", str(dump), "--out", str(run), check=True)
    f = dump / "token_exports" / "step_2" / "rank_1.jsonl"
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))  # same bytes, new mtime
    same = cli_in_process("import", "prime-rl", str(dump), "--out", str(run), "--append")
    assert same.returncode == 0 and "nothing to append" in same.stderr
    lines = f.read_text().splitlines(keepends=True)
    f.write_text("".join(lines[:-1]))  # a record less: a different file under the same path
    proc = cli_in_process("import", "prime-rl", str(dump), "--out", str(run), "--append")
    assert_one_line_error(proc, "changed since", str(f))
    both = cli_in_process(
        "import", "prime-rl", str(dump), "--out", str(run), "--append", "--overwrite"
    )
    assert_one_line_error(both, "pick one")


# `python -m mismatch_cli` with one change: on reaching the file named by argv[1], the reader
# touches argv[2] and waits (as a reader waits on a slow disk) until a signal ends the wait.
# The Ctrl-C then lands mid-file by construction, however fast this machine reads: a test
# that raced the importer to the second file failed where the importer won.
_PAUSED_IMPORT = """
import sys, time
from pathlib import Path
from mismatch_cli.importers import ingest
pause_at, reached = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
sys.argv = ["mismatch", *sys.argv[3:]]
chunks = ingest._chunks
def paused(mod, path, ctx):
    if Path(path).resolve() == pause_at:
        reached.touch()
        time.sleep(600)
    yield from chunks(mod, path, ctx)
ingest._chunks = paused
from mismatch_cli.cli import main
main()
"""


def test_sigint_mid_import_keeps_a_complete_run_that_append_finishes(tmp_path: Path) -> None:
    """Four steps of a few MB each; Ctrl-C while the second one is being read: RUN holds the
    files read to their end, every command reads it, and --append reads the rest."""
    src = tmp_path / "src"
    write_prime_rl(known_run(num_sequences=120, max_len=300, steps=(1,)), src, ranks=1)
    body = (src / "token_exports" / "step_1" / "rank_0.jsonl").read_bytes()
    dump = tmp_path / "dump" / "token_exports"
    for s in STEPS:
        d = dump / f"step_{s}"
        d.mkdir(parents=True)
        (d / "rank_0.jsonl").write_bytes(body)
        (d / "STABLE").touch()
    one, run = tmp_path / "one", tmp_path / "run"
    run_cli("import", "prime-rl", str(dump), "--out", str(one), check=True)
    reached = tmp_path / "reached"
    proc = subprocess.Popen(
        [sys.executable, "-c", _PAUSED_IMPORT, str(dump / "step_2" / "rank_0.jsonl"),
         str(reached), "import", "prime-rl", str(dump), "--out", str(run)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not reached.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "step_2 never reached"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted while reading" in err and "Traceback" not in err
    kept = json.loads((run / "run.json").read_text())
    assert kept["status"] == "complete" and kept["source"]["interrupted"] is True
    assert [Path(f["path"]).parent.name for f in kept["source"]["files"]] == ["step_1"]
    run_cli("report", str(run), "--group-by", "step", check=True)
    run_cli("plot", str(run), "--out", str(tmp_path / "fig"), check=True)
    run_cli("import", "prime-rl", str(dump), "--out", str(run), "--append", check=True)
    _assert_same_run(one, run)


def test_watch_follows_a_writer_and_ends_equal_to_one_shot(export: Path, tmp_path: Path) -> None:
    """A writer thread produces the export step by step (rank files first, STABLE later)
    while `watch --until-idle` runs; the run equals a one-shot import of the same files."""
    live = tmp_path / "live"
    live.mkdir()
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mismatch_cli", "watch", str(live), "--format", "prime-rl",
         "--out", str(run), "--interval", "0.2", "--until-idle", "6"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
    )  # fmt: skip
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith("waiting for prime-rl files"), first

    def write() -> None:
        for step_dir in sorted((export / "token_exports").iterdir()):
            d = live / "token_exports" / step_dir.name
            d.mkdir(parents=True)
            for f in sorted(step_dir.glob("rank_*.jsonl")):
                shutil.copy(f, d / f.name)
                time.sleep(0.1)
            time.sleep(0.5)  # a step without its marker is not read
            (d / "STABLE").touch()
            time.sleep(0.3)

    writer = threading.Thread(target=write)
    writer.start()
    rest, err = proc.communicate(timeout=180)
    writer.join()
    assert proc.returncode == 0, err
    out = first + rest
    lines = out.splitlines()
    assert [ln.split(":")[0] for ln in lines if ln.startswith("step ")] == [
        f"step {s}" for s in STEPS
    ]
    assert sum(ln.startswith("waiting for prime-rl files") for ln in lines) == 1
    assert all("tokens, k3 " in ln and "alert no" in ln for ln in lines if ln.startswith("step "))
    steps_csv = pd.read_csv(run / "tables" / "steps.csv")
    assert steps_csv["step"].tolist() == list(STEPS)
    assert (run / "figures" / "drift.png").stat().st_size > 0
    one = tmp_path / "one"
    cli_in_process("import", "prime-rl", str(live), "--out", str(one), check=True)
    _assert_same_run(one, run)
    again = cli_in_process("watch", str(live), "--format", "prime-rl", "--out", str(run), "--once")
    assert again.returncode == 0 and "step " not in again.stdout


def test_watch_once_on_an_empty_folder_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    proc = cli_in_process(
        "watch", str(tmp_path / "empty"), "--format", "prime-rl", "--out", str(tmp_path / "r"),
        "--once",
    )  # fmt: skip
    assert_one_line_error(proc, "no complete prime-rl step")
    assert proc.stdout.strip() == ""
    bad = cli_in_process(
        "watch", str(tmp_path / "nope"), "--format", "slime", "--out", str(tmp_path / "r")
    )
    assert_one_line_error(bad, "not a folder")


def test_watch_settle_rule_for_files_without_a_marker(tmp_path: Path) -> None:
    """A tokens file is read once its size and mtime have not moved for --settle seconds."""
    from tests.import_fixtures import write_tokens_jsonl

    live = tmp_path / "live"
    live.mkdir()
    f = write_tokens_jsonl(known_run(num_sequences=8, steps=(5, 6)), live / "rollouts.jsonl")
    now = time.time()
    os.utime(f, (now, now))
    run = tmp_path / "run"
    early = cli_in_process(
        "watch", str(live), "--format", "tokens", "--out", str(run), "--once", "--settle", "30"
    )
    assert_one_line_error(early, "no complete tokens step")
    os.utime(f, (now - 60, now - 60))
    done = cli_in_process(
        "watch", str(live), "--format", "tokens", "--out", str(run), "--once", "--settle", "30"
    )
    assert done.returncode == 0, done.stderr
    assert [ln.split(":")[0] for ln in done.stdout.splitlines() if ln.startswith("step ")] == [
        "step 5",
        "step 6",
    ]


def test_watch_alert_names_the_metric_that_rose(tmp_path: Path) -> None:
    """30 steps whose delta triples from step 24 on: the drift detector (20-step baseline)
    raises, and the warning line says which metric rose, from what to what."""
    import numpy as np

    known = known_run(num_sequences=300, max_len=30, steps=tuple(range(30)))
    for c in known.completions:
        if c.step >= 24:
            c.logp_infer = c.logp_train + 3 * (c.logp_infer - c.logp_train)
            c.logp_infer = np.minimum(c.logp_infer, 0.0)
    write_prime_rl(known, tmp_path / "out", ranks=1)
    run = tmp_path / "run"
    proc = cli_in_process(
        "watch", str(tmp_path / "out"), "--format", "prime-rl", "--out", str(run), "--once",
        "--no-figure",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    steps = [ln for ln in proc.stdout.splitlines() if ln.startswith("step ")]
    assert len(steps) == 30 and all(ln.endswith("alert no") for ln in steps[:24])
    assert any(ln.endswith("alert RAISED") for ln in steps[24:])
    alerts = [ln for ln in proc.stderr.splitlines() if "drift alert" in ln]
    assert alerts and "k3 rose from" in alerts[0] and "(first 20 steps)" in alerts[0]
