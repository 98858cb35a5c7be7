"""`compare`: side by side, ratios to the first run, and the per-token movement of each
side between runs that share rollouts (synthetic runs: no model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mismatch_cli.compare import compare, moved
from mismatch_cli.runs import read_sequences, read_tokens, token_frame, write_run
from mismatch_cli.synthetic import synthetic_meta, write_synthetic_run

from .conftest import assert_one_line_error, cli_in_process


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    """Two runs over the same rollouts: b's training side is a's plus known noise."""
    d = tmp_path_factory.mktemp("compare")
    a = write_synthetic_run(d / "a", num_sequences=16, seed=3)
    tok = read_tokens(a)
    noise = np.random.default_rng(0).normal(0, 0.01, len(tok))
    cols = {c: tok[c].to_numpy() for c in tok.columns if c not in ("delta", "p_train", "p_infer")}
    cols["logp_train"] = tok["logp_train"].to_numpy() + noise
    b = write_run(d / "b", token_frame(cols), read_sequences(a), synthetic_meta())
    return a, b, noise


def test_moved_sees_exactly_the_noise_on_the_training_side(pair) -> None:
    a, b, noise = pair
    m = moved(a, b)
    assert m["shared"] and m["num_only_a"] == m["num_only_b"] == 0
    np.testing.assert_allclose(m["train"]["mean_abs"], np.abs(noise).mean(), rtol=1e-9)
    np.testing.assert_allclose(m["train"]["max_abs"], np.abs(noise).max(), rtol=1e-9)
    assert m["infer"]["frac_identical"] == 1.0 and m["infer"]["max_abs"] == 0.0
    counts = [r["count"] for r in m["train"]["buckets"]]
    assert sum(counts) == m["train"]["num_tokens"] == len(noise)


def test_compare_is_strict_json_with_ratios_and_bucket_means(pair) -> None:
    a, b, _ = pair
    r = compare([a, b])
    json.dumps(r, allow_nan=False)
    assert [x["label"] for x in r["runs"]] == ["a", "b"] and r["reference"] == "a"
    ra, rb = r["runs"]
    assert r["ratios"][0]["k3"] == pytest.approx(rb["k3"] / ra["k3"])
    assert r["bucket_means"][-2]["a"] == ra["buckets"][-2]["mean_abs_delta"]
    assert r["moved"][0]["shared"] and r["moved"][0]["label"] == "b"
    assert ra["tv_coarse_mean"] > 0  # synthetic runs carry the distribution-level columns


def test_runs_with_other_rollouts_are_not_shared(pair, tmp_path: Path) -> None:
    a, _, _ = pair
    other = write_synthetic_run(tmp_path / "other", num_sequences=16, seed=4)
    m = moved(a, other)
    assert not m["shared"] and "different tokens" in m["reason"]


def test_compare_cli(pair, tmp_path: Path) -> None:
    a, b, _ = pair
    proc = cli_in_process("compare", str(a), str(b), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["moved"][0]["shared"]
    proc = cli_in_process("compare", str(a), str(b))
    assert proc.returncode == 0, proc.stderr
    assert "moved" in proc.stdout and "k3" in proc.stdout
    assert_one_line_error(cli_in_process("compare", str(a), str(tmp_path / "nope")), "not found")


@pytest.mark.parametrize("batch_rows", [1 << 20, 113])
def test_one_read_per_run_gives_the_separate_summaries_and_moves(
    pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch_rows: int
) -> None:
    """compare reads each run once (the first against each later one in lockstep, feeding
    both report scans and the moves): its runs and moved equal `run_summary` and `moved`
    computed apart, for runs paired row for row, a run whose rows are in another order
    (the moves then joined in a pass of their own) and a run of other rollouts."""
    import mismatch_cli.compare as C

    a, b, _ = pair
    tok = read_tokens(b)
    shuffled = write_run(
        tmp_path / "shuffled",
        tok.iloc[np.random.default_rng(1).permutation(len(tok))].reset_index(drop=True),
        read_sequences(b),
        synthetic_meta(),
    )
    other = write_synthetic_run(tmp_path / "other", num_sequences=16, seed=4)
    monkeypatch.setattr(C, "BATCH_ROWS", batch_rows)
    paths = [a, b, shuffled, other]
    r = compare(paths)
    want = [C.run_summary(p, p.name, batch_rows=batch_rows) for p in paths]
    assert r["runs"] == want
    for m, p in zip(r["moved"], paths[1:], strict=True):
        assert m == {"label": p.name, **moved(a, p, batch_rows=batch_rows)}
    assert [m["shared"] for m in r["moved"]] == [True, True, False]
    joined, paired = r["moved"][1]["train"], r["moved"][0]["train"]  # the same moves
    assert joined["num_tokens"] == paired["num_tokens"] and joined["max_abs"] == paired["max_abs"]
    assert joined["mean_abs"] == pytest.approx(paired["mean_abs"], rel=1e-12)
