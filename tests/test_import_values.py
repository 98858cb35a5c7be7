"""Values a dump may hold that no log-prob or token id can: NaN, +inf, -inf, log-probs above
0, negative or out-of-range token ids, arrays of different lengths, truncated JSON lines,
empty folders, malformed tensors. Each is a clear one-line error naming the file and record,
or a counted, named warning recorded in run.json: never a silent number."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mismatch_cli.errors import MismatchError
from mismatch_cli.importers.ingest import ImportOptions, run_import

from . import import_fixtures as F
from .conftest import assert_one_line_error
from .conftest import cli_in_process as cli

BASE = {
    "prompt_token_ids": [1, 2, 3],
    "response_token_ids": [4, 5, 6],
    "logprobs_infer": [-0.5, -0.25, -1.0],
    "logprobs_train": [-0.5, -0.3, -1.1],
}


def jsonl(path: Path, *rows: dict[str, Any], raw: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text)
    return path


def one(tmp: Path, name: str, **change: Any) -> Path:
    """A `tokens` file of three good records and one with `change`."""
    return jsonl(tmp / f"{name}.jsonl", BASE, BASE, {**BASE, **change}, BASE)


def test_refused_values_are_one_line_naming_file_and_record(tmp_path: Path) -> None:
    s = json.dumps(BASE)
    cases = {
        "+inf log-prob": (one(tmp_path, "inf", logprobs_train=[float("inf"), -0.3, -1.1]),
                          ("record 2", "logp_train is +inf")),
        "negative token id": (one(tmp_path, "neg", response_token_ids=[-4, 5, 6]),
                              ("record 2", "token id -4", "negative")),
        "negative prompt id": (one(tmp_path, "negp", prompt_token_ids=[1, -2, 3]),
                               ("record 2", "the prompt", "token id -2")),
        "id beyond int32": (one(tmp_path, "big", response_token_ids=[2**32 + 4, 5, 6]),
                            ("record 2", "4294967300", "int32")),
        "length mismatch": (one(tmp_path, "len", logprobs_infer=[-0.5]),
                            ("record 2", "length mismatch")),
        "all log-probs above 0": (
            jsonl(tmp_path / "nll.jsonl", *[{**BASE, "logprobs_infer": [0.5, 0.3, 1.1]}] * 3),
            ("logp_infer values are above 0", "not log-probs"),
        ),
        "truncated last line": (
            jsonl(tmp_path / "cut.jsonl", raw=f"{s}\n{s}\n{s[: len(s) // 2]}"),
            ("record 2", "truncated"),
        ),
        "a line that is not an object": (
            jsonl(tmp_path / "arr.jsonl", raw=f"{s}\n[1, 2]\n"),
            ("record 1", "not an object"),
        ),
        "empty file": (jsonl(tmp_path / "e" / "empty.jsonl", raw=""), ("empty dump",)),
    }  # fmt: skip
    for name, (src, words) in cases.items():
        out = tmp_path / "runs" / name.replace(" ", "_")
        proc = cli("import", "tokens", str(src), "--out", str(out))
        try:
            assert_one_line_error(proc, str(src), *words)
        except AssertionError as e:
            raise AssertionError(f"{name}: {proc.stderr}") from e
        assert not out.exists(), name


def test_empty_folders_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "nested" / "a" / "b").mkdir(parents=True)
    jsonl(tmp_path / "blank" / "x.jsonl", raw="\n\n")
    for name, words in (("empty", "no tokens files"), ("nested", "no tokens files"),
                        ("blank", "empty dump")):  # fmt: skip
        assert_one_line_error(
            cli("import", "tokens", str(tmp_path / name), "--out", str(tmp_path / "r")), *words
        )
    assert_one_line_error(
        cli("import", "prime-rl", str(tmp_path / "empty"), "--out", str(tmp_path / "r")),
        "no prime-rl files",
    )


def test_counted_values_are_named_warnings_and_recorded(tmp_path: Path) -> None:
    """NaN (null), a log-prob slightly above 0, an inference log-prob of -inf: kept or left
    out as documented, each counted in the result, the warnings and run.json."""
    src = jsonl(
        tmp_path / "t.jsonl",
        BASE,
        {**BASE, "logprobs_train": [float("nan"), -0.3, -1.1]},
        {**BASE, "logprobs_infer": [3e-7, -0.3, -1.1]},  # rounding of a log-softmax
        {**BASE, "logprobs_infer": [float("-inf"), -0.3, -1.1]},
        BASE,
    )
    res = run_import(ImportOptions("tokens", [str(src)], tmp_path / "run"))
    assert res["num_null_tokens"] == 1
    vc = res["value_checks"]
    assert vc["num_positive_logp"] == {"infer": 1, "train": 0}
    assert vc["max_positive_logp"]["infer"] == pytest.approx(3e-7)
    assert vc["num_neginf_logp_infer"] == 1
    w = " | ".join(res["warnings"])
    assert (
        "null log-prob" in w and "NaN" in w and "logp_infer above 0" in w and f"{src} record 2" in w
    )
    assert "logp_infer = -inf" in w and f"{src} record 3" in w
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["source"]["value_checks"] == vc and meta["source"]["warnings"] == res["warnings"]
    assert res["summary"]["num_infinite"] == 1  # the -inf is an infinite delta, counted
    proc = cli("import", "tokens", str(src), "--out", str(tmp_path / "run2"))
    assert proc.returncode == 0, proc.stderr
    assert "logp_infer above 0" in proc.stdout and "logp_infer = -inf" in proc.stdout


# ----------------------------------------------------------------------------- tensor dumps


@pytest.fixture(scope="module")
def known() -> F.Known:
    return F.known_run(num_sequences=6, max_len=8, steps=(3,), tool_spans=False)


def _slime_with(known: F.Known, root: Path, change: Any) -> Path:
    import torch

    p = F.write_slime(known, root)[0]
    payload = torch.load(p, weights_only=True)
    change(payload["samples"][1])
    torch.save(payload, p)
    return p


def test_tensor_dumps_values_and_shapes(
    known: F.Known, tiny_model_dir: Path, tmp_path: Path
) -> None:
    def skyrl(change: Any) -> Any:
        return lambda root: F.write_skyrl(known, root, mutate=change)[0]

    def set_(key: str, fn: Any) -> Any:
        def change(a: dict) -> None:
            a[key] = fn(a[key])

        return change

    def plus_inf(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a[0, -1] = np.inf
        return a

    def neg_id(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a[1, -1] = -7
        return a

    def neg_first(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a[1, 0] = -3
        return a

    def slime(change: Any) -> Any:
        return lambda root: _slime_with(known, root, change)

    cases = {
        "skyrl +inf": ("skyrl", skyrl(set_("action_log_probs", plus_inf)), ("record 0", "+inf")),
        "skyrl negative id": ("skyrl", skyrl(set_("sequences", neg_id)), ("record 1", "-7")),
        "skyrl length mismatch": (
            "skyrl",
            skyrl(set_("rollout_logprobs", lambda a: a[:, 1:])),
            ("rollout_logprobs", "length mismatch"),
        ),
        "skyrl 1-d sequences": (
            "skyrl",
            skyrl(set_("sequences", lambda a: a.ravel())),
            ("not a readable skyrl dump",),
        ),
        "slime +inf": (
            "slime",
            slime(lambda s: s["log_probs"].__setitem__(0, float("inf"))),
            ("record 1", "+inf"),
        ),
        "slime length mismatch": (
            "slime",
            slime(lambda s: s.update(log_probs=s["log_probs"][1:])),
            ("sample 1", "length mismatch"),
        ),
        "slime ragged list": (
            "slime",
            slime(lambda s: s.update(rollout_log_probs=[[-0.5], [-0.1, -0.2]])),
            ("not a readable slime dump",),
        ),
        "verl negative id": (
            "verl",
            lambda root: F.write_verl(known, root, mutate=set_("responses", neg_first))[0],
            ("record 1", "token id -3"),
        ),
    }  # fmt: skip
    for name, (fmt, write, words) in cases.items():
        src = write(tmp_path / name.replace(" ", "_"))
        out = tmp_path / "runs" / name.replace(" ", "_")
        opts = ImportOptions(fmt, [str(src)], out, trust_pickle=True, model=str(tiny_model_dir))
        with pytest.raises(MismatchError) as e:
            run_import(opts)
        msg = str(e.value)
        assert "\n" not in msg and str(src) in msg, (name, msg)
        for w in words:
            assert w in msg, (name, msg)
        assert not out.exists(), name
    # NaN in a tensor dump: a null log-prob, left out and counted
    p = _slime_with(known, tmp_path / "nan", lambda s: s["log_probs"].__setitem__(0, float("nan")))
    res = run_import(ImportOptions("slime", [str(p)], tmp_path / "nan_run"))
    assert res["num_null_tokens"] == 1 and any("NaN" in w for w in res["warnings"])
