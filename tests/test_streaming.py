"""Streamed sweep and corrections (issue 12 §3): a run read in small batches, with sequences
split across batches and quantiles from the sketch, gives the one-batch results (counts
equal, sums and means to float summation order, p99 within 1%, maxima exact), and memory
does not grow with the number of tokens. Also the streaming primitives (`tokens`, `per_sequence`, `quantiles`)."""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mismatch_cli import corrections as C
from mismatch_cli import sweep as sw
from mismatch_cli.errors import MismatchError
from mismatch_cli.per_sequence import BatchSeqs, Segments, SeqIndex
from mismatch_cli.quantiles import KeyedQuantiles
from mismatch_cli.runs import atomic_write_json, read_tokens
from mismatch_cli.synthetic import (
    bulk_grid_columns,
    bulk_token_columns,
    synthetic_meta,
    write_synthetic_run,
)
from mismatch_cli.tokens import TokenBatches

ONE_BATCH = 10**9
QUANTILE_KEYS = ("kept_p99_abs_delta", "left_p99_abs_delta", "p99_abs_delta")


def bulk_run(path: Path, num_tokens: int, chunk: int = 50_000, grids: bool = True) -> Path:
    """A run written chunk by chunk from the benchmarks' numpy generator: the columns
    `report` reads, p_max_train, both pruned-mass grids, step and advantage."""
    path.mkdir(parents=True)
    writer, first = None, 0
    for i, start in enumerate(range(0, num_tokens, chunk)):
        cols = bulk_token_columns(min(chunk, num_tokens - start), first, eps=0.3, seed=i)
        cols.update(bulk_grid_columns(cols, start, i, grids=grids))
        table = pa.table(cols)
        if writer is None:
            writer = pq.ParquetWriter(path / "tokens.parquet", table.schema)
        writer.write_table(table)
        first = int(cols["seq_id"][-1]) + 1
    assert writer is not None
    writer.close()
    meta = synthetic_meta()
    meta["status"] = "complete"
    atomic_write_json(path / "run.json", meta)
    return path


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_run(
        tmp_path_factory.mktemp("stream") / "run", num_sequences=60, eps=0.5, seed=7
    )


@pytest.fixture(scope="module")
def imported_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40k tokens (~160 sequences) with steps, advantages and both grids."""
    return bulk_run(tmp_path_factory.mktemp("bulk") / "run", 40_000, chunk=10_000)


def assert_same(got: Any, want: Any, sketched: bool, path: str = "") -> None:
    """Streamed `got` against one-batch `want`: ints, strings and None equal; floats to
    1e-9 relative (summation order), quantile keys within 1% when sketched, the bias
    bound's p95 to 1e-5 (per-sequence sums of the float32 grid accumulate in float32, and a
    sequence split across batches is summed in parts)."""
    if isinstance(want, dict):
        assert set(got) == set(want), path
        for k in want:
            if k in ("verdict", "quantiles"):
                continue
            assert_same(got[k], want[k], sketched, f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_same(a, b, sketched, f"{path}[{i}]")
    elif isinstance(want, float):
        key = path.rsplit(".", 1)[-1]
        rel = 0.01 if sketched and key in QUANTILE_KEYS else 1e-9
        rel = 1e-5 if key == "seq_bias_bound_p95" else rel
        assert got == pytest.approx(want, rel=rel, abs=1e-12), path
    else:
        assert got == want, path


# --- the primitives -------------------------------------------------------------------------


def test_token_batches_from_parquet_and_frame_agree(small_run: Path) -> None:
    df = read_tokens(small_run)
    cols, lists = ["seq_id", "delta", "kept_train"], ["pruned_mass_minp"]
    a = list(TokenBatches(small_run / "tokens.parquet", 37).read(cols, lists))
    b = list(TokenBatches(df, 37).read(cols, lists))
    assert len(a) == len(b) == math.ceil(len(df) / 37)
    for x, y in zip(a, b, strict=True):
        for c in cols:
            np.testing.assert_array_equal(x[c], y[c])
        assert x["pruned_mass_minp"].shape == (len(x["delta"]), 24)
        np.testing.assert_array_equal(x["pruned_mass_minp"], y["pruned_mass_minp"])


def test_ragged_list_column_is_one_line_error(tmp_path: Path) -> None:
    df = pd.DataFrame({"m": [np.zeros(3, np.float32), np.zeros(2, np.float32)]})
    pq.write_table(pa.Table.from_pandas(df), tmp_path / "t.parquet")
    for src in (TokenBatches(df), TokenBatches(tmp_path / "t.parquet")):
        with pytest.raises(MismatchError, match="does not hold a list of the same length"):
            list(src.read([], ["m"]))


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 7), min_size=1, max_size=15),
    shuffle=st.booleans(),
    batch=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_batch_reductions_equal_the_whole(
    lengths: list[int], shuffle: bool, batch: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    ids = rng.choice(10_000, size=len(lengths), replace=False)  # seq_ids, not indices
    seq_id = np.repeat(ids, lengths)
    if shuffle:
        seq_id = rng.permutation(seq_id)
    index = SeqIndex.scan(seq_id[i : i + batch] for i in range(0, seq_id.size, batch))
    codes, uniq = pd.factorize(seq_id, sort=True)
    np.testing.assert_array_equal(index.ids, uniq)
    np.testing.assert_array_equal(index.codes(seq_id), codes)
    v = rng.normal(size=seq_id.size)
    rows = rng.random((seq_id.size, 3)).astype(np.float32)
    S = index.num
    acc = {"sum": np.zeros(S), "rows": np.zeros((S, 3)), "min": np.full(S, np.inf)}
    acc["max"] = np.full(S, -np.inf)
    for i in range(0, seq_id.size, batch):
        bs = BatchSeqs(index.codes(seq_id[i : i + batch]))
        bs.add(acc["sum"], v[i : i + batch])
        bs.add_rows(acc["rows"], rows[i : i + batch])
        bs.minimum(acc["min"], v[i : i + batch])
        bs.maximum(acc["max"], v[i : i + batch])
    whole = Segments.of(codes, S)
    np.testing.assert_allclose(acc["sum"], whole.sum(v), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(acc["rows"], whole.sum_rows(rows), rtol=1e-6)
    np.testing.assert_array_equal(acc["min"], whole.min(v))
    np.testing.assert_array_equal(acc["max"], whole.max(v))


@pytest.mark.parametrize("limit", [10**9, 500])
def test_keyed_quantiles_of_subsets(limit: int) -> None:
    """Nested subsets (level >= t) and overlapping ones (bit m set): exact below the limit,
    within 1% above it (maximum exact), whatever the batches."""
    rng = np.random.default_rng(1)
    n = 20_000
    v = rng.lognormal(-3, 2, n)
    v[rng.random(n) < 0.05] = 0.0  # exact zeros
    level = rng.integers(0, 6, n)
    bits = rng.integers(0, 8, n)
    kq_l, kq_b = KeyedQuantiles(limit), KeyedQuantiles(limit)
    for i in range(0, n, 3001):
        kq_l.add(v[i : i + 3001], level[i : i + 3001])
        kq_b.add(v[i : i + 3001], bits[i : i + 3001])
    assert kq_l.exact == (limit > n)
    cases = [(kq_l, lambda k, t=t: k >= t, level >= t) for t in range(7)]
    cases += [(kq_b, lambda k, m=m: (k & (1 << m)) != 0, (bits & (1 << m)) != 0) for m in range(3)]
    for kq, select, mask in cases:
        for q in (0.5, 0.99, 1.0):
            got = kq.quantile(select, q)
            if not mask.any():
                assert math.isnan(got)
                continue
            want = float(np.quantile(v[mask], q))
            if kq.exact or q == 1.0:
                assert got == want
            else:
                assert got == pytest.approx(want, rel=0.01)


# --- sweep ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["min-p", "absolute"])
def test_sweep_streamed_equals_one_batch(small_run: Path, rule: str) -> None:
    want = sw.sweep(small_run, rule=rule, batch_rows=ONE_BATCH)
    assert want["quantiles"] == "exact"
    exact = sw.sweep(small_run, rule=rule, batch_rows=37)  # sequences split across batches
    assert exact["quantiles"] == "exact"
    for a, b in zip(exact["rows"], want["rows"], strict=True):
        assert a["kept_p99_abs_delta"] == b["kept_p99_abs_delta"]
    sketched = sw.sweep(small_run, rule=rule, batch_rows=37, exact_limit=100)
    assert sketched["quantiles"].startswith("sketch")
    for got in (exact, sketched):
        assert_same(got, want, sketched=got is sketched)
    # and the same table shuffled: every batch holds pieces of many sequences
    df = read_tokens(small_run).sample(frac=1.0, random_state=1).reset_index(drop=True)
    assert_same(
        sw.sweep(df, rule=rule, batch_rows=53, exact_limit=100), {**want, "run": None}, True
    )


# --- corrections ----------------------------------------------------------------------------


def test_corrections_streamed_equals_one_batch(imported_run: Path) -> None:
    want = C.corrections(imported_run, batch_rows=ONE_BATCH)
    assert want["has_step"] and want["has_advantage"] and want["quantiles"] == "exact"
    assert all(m["skipped"] is None for m in want["methods"])
    assert want["num_tokens"] == 40_000 and want["num_infinite"] >= 0
    exact = C.corrections(imported_run, batch_rows=997)
    assert_same(exact, want, sketched=False)
    sketched = C.corrections(imported_run, batch_rows=997, exact_limit=1000)
    assert sketched["quantiles"].startswith("sketch")
    assert_same(sketched, want, sketched=True)


def test_corrections_of_a_shuffled_table_in_small_batches(small_run: Path) -> None:
    want = C.corrections(small_run, batch_rows=ONE_BATCH)
    df = read_tokens(small_run).sample(frac=1.0, random_state=2).reset_index(drop=True)
    got = C.corrections(df, batch_rows=61, exact_limit=200)
    want["run"] = None
    assert_same(got, want, sketched=True)


def test_dvp_rows_agree_with_the_streamed_sweep(imported_run: Path) -> None:
    res = C.corrections(imported_run, ["dvp-minp"], batch_rows=4096, exact_limit=5000)
    sweep = sw.sweep(imported_run, batch_rows=4096, exact_limit=5000)
    m = res["methods"][0]
    row = next(r for r in sweep["rows"] if r["rho"] == m["params"]["rho"])
    assert m["bias_bound"] == row["seq_bias_bound_mean"]
    assert m["tokens_masked"] == pytest.approx(row["pruned_token_frac"], rel=1e-12)
    assert m["left_k3"] == pytest.approx(row["kept_k3"], rel=1e-9)
    assert m["left_max_abs_delta"] == row["kept_max_abs_delta"]
    # both sketched from the same values and keys' buckets: the same approximation
    assert m["left_p99_abs_delta"] == pytest.approx(row["kept_p99_abs_delta"], rel=1e-12)


# --- memory ---------------------------------------------------------------------------------


def _peak(fn: Any) -> int:
    """Peak bytes numpy (and Python) allocated while fn() ran (tracemalloc)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("command", ["sweep", "corrections"])
def test_memory_does_not_grow_with_the_run(tmp_path: Path, command: str) -> None:
    """4x the tokens, the same batch size and a small exact limit: the peak grows by the
    S-sized per-sequence arrays only (about 1 KB per sequence of ~256 tokens), far below
    the 8 bytes per token a single float64 array of the run would take."""
    n1, n2, batch = 50_000, 200_000, 8192
    small = bulk_run(tmp_path / "small", n1)
    large = bulk_run(tmp_path / "large", n2)

    def run(path: Path) -> None:
        if command == "sweep":
            sw.sweep(path, batch_rows=batch, exact_limit=1000)
        else:
            C.corrections(path, batch_rows=batch, exact_limit=1000)

    run(small)  # imports and caches outside the measurement
    p1, p2 = _peak(lambda: run(small)), _peak(lambda: run(large))
    per_token = (p2 - p1) / (n2 - n1)
    assert per_token < 8.0, (p1, p2, per_token)
