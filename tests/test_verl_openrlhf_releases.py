"""verl and OpenRLHF dumps as the releases write them (tests/data/verl/, tests/data/openrlhf/,
written by verl 0.9.1's and OpenRLHF's own code), imported with `mismatch import` and
compared token by token with the truth computed independently of the frameworks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from mismatch_cli.importers import get_format
from mismatch_cli.importers.ingest import ImportOptions, run_import
from mismatch_cli.importers.toolkit import ReadContext

DATA = Path(__file__).resolve().parent / "data"
VERL = ("verl-0.9.1", "verl-0.9.1-numpy")


def _truth(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "truth.json").read_text())


def _rows(truth: dict[str, Any], train: bool) -> list[tuple]:
    """(seq_id, pos, token_id, logp_infer[, logp_train]) of every loss-mask-1 token."""
    return [(k, pos, c["response_token_ids"][pos], c["logp_infer"][pos],
             *((c["logp_train"][pos],) if train else ()))
            for k, c in enumerate(truth["completions"]) for pos in range(len(c["loss_mask"]))
            if c["loss_mask"][pos]]  # fmt: skip


@pytest.mark.parametrize("release", VERL)
def test_verl_dump_reads_exactly(release: str) -> None:
    """Every completion's prompt, response ids, loss mask and rollout log-probs equal the
    truth, in both of verl's serialisations; the step is meta.json's."""
    folder = DATA / "verl" / release
    truth = _truth(folder)
    (chunk,) = list(get_format("verl").read(folder / truth["file"], ReadContext(trust_pickle=True)))
    want = truth["completions"]
    assert chunk.num_sequences == len(want) == 24 and chunk.logp_train is None
    assert chunk.seq_extra["step"].tolist() == [truth["step"]] * len(want)
    o = po = 0
    for j, c in enumerate(want):
        n, p = int(chunk.lens[j]), int(chunk.prompt_lens[j])
        assert chunk.prompt_ids[po : po + p].tolist() == c["prompt_token_ids"], c["row"]
        assert chunk.token_ids[o : o + n].tolist() == c["response_token_ids"], c["row"]
        assert chunk.logp_infer[o : o + n].tolist() == c["logp_infer"], c["row"]
        assert chunk.loss_mask[o : o + n].astype(int).tolist() == c["loss_mask"], c["row"]
        o, po = o + n, po + p
    assert o == chunk.token_ids.size and po == chunk.prompt_ids.size
    assert sum(c["loss_mask"].count(0) for c in want) > 0  # tool spans are in the dump
    assert {len(c["response_token_ids"]) for c in want} >= {1, 40}


@pytest.mark.parametrize("release", VERL)
def test_verl_dump_imports_token_by_token(
    release: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Through `run_import` (rescored: the dump has no trainer side): one token row per
    loss-mask-1 token of the truth, ids and logp_infer equal, logp_train filled. run.json's
    source cannot name the release: verl 0.9.1's pickle names only verl.protocol.DataProto
    and its state tuple, nothing that tells a release."""
    folder = DATA / "verl" / release
    truth = _truth(folder)
    res = run_import(ImportOptions("verl", [str(folder)], tmp_path / "run", trust_pickle=True,
                                   model=str(tiny_model_dir), device="cpu"))  # fmt: skip
    tok = pd.read_parquet(tmp_path / "run" / "tokens.parquet").sort_values(["seq_id", "pos"])
    got = list(zip(tok["seq_id"], tok["pos"], tok["token_id"], tok["logp_infer"], strict=True))
    rows = _rows(truth, train=False)
    assert res["num_tokens"] == len(rows) == len(got)
    assert [tuple(map(float, g)) for g in got] == [tuple(map(float, r)) for r in rows]
    assert tok["logp_train"].notna().all()
    src = json.loads((tmp_path / "run" / "run.json").read_text())["source"]
    assert "release" not in src


OPENRLHF = ("openrlhf-0.11.2",)


@pytest.mark.parametrize("release", OPENRLHF)
def test_openrlhf_hook_dump_imports_token_by_token(release: str, tmp_path: Path) -> None:
    """The docs hook's `tokens` file from OpenRLHF's own Experience batches (multi-turn
    tool feedback inside, micro-batches padded to their own lengths): prompts, responses,
    loss masks and both log-probs equal the truth, and every loss-mask-1 token is one row.
    The `tokens` format carries no release: run.json's source names none."""
    folder = DATA / "openrlhf" / release
    truth = _truth(folder)
    (chunk,) = list(get_format("tokens").read(folder / truth["file"], ReadContext()))
    want = truth["completions"]
    assert chunk.num_sequences == len(want) == 12
    o = po = 0
    for j, c in enumerate(want):
        n, p = int(chunk.lens[j]), int(chunk.prompt_lens[j])
        assert chunk.prompt_ids[po : po + p].tolist() == c["prompt_token_ids"], j
        assert chunk.token_ids[o : o + n].tolist() == c["response_token_ids"], j
        assert chunk.logp_infer[o : o + n].tolist() == c["logp_infer"], j
        assert chunk.logp_train[o : o + n].tolist() == c["logp_train"], j
        assert chunk.loss_mask[o : o + n].astype(int).tolist() == c["loss_mask"], j
        o, po = o + n, po + p
    assert sum(c["loss_mask"].count(0) for c in want) > 0  # tool feedback is in the dump
    res = run_import(ImportOptions("tokens", [str(folder / truth["file"])], tmp_path / "run"))
    tok = pd.read_parquet(tmp_path / "run" / "tokens.parquet").sort_values(["seq_id", "pos"])
    got = list(zip(tok["seq_id"], tok["pos"], tok["token_id"], tok["logp_infer"],
                   tok["logp_train"], strict=True))  # fmt: skip
    rows = _rows(truth, train=True)
    assert res["num_tokens"] == len(rows) == len(got)
    assert [tuple(map(float, g)) for g in got] == [tuple(map(float, r)) for r in rows]
    assert set(tok["step"]) == {truth["step"]}
    src = json.loads((tmp_path / "run" / "run.json").read_text())["source"]
    assert "release" not in src
