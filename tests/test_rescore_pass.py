"""The per-position pass's fast paths give the numbers of the plain ones: the octave bins of
the pruned-mass grids equal a binary search (bit for bit), the fused entropy-and-grids
function (what torch.compile runs) equals the eager pass to float32 rounding, slicing the
rows does not change a result, and the byte budget sets the slice size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mismatch_cli import dvp, rescore
from mismatch_cli.config import parse_size
from mismatch_cli.errors import MismatchError
from mismatch_cli.rescore import PositionPass, Sampling, _entropy, _fused_stats, score_logits
from mismatch_cli.schema import RHO_GRID


def reference_grid(probs: torch.Tensor, grid, rule: str) -> torch.Tensor:
    """The pruned mass by definition: sum of p_i over p_i < t_g (vLLM's float32 comparison)."""
    g = torch.tensor(list(grid), dtype=torch.float32)
    thr = probs.amax(dim=1, keepdim=True) * g if rule == "min-p" else g[None].expand(len(probs), -1)
    bins = torch.searchsorted(thr.contiguous(), probs.contiguous(), right=True)  # [n, V]
    mass = torch.zeros(len(probs), len(grid) + 1, dtype=probs.dtype)
    mass.scatter_add_(1, bins, probs)
    return mass[:, : len(grid)].cumsum(dim=1)


def softmax_rows(seed: int, n: int = 6, v: int = 300, scale: float = 6.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, v, generator=g) * scale, dim=-1)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.5, 30.0))
def test_octave_bins_equal_a_binary_search(seed: int, scale: float) -> None:
    p = softmax_rows(seed, scale=scale)
    assert dvp._exponents(p) is not None  # the fast path is the one tested
    minp, absolute = dvp.pruned_mass_grids(p, RHO_GRID)
    assert torch.equal(minp, reference_grid(p, RHO_GRID, "min-p"))
    assert torch.equal(absolute, reference_grid(p, RHO_GRID, "absolute"))
    assert torch.equal(minp, dvp.pruned_mass_grid(p, RHO_GRID, "min-p"))


def test_octave_bins_at_the_thresholds_themselves() -> None:
    """A probability equal to a threshold is kept (p >= t), one just below it is pruned,
    zeros and subnormals fall in the first bin, in both rules."""
    g = torch.tensor(RHO_GRID, dtype=torch.float32)
    row = torch.cat([g, torch.nextafter(g, torch.zeros(())), torch.tensor([0.0, 1e-44, 1.0])])
    p = torch.stack([row, row.flip(0)])
    minp, absolute = dvp.pruned_mass_grids(p, RHO_GRID)
    assert torch.equal(absolute, reference_grid(p, RHO_GRID, "absolute"))
    assert torch.equal(minp, reference_grid(p, RHO_GRID, "min-p"))


@pytest.mark.parametrize(
    "probs",
    [
        softmax_rows(1).double(),  # not float32: the binary search
        torch.where(softmax_rows(2) < 1e-4, torch.tensor(-0.0), softmax_rows(2)),  # sign bit
    ],
    ids=["float64", "negative-zero"],
)
def test_the_fallbacks_give_the_same_grid(probs: torch.Tensor) -> None:
    minp, absolute = dvp.pruned_mass_grids(probs, RHO_GRID)
    assert torch.equal(minp, reference_grid(probs, RHO_GRID, "min-p"))
    assert torch.equal(absolute, reference_grid(probs, RHO_GRID, "absolute"))


def test_close_thresholds_take_the_binary_search() -> None:
    """Thresholds closer than a factor 2 share an octave: `_octave_bins` declines."""
    grid = (1e-3, 1.5e-3, 0.1)
    p = softmax_rows(3)
    thr = torch.tensor(grid)[None].expand(len(p), -1)
    assert dvp._octave_bins(p, thr, dvp._exponents(p)) is None
    assert torch.equal(
        dvp.pruned_mass_grid(p, grid, "absolute"), reference_grid(p, grid, "absolute")
    )


def test_fused_function_equals_the_eager_pass() -> None:
    """What torch.compile runs, run eagerly: the same entropy and grids to float32 rounding."""
    z = torch.randn(8, 500, generator=torch.Generator().manual_seed(4)) * 5
    logp, p = torch.log_softmax(z, -1), torch.softmax(z, -1)
    g = torch.tensor(RHO_GRID, dtype=torch.float32)
    h, minp, absolute = _fused_stats(p, logp, p.amax(1, keepdim=True) * g, g)
    ref_minp, ref_abs = dvp.pruned_mass_grids(p, RHO_GRID)
    torch.testing.assert_close(h, _entropy(p, logp, finite=True), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(minp, ref_minp, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(absolute, ref_abs, rtol=1e-5, atol=1e-7)


def test_entropy_of_a_truncated_row_has_no_nan() -> None:
    """finite=True is a hint: a -inf log-prob (p = 0) still contributes 0, not NaN."""
    logp = torch.log_softmax(torch.tensor([[0.0, 1.0, -float("inf")]]), -1)
    h = _entropy(logp.exp(), logp, finite=True)
    assert torch.isfinite(h).all()
    np.testing.assert_allclose(h.item(), _entropy(logp.exp(), logp, finite=False).item())


def _inputs(n: int, v: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g) * 4
    tokens = torch.randint(0, v, (n,), generator=g)
    ids = torch.randint(0, v, (n, 5), generator=g)
    lq_topk = torch.log_softmax(logits, -1).gather(1, ids) + 0.01
    lq = torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0] - 0.02
    return logits, tokens, ids, lq_topk, lq


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=0.8, top_p=0.9)])
def test_slicing_the_rows_changes_nothing(sampling: Sampling) -> None:
    args = _inputs(37, 211)
    one = score_logits(*args, sampling, 5, PositionPass(1, 0, 0, "test"))
    all_ = score_logits(*args, sampling, 5, PositionPass(64, 0, 0, "test"))
    some = score_logits(*args, sampling, 5, PositionPass(10, 0, 0, "test"))
    for k in all_:
        for other in (one, some):
            if all_[k].dtype.is_floating_point:
                torch.testing.assert_close(other[k], all_[k], rtol=0, atol=2e-6, equal_nan=True)
            else:
                assert torch.equal(other[k], all_[k]), k


def test_a_failing_compile_falls_back_to_eager_with_one_warning(monkeypatch) -> None:
    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("no C compiler\nmore detail")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    warnings: list[str] = []
    plan = PositionPass(16, 0, 0, "test", compiled=True, warn=warnings.append)
    args = _inputs(40, 100, seed=5)
    got = score_logits(*args, Sampling(), 5, plan)
    ref = score_logits(*args, Sampling(), 5, PositionPass(16, 0, 0, "test"))
    assert not plan.compiled
    assert warnings == ["torch.compile of the per-position pass failed (no C compiler); eager"]
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    ("text", "expect"),
    [("2GiB", 2 << 30), ("512MiB", 512 << 20), ("1.5GB", 1_500_000_000), ("64 kib", 65536),
     (None, None), ("", None)],
)  # fmt: skip
def test_parse_size(text, expect) -> None:
    assert parse_size(text, "--rescore-memory") == expect


@pytest.mark.parametrize("text", ["2", "2XB", "-1GiB", "0MiB", "lots"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(MismatchError, match="--rescore-memory expects a size"):
        parse_size(text, "--rescore-memory")


def test_the_budget_sets_the_rows() -> None:
    V, s = 49_152, Sampling()
    per_row = rescore.bytes_per_row(V, s)
    assert per_row == rescore.ARRAYS_PER_ROW * 4 * V
    assert rescore.bytes_per_row(V, Sampling(top_p=0.9)) > per_row  # the sort needs more
    assert rescore.rows_for_budget(V, s, 1, "cuda") == 1  # at least one row
    assert rescore.rows_for_budget(V, s, 10 * per_row, "cuda") == 10
    cpu = rescore.rows_for_budget(V, s, 1 << 40, "cpu")  # a CPU keeps cache-sized slices
    assert cpu == rescore.CPU_SLICE_BYTES // (4 * V)


def test_plan_records_where_its_budget_came_from(tiny_llama, monkeypatch) -> None:
    monkeypatch.setenv(rescore.COMPILE_ENV, "0")
    plan = rescore.plan_pass(tiny_llama, Sampling(), memory=3 * 4 * 97 * rescore.ARRAYS_PER_ROW)
    assert plan.record() == {
        "rows": 3, "budget_bytes": 3 * 4 * 97 * 6, "bytes_per_row": 4 * 97 * 6,
        "budget_source": "--rescore-memory", "compiled": False,
    }  # fmt: skip
    auto = rescore.plan_pass(tiny_llama, Sampling())
    assert auto.budget_source == "25% of the memory free on cpu, at most 2 GiB"
    assert 0 < auto.budget_bytes <= rescore.DEFAULT_MEMORY_CAP
    monkeypatch.setattr(rescore, "free_memory", lambda dev=None: 80 << 30)  # an 80 GB GPU
    assert rescore.plan_pass(tiny_llama, Sampling()).budget_bytes == 2 << 30
    monkeypatch.setenv(rescore.COMPILE_ENV, "auto")
    assert rescore.compile_wanted("cpu", rescore.COMPILE_MIN_ROWS)
    assert not rescore.compile_wanted("cpu", rescore.COMPILE_MIN_ROWS - 1)
    assert not rescore.compile_wanted("cuda", 10**9)


def test_the_compiled_pass_equals_the_eager_one() -> None:
    """torch.compile for real (the default on a CPU for large runs): to float32 rounding,
    with rows of varying count (dynamic shapes, one compile) and a single row."""
    plan = PositionPass(16, 0, 0, "test", compiled=True)
    eager = PositionPass(16, 0, 0, "test")
    for n in (40, 23, 1):
        args = _inputs(n, 300, seed=n)
        got = score_logits(*args, Sampling(), 5, plan)
        ref = score_logits(*args, Sampling(), 5, eager)
        assert plan.compiled, "torch.compile failed on this machine"
        for k in ref:
            if ref[k].dtype.is_floating_point:
                torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, equal_nan=True)
            else:
                assert torch.equal(got[k], ref[k]), k
