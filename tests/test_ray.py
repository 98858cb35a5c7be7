"""`rescore --ray`: a local Ray cluster (`ray.init(num_cpus=2)`), two CPU actors over a real
run of the tiny model. The tokens equal the one-process rescore exactly; a killed actor's
shard is retried and changes nothing; a shard that keeps failing stops the run in one line,
and --resume continues it without scoring a finished part again; bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mismatch_cli.cluster import FAULT_ENV, RayOptions, plan_shards
from mismatch_cli.errors import MismatchError
from mismatch_cli.pipeline import TOKENS
from mismatch_cli.rescore_run import rescore_run
from mismatch_cli.runs import RunDir, read_tokens, staging_path

from . import import_fixtures as F
from .conftest import ROOT, assert_one_line_error, run_cli
from .test_import import _with_model_logprobs
from .test_rescore_run import make_run

ray = pytest.importorskip("ray", reason="the `ray` extra is not installed")


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of two CPUs, as on this machine; `connect` uses it as it is."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def four_part_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make_run`'s real run of the tiny model with 4 parts (chunks of 3 prompts x 2
    samples, several forward passes each), so two workers each get several shards."""
    return make_run(tmp_path_factory.mktemp("ray") / "run", tiny_model_dir, chunks=4)


@pytest.fixture(scope="module")
def one_process(four_part_run: Path, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """The one-process rescore's token table: what every --ray run must equal."""
    return read_tokens(rescore_run(four_part_run, tmp_path_factory.mktemp("one") / "one"))


def _ray_meta(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())["ray"]


def test_shards_are_balanced_by_tokens() -> None:
    shards = plan_shards([10, 1, 7, 3, 3, 9], 3)
    loads = [sum([10, 1, 7, 3, 3, 9][i] for i in s) for s in shards]
    assert sorted(i for s in shards for i in s) == list(range(6))  # every part once
    # by hand: 10, 9, 7 open the shards; 3 -> 7's (10), 3 -> 9's (12), 1 -> 10's (11);
    # the best split is no better (no shard holding 9 can hold exactly 11)
    assert shards == [[1, 4, 5], [0, 1], [2, 3]] or loads == [12, 11, 10]
    assert loads == [12, 11, 10]
    assert all(s == sorted(s) for s in shards)
    assert plan_shards([5, 5], 8) == [[0], [1]]  # never more shards than parts


def test_two_workers_give_the_one_process_tokens(
    local_ray: None, four_part_run: Path, one_process: pd.DataFrame, tmp_path: Path
) -> None:
    out = rescore_run(four_part_run, tmp_path / "ray", ray=RayOptions(workers=2))
    pd.testing.assert_frame_equal(read_tokens(out), one_process)  # every column, exactly
    rec = _ray_meta(out)
    assert [w["worker"] for w in rec["workers"]] == [0, 1]
    assert all(w["device"] == "cpu" and w["torch_threads"] == 1 for w in rec["workers"])
    assert all(w["tokens"] > 0 and w["tokens_per_s"] > 0 for w in rec["workers"])
    parts = sorted(i for s in rec["shards"] for i in s["parts"])
    assert parts == [0, 1, 2, 3]  # the shard plan covers every part once
    assert {s["status"] for s in rec["shards"]} == {"done"}
    assert sum(s["tokens"] for s in rec["shards"]) == len(one_process)
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "complete" and meta["rescored_from"]["changed"] == {}
    assert not staging_path(out).exists() and not (out / "parts").exists()


def test_a_killed_worker_changes_nothing(
    local_ray: None,
    four_part_run: Path,
    one_process: pd.DataFrame,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(FAULT_ENV, "0:2")  # shard 0's worker (0) exits 2 passes into it
    out = rescore_run(four_part_run, tmp_path / "ray", ray=RayOptions(workers=2))
    pd.testing.assert_frame_equal(read_tokens(out), one_process)
    rec = _ray_meta(out)
    assert [w.get("replaces") for w in rec["workers"]] == [None, None, 0]
    retried = [s for s in rec["shards"] if s["attempts"] == 2]
    assert len(retried) == 1 and retried[0]["status"] == "done"
    assert retried[0]["worker"] != 0


def test_a_shard_failing_every_attempt_stops_and_resumes(
    local_ray: None,
    four_part_run: Path,
    one_process: pd.DataFrame,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out, keep = tmp_path / "ray", staging_path(tmp_path / "ray")
    # the last shard is handed out only once another one finished; its worker dies one
    # pass into it and, with one attempt per shard, the run stops in one line naming it
    monkeypatch.setenv(FAULT_ENV, "3:1")
    with pytest.raises(MismatchError) as e:
        rescore_run(four_part_run, out, ray=RayOptions(workers=2, max_attempts=1))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("shard 3 (parts ") and "--resume" in msg
    assert "failed 1 time(s)" in msg and "died" in msg
    assert not out.exists() and keep.is_dir()
    staged = RunDir(keep)
    finished = [i for i in range(4) if staged.has_part(TOKENS, i)]
    assert 1 <= len(finished) < 4
    before = sum(len(staged.read_part(TOKENS, i)) for i in finished)
    # without --resume the unfinished job is refused in one line
    with pytest.raises(MismatchError, match="pass --resume"):
        rescore_run(four_part_run, out, ray=RayOptions(workers=2))
    monkeypatch.delenv(FAULT_ENV)
    rescore_run(four_part_run, out, ray=RayOptions(workers=2, resume=True))
    pd.testing.assert_frame_equal(read_tokens(out), one_process)
    assert not keep.exists()
    rec = _ray_meta(out)
    for s in rec["shards"]:  # a shard finished before is not handed out again
        assert s["status"] == ("done before" if set(s["parts"]) <= set(finished) else "done")
    # the resumed job scored only the parts that were not finished: none twice
    assert sum(w["tokens"] for w in rec["workers"]) == len(one_process) - before


def test_resume_needs_an_unfinished_job(
    local_ray: None, four_part_run: Path, tmp_path: Path
) -> None:
    with pytest.raises(MismatchError, match="nothing to resume"):
        rescore_run(four_part_run, tmp_path / "x", ray=RayOptions(workers=1, resume=True))


def test_bad_ray_input_is_one_line(four_part_run: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "new")
    base = ["rescore", str(four_part_run), "--out", out]
    assert_one_line_error(run_cli(*base, "--ray", "--workers", "0"), "--workers must be >= 1")
    assert_one_line_error(run_cli(*base, "--workers", "2"), "--workers", "need(s) --ray")
    assert_one_line_error(run_cli(*base, "--resume"), "--resume", "need(s) --ray")
    proc = run_cli(*base, "--ray", "--ray-address", "127.0.0.1:1", timeout=120)
    assert_one_line_error(proc, "--ray-address 127.0.0.1:1", "no Ray cluster answers")
    assert_one_line_error(run_cli(*base, "--ray", "--ray-address", "nowhere"), "not HOST:PORT")
    assert not Path(out).exists()


def test_without_ray_installed_it_names_the_extra(four_part_run: Path, tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from mismatch_cli.cli import main\n"
        f"sys.argv = ['mismatch', 'rescore', {str(four_part_run)!r}, '--out', "
        f"{str(tmp_path / 'new')!r}, '--ray']\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert_one_line_error(proc, "mismatch-cli[ray]")


def test_tokens_agree_with_numpy_reference(one_process: pd.DataFrame) -> None:
    """The reference itself is a real, non-trivial table (the equality tests compare
    something): 4 parts, finite training log-probs."""
    assert one_process["seq_id"].nunique() == 24
    assert np.isfinite(one_process["logp_train"]).all()


@pytest.fixture(scope="module")
def verl_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A verl dump whose inference log-probs are the tiny model's at temperature 0.9 (as
    test_import's `verl_dump`)."""
    known = _with_model_logprobs(F.known_run(), tiny_model_dir, temperature=0.9)
    root = tmp_path_factory.mktemp("verl")
    F.write_verl(known, root / "dump")
    return root / "dump"


def test_import_rescore_on_ray_gives_the_one_process_tokens(
    local_ray: None, verl_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from mismatch_cli.importers.ingest import ImportOptions, run_import

    src = [str(verl_dir)]
    kw = {"model": str(tiny_model_dir), "temperature": 0.9, "trust_pickle": True,
          "device": "cpu", "part_tokens": 40}  # fmt: skip
    run_import(ImportOptions("verl", src, tmp_path / "one", **kw))
    run_import(ImportOptions("verl", src, tmp_path / "ray", ray=RayOptions(workers=2), **kw))
    one, on_ray = read_tokens(tmp_path / "one"), read_tokens(tmp_path / "ray")
    pd.testing.assert_frame_equal(on_ray, one)
    rec = _ray_meta(tmp_path / "ray")
    assert len(rec["shards"]) >= 2 and [w["worker"] for w in rec["workers"]] == [0, 1]


def test_the_cli_starts_its_own_ray_and_keeps_stdout_for_json(
    four_part_run: Path, one_process: pd.DataFrame, tmp_path: Path
) -> None:
    """`rescore --ray` with no address, as a user runs it: a local Ray started (and shut
    down) by the command, one plain progress line per phase event in a log, the --json
    result alone on stdout (Ray's own messages go to stderr), the same tokens."""
    out = tmp_path / "cli"
    proc = run_cli("rescore", str(four_part_run), "--out", str(out), "--ray", "--workers", "1",
                   "--json", check=True)  # fmt: skip
    result = json.loads(proc.stdout)  # nothing but the result on stdout
    assert result["run"] == str(out)
    assert "rescore: 0/138 tokens, started" in proc.stderr and "Traceback" not in proc.stderr
    pd.testing.assert_frame_equal(read_tokens(out), one_process)
    rec = _ray_meta(out)
    assert rec["address"] == "local" and rec["cluster_resources"]["CPU"] >= 1
