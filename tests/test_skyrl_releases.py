"""SkyRL dumps as the releases users run write them (tests/data/skyrl/, written by
skyrl 0.4.0's and skyrl-train 0.3.1's own code), compared token by token with the truth
computed independently of SkyRL; and the layout rule: derived from the masks, checked, a
dump whose layout cannot be established refused in one line."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from mismatch_cli.errors import MismatchError
from mismatch_cli.importers import get_format, skyrl
from mismatch_cli.importers.ingest import ImportOptions, run_import
from mismatch_cli.importers.pickles import restricted_load
from mismatch_cli.importers.toolkit import ReadContext

from . import import_fixtures as F
from .conftest import assert_one_line_error
from .conftest import run_cli as cli

DATA = Path(__file__).resolve().parent / "data" / "skyrl"
# release folder -> (release noted, layout noted, module path in the pickle)
RELEASES = {
    "skyrl-0.4.0": ("skyrl >= 0.4.0", "right-aligned", "skyrl.backends.skyrl_train"),
    "skyrl_train-0.3.1": ("skyrl_train 0.1.0-0.3.1", "left-aligned", "skyrl_train."),
}


def _truth(release: str) -> dict[str, Any]:
    return json.loads((DATA / release / "truth.json").read_text())


def _dump(release: str) -> Path:
    return DATA / release / _truth(release)["file"]


@pytest.mark.parametrize("release", list(RELEASES))
def test_vendored_dump_reads_exactly(release: str) -> None:
    """Every completion's prompt, response ids, loss mask, both log-probs and advantage
    equal the truth; the empty response is skipped with a count; padding rows dropped."""
    truth = _truth(release)
    warnings: list[str] = []
    facts: dict[str, Any] = {}
    ctx = ReadContext(trust_pickle=True, warn=warnings.append, note=facts.__setitem__)
    (chunk,) = list(get_format("skyrl").read(_dump(release), ctx))
    want = [c for c in truth["completions"] if c["response_token_ids"]]
    empty = len(truth["completions"]) - len(want)
    assert empty == 1 and chunk.num_sequences == len(want) == 41
    assert chunk.seq_extra["source_row"].tolist() == [c["row"] for c in want]
    assert chunk.seq_extra["step"].tolist() == [truth["step"]] * len(want)
    o = po = 0
    for j, c in enumerate(want):
        n, p = int(chunk.lens[j]), int(chunk.prompt_lens[j])
        assert chunk.prompt_ids[po : po + p].tolist() == c["prompt_token_ids"], c["row"]
        assert chunk.token_ids[o : o + n].tolist() == c["response_token_ids"], c["row"]
        assert chunk.logp_infer[o : o + n].tolist() == c["logp_infer"], c["row"]
        assert chunk.logp_train[o : o + n].tolist() == c["logp_train"], c["row"]
        assert chunk.loss_mask[o : o + n].astype(int).tolist() == c["loss_mask"], c["row"]
        assert (chunk.token_extra["advantage"][o : o + n] == c["advantage"]).all(), c["row"]
        o, po = o + n, po + p
    assert o == chunk.token_ids.size and po == chunk.prompt_ids.size
    assert sum(c["loss_mask"].count(0) for c in want) > 0  # tool spans are in the dump
    assert [w for w in warnings if "1 completion(s) with an empty response" in w]
    release_name, layout, module = RELEASES[release]
    assert facts["release"] == release_name and facts["layout"] == layout
    assert facts["pickle"].startswith(module)


@pytest.mark.parametrize("release", list(RELEASES))
def test_vendored_dump_imports_with_release_and_layout(release: str, tmp_path: Path) -> None:
    """Through `run_import`: one token row per loss-mask-1 token of the truth, in order,
    and run.json's source block names the release and the layout found."""
    truth = _truth(release)
    res = run_import(ImportOptions("skyrl", [str(DATA / release)], tmp_path / "run",
                                   trust_pickle=True))  # fmt: skip
    want = [c for c in truth["completions"] if c["response_token_ids"]]
    rows = [(k, pos, c["response_token_ids"][pos], c["logp_infer"][pos], c["logp_train"][pos])
            for k, c in enumerate(want) for pos in range(len(c["loss_mask"]))
            if c["loss_mask"][pos]]  # fmt: skip
    tok = pd.read_parquet(tmp_path / "run" / "tokens.parquet").sort_values(["seq_id", "pos"])
    got = list(zip(tok["seq_id"], tok["pos"], tok["token_id"], tok["logp_infer"],
                   tok["logp_train"], strict=True))  # fmt: skip
    assert res["num_tokens"] == len(rows) == len(got)
    assert [tuple(map(float, g)) for g in got] == [tuple(map(float, r)) for r in rows]
    assert res["num_sequences"] == len(want)
    src = json.loads((tmp_path / "run" / "run.json").read_text())["source"]
    release_name, layout, _ = RELEASES[release]
    assert src["release"] == release_name and src["layout"] == layout
    assert src["files"][0]["release"] == release_name and src["files"][0]["layout"] == layout


def test_old_reader_would_misread_the_left_aligned_release() -> None:
    """The bug this guards: reading skyrl_train 0.3.1's dump as right-aligned gives other
    tokens (the dump really is left-aligned, with responses of different lengths)."""
    t, _ = skyrl._load(_dump("skyrl_train-0.3.1"), ReadContext(trust_pickle=True))
    resp = t["response_mask"][:-2]
    r = resp.sum(axis=1)
    partial = (r > 0) & (r < resp.shape[1])
    assert partial.sum() > 30
    assert (resp[partial, 0] == 1).all() and (resp[partial, -1] == 0).all()


# ----------------------------------------------------------------------------- the rule


@pytest.fixture(scope="module")
def known() -> F.Known:
    return F.known_run(num_sequences=6, max_len=8, steps=(3,))


def _read(known: F.Known, root: Path, layout: str = "new", **kw: Any) -> tuple[Any, list]:
    warnings: list[str] = []
    path = F.write_skyrl(known, root, layout=layout, **kw)[0]
    ctx = ReadContext(trust_pickle=True, warn=warnings.append)
    return list(get_format("skyrl").read(path, ctx)), warnings


def _set(key: str, fn: Any) -> Any:
    def mutate(arrays: dict) -> None:
        arrays[key] = fn(arrays[key].copy())

    return mutate


def _hole(a: np.ndarray) -> np.ndarray:  # a zero inside the longest response
    i = int(a.sum(axis=1).argmax())
    cols = np.flatnonzero(a[i])
    a[i, cols[len(cols) // 2]] = 0
    return a


def _mixed(a: np.ndarray) -> np.ndarray:  # the shortest row left-aligned, the others right
    i = int(a.sum(axis=1).argmin())
    n = int(a[i].sum())
    a[i] = 0
    a[i, :n] = 1
    return a


def _empty(a: np.ndarray) -> np.ndarray:
    a[1] = 0
    return a


@pytest.mark.parametrize("layout", ["new", "old"])
def test_both_layouts_derived_from_the_masks(known: F.Known, tmp_path: Path, layout: str) -> None:
    (chunk,), _ = _read(known, tmp_path, layout, pad_size=2)
    assert (
        chunk.token_ids.tolist() == np.concatenate([c.tokens for c in known.completions]).tolist()
    )
    assert (
        chunk.prompt_ids.tolist() == np.concatenate([c.prompt for c in known.completions]).tolist()
    )


@pytest.mark.parametrize(
    ("case", "mutate", "words"),
    [
        ("ones in the middle", _set("response_mask", _hole), ("neither the first nor",)),
        ("mixed alignment", _set("response_mask", _mixed), ("left-aligned in 1 row", "right-aligned")),
        ("attention disagrees", _set("attention_mask", lambda a: np.roll(a, 1, axis=1)),
         ("attention_mask row", "cannot establish")),
        ("two pad ids", _set("sequences", lambda a: np.where(a == 0, np.arange(a.shape[1]), a)),
         ("padding hold", "different token ids")),
        ("logprobs outside the response", _set("rollout_logprobs", lambda a: a - 1),
         ("rollout_logprobs row", "outside the columns")),
        ("values not 0/1", _set("response_mask", lambda a: a * 2), ("other than 0 and 1",)),
    ],
)  # fmt: skip
def test_unestablished_layout_is_refused(
    known: F.Known, tmp_path: Path, case: str, mutate: Any, words: tuple[str, ...]
) -> None:
    with pytest.raises(MismatchError) as e:
        _read(known, tmp_path, mutate=mutate, pad_size=0)
    msg = str(e.value)
    assert "\n" not in msg and "global_step_3_training_input.pkl" in msg
    for w in words:
        assert w in msg, msg


def test_empty_response_row_is_skipped_with_a_count(known: F.Known, tmp_path: Path) -> None:
    def mutate(arrays: dict) -> None:
        for k in ("response_mask", "loss_mask", "rollout_logprobs", "action_log_probs",
                  "advantages"):  # fmt: skip
            arrays[k][1] = 0
        n = int(known.completions[1].tokens.size)
        arrays["attention_mask"][1, -n:] = 0  # the row's response was never there
        arrays["attention_mask"][1] = np.sort(arrays["attention_mask"][1])
        arrays["sequences"][1] = np.where(arrays["attention_mask"][1] == 1, 5, 0)

    (chunk,), warnings = _read(known, tmp_path, mutate=mutate, pad_size=0)
    assert chunk.num_sequences == len(known.completions) - 1
    assert 1 not in chunk.seq_extra["source_row"].tolist()
    assert any("1 completion(s) with an empty response" in w for w in warnings)


def test_pad_size_is_checked(known: F.Known, tmp_path: Path) -> None:
    path = F.write_skyrl(known, tmp_path, pad_size=2)[0]
    state_pad = {"pad_size": 99}

    def inject(st: dict) -> None:
        st["metadata"].update(state_pad)

    bad = F.write_skyrl(known, tmp_path / "bad", pad_size=2, inject=inject)[0]
    with pytest.raises(MismatchError, match="pad_size 99 is not a row count"):
        list(get_format("skyrl").read(bad, ReadContext(trust_pickle=True)))
    (chunk,) = list(get_format("skyrl").read(path, ReadContext(trust_pickle=True)))
    assert chunk.num_sequences == len(known.completions)


def test_unestablished_layout_through_the_cli(known: F.Known, tmp_path: Path) -> None:
    src = F.write_skyrl(known, tmp_path / "src", mutate=_set("response_mask", _hole))[0]
    proc = cli("import", "skyrl", str(src), "--trust-pickle", "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, str(src), "cannot establish the layout")
    assert proc.returncode == 2 and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the pickle


def _global(module: str, name: str, *args: Any) -> bytes:
    """A protocol-2 pickle calling module.name(*args) (strings only)."""
    body = b"".join(pickle.dumps(a, protocol=2)[2:-1] for a in args)
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"(" + body + b"tR."


def test_tensor_format_values_are_checked() -> None:
    mod = "skyrl.backends.skyrl_train.training_batch"
    got = restricted_load(_global(mod, "TensorFormat", "numpy"), skyrl._allowed(), "f")
    assert got == "numpy" and isinstance(got, skyrl._EnumFormat)
    with pytest.raises(
        MismatchError, match=r"unknown SkyRL TensorFormat 'evil'.*skyrl 0\.1\.0-0\.4\.0"
    ):
        restricted_load(_global(mod, "TensorFormat", "evil"), skyrl._allowed(), "f")


@pytest.mark.parametrize(
    "name",
    [
        "skyrl.backends.skyrl_train.training_batch.TensorList",
        "skyrl.backends.skyrl_train.training_batch.pad_training_input_batch",
        "skyrl.backends.skyrl_train.utils.packed_tensor.PackedTensor",
        "skyrl_train.training_batch.TensorFormat2",
    ],
)
def test_unknown_class_names_itself_and_the_known_releases(name: str, tmp_path: Path) -> None:
    module, cls = name.rsplit(".", 1)
    p = tmp_path / "dumped_data" / "global_step_1_training_input.pkl"
    p.parent.mkdir()
    p.write_bytes(_global(module, cls, "x"))
    with pytest.raises(MismatchError) as e:
        list(get_format("skyrl").read(p, ReadContext(trust_pickle=True)))
    msg = str(e.value)
    assert f"refusing to load {name}" in msg and skyrl.KNOWN in msg and "\n" not in msg
