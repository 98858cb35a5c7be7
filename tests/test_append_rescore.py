"""`import --append` and `watch` on rescored imports (a verl dump holds only the inference
side): the new steps are rescored by transformers with the run's model (the suite's tiny
Llama, loaded once per watch), the old tokens kept; the grown run equals a one-shot import."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from mismatch_cli.errors import MismatchError
from mismatch_cli.importers.ingest import ImportOptions, run_import
from mismatch_cli.importers.watch import Watcher, WatchOptions
from tests import import_fixtures as F
from tests.conftest import assert_one_line_error, cli_in_process, run_cli


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A verl dump of two steps (3, 4): one gen_batch.dp each."""
    root = tmp_path_factory.mktemp("verl")
    return F.write_verl(F.known_run(num_sequences=16), root / "dump")


def _opts(sources: list[Path], out: Path, model: Path, **kw: Any) -> ImportOptions:
    kw = {"temperature": 0.9, **kw}
    return ImportOptions("verl", [str(s) for s in sources], out, model=str(model),
                         trust_pickle=True, device="cpu", **kw)  # fmt: skip


@pytest.fixture(scope="module")
def one_shot(steps: list[Path], tiny_model_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    run_import(_opts(steps, out, tiny_model_dir))
    return out


def _assert_same(a: Path, b: Path) -> None:
    """Token and sequence tables equal; logp_train (and every training-side column)
    bit-identical: the same tiny model on CPU scores a completion the same whether its
    step was rescored alone or with the other one."""
    ta, tb = (pd.read_parquet(p / "tokens.parquet") for p in (a, b))
    pd.testing.assert_frame_equal(ta, tb, check_exact=True)
    pd.testing.assert_frame_equal(
        pd.read_parquet(a / "sequences.parquet"), pd.read_parquet(b / "sequences.parquet")
    )
    ma, mb = (json.loads((p / "run.json").read_text()) for p in (a, b))
    assert mb["summary"] == pytest.approx(ma["summary"], rel=1e-12, nan_ok=True)
    assert ma["source"]["steps"] == mb["source"]["steps"] == [3, 4]
    assert ma["source"]["mode"] == mb["source"]["mode"] == "rescored"


def test_append_rescores_only_the_new_step(
    steps: list[Path], one_shot: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    grown = tmp_path / "grown"
    run_import(_opts(steps[:1], grown, tiny_model_dir))
    before = pd.read_parquet(grown / "tokens.parquet")
    res = run_import(_opts(steps, grown, tiny_model_dir, append=True))
    assert res["num_new_files"] == 1 and res["mode"] == "rescored"
    after = pd.read_parquet(grown / "tokens.parquet")
    old = after[after["seq_id"].isin(before["seq_id"])].reset_index(drop=True)
    np.testing.assert_array_equal(old["logp_train"], before["logp_train"])  # kept, not redone
    _assert_same(one_shot, grown)
    meta = json.loads((grown / "run.json").read_text())
    assert meta["source"]["appended"] == 1 and meta["model"]["weights_sha256"]


def test_append_with_another_model_is_refused(
    steps: list[Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    grown, other = tmp_path / "grown", tmp_path / "other-model"
    run_import(_opts(steps[:1], grown, tiny_model_dir))
    shutil.copytree(tiny_model_dir, other)
    import torch
    from safetensors.torch import load_file, save_file

    w = other / "model.safetensors"
    state = load_file(w)
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, w, metadata={"format": "pt"})
    assert torch.is_tensor(next(iter(state.values())))
    with pytest.raises(MismatchError, match=r"was rescored with .*not .*other-model"):
        run_import(_opts(steps, grown, other, append=True))
    with pytest.raises(MismatchError, match=r"sampling --temperature 0\.9"):
        run_import(_opts(steps, grown, tiny_model_dir, append=True, temperature=1.0))
    args = ["import", "verl", str(steps[1]), "--out", str(grown), "--append", "--trust-pickle",
            "--device", "cpu", "--temperature", "0.9"]  # fmt: skip
    assert_one_line_error(cli_in_process(*args, "--model", str(other)), "was rescored with")
    assert_one_line_error(cli_in_process(*args), "pass --model")


def test_watch_rescore_loads_the_model_once(
    steps: list[Path], one_shot: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Two polls, one new step each: both rescored and appended, one network load."""
    dump, out = tmp_path / "dump", tmp_path / "live"
    lines: list[str] = []
    opts = WatchOptions("verl", dump, out, settle=0, once=True, trust_pickle=True,
                        figure=False, model=str(tiny_model_dir), rescore=True, device="cpu",
                        temperature=0.9)  # fmt: skip
    first = dump / steps[0].relative_to(steps[0].parents[3])
    shutil.copytree(steps[0].parent, first.parent)
    watcher = Watcher(opts, lines.append, lines.append)
    assert len(watcher.poll()) == 1
    second = dump / steps[1].relative_to(steps[1].parents[3])
    shutil.copytree(steps[1].parent, second.parent)
    assert len(watcher.poll()) == 1
    assert watcher.model is not None and watcher.model.loads == 1
    assert [ln.split(":")[0] for ln in lines if ln.startswith("step")] == ["step 3", "step 4"]
    t1, t2 = (pd.read_parquet(p / "tokens.parquet") for p in (one_shot, out))
    pd.testing.assert_frame_equal(t1, t2, check_exact=True)


def test_watch_rescore_cli_once_twice(
    steps: list[Path], one_shot: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    dump, out = tmp_path / "dump", tmp_path / "live"
    args = ["watch", str(dump), "--format", "verl", "--out", str(out), "--once", "--settle",
            "0", "--trust-pickle", "--no-figure", "--rescore", "--model", str(tiny_model_dir),
            "--device", "cpu", "--temperature", "0.9"]  # fmt: skip
    for s in steps:
        shutil.copytree(s.parent, dump / s.parent.relative_to(s.parents[3]))
        proc = run_cli(*args, check=True)
        assert "step" in proc.stdout
    t1, t2 = (pd.read_parquet(p / "tokens.parquet") for p in (one_shot, out))
    pd.testing.assert_frame_equal(t1, t2, check_exact=True)
