"""Compiled loops for the streamed passes' hot spots (numba): one pass over a batch where numpy
would make one pass per operation. What brings `report` on 10^8 tokens near the speed of
reading them (docs/architecture.md, "Performance on real-shaped runs").

- `sketch_add`: values into a `quantiles.QuantileSketch` (bucket key, count, exact min / max)
  from their logs, which numpy's vectorised log computes block by block (four times the
  speed of a compiled loop's scalar log here);
- `bucket_codes`: each token's probability bucket; `row_sums` the same with the rows per
  bucket and per sequence and the sequences' sums of 1 - p;
- `group_sums`: per-bucket sums and non-finite counts of a column (the distribution level);
- `run_starts` / `expand_runs`: a batch's runs of one sequence, and its rows' sequence
  indices from them;
- `keyed_sums`: the per-group sums of `report --group-by` and `by_position`;
- `segment_rows`: per-sequence float64 sums of a [n, G] grid (the pruned-mass columns);
  `segment_counts` the same of a bool or integer column;
- `split_sums`: a column's sums over the rows a correction keeps and those it masks;
- `level_sums` / `column_stats`: a sweep batch's sums and maxima per level, and the totals
  and maxima of its pruned-mass grid (the sweep, `plot` and `corrections` share them);
- `finite_sums`: every token sum `aggregates.Aggregates` takes of a batch's finite tokens
  (bucket x tail moments, the fit's sums, the RL metrics' sums, the eps each token needs,
  the per-sequence partial sums), two loops over the batch (`finite_loop`) instead of ~60
  numpy passes; its exp / expm1 / log1p per token stay numpy's, vectorised, as the
  sketch's log does.

Each computes what the numpy code it replaced computed, with the same formulas in the same
order per value; sums are accumulated one value after another (numpy sums pairwise), so
they agree up to the order of float additions, and a bucket key can differ where the log's
last bit does (the sketch's error bound holds either way). Compiled on first use and cached
on disk (`cache=True`: beside `_kernels.py`, or numba's user cache where that is read-only);
`nogil`, so a reader thread decodes the next batch meanwhile. Floats follow numpy's error
model (x / 0 is inf or NaN, never an exception).

Importing this module does not import numba (about a second): each kernel is compiled (or
loaded from the cache) on its first use, from `_kernels`, so a trainer importing `monitor`
pays for it only when a step is added. Loading numba also loads llvmlite, whose FFI object
answers any attribute, `__dict__` included; vLLM 0.32 starting an in-process engine (TRL's
colocate mode) scans every loaded module's objects and failed on it, so `_kernels` makes
that object refuse dunder names (tests/test_trl.py runs the engine after the monitor).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# the scalar sums `finite_sums` writes, in this order (aggregates.Aggregates reads them)
SUMS = (
    "sum_ad", "sxx", "sxy", "syy", "max_ad", "n_cover_inf",
    "sum_k2", "sum_k3", "sum_r", "sum_r2", "min_r", "max_r", "sum_chi2", "n_outside",
    "sum_dp", "max_dp", "sum_pt", "sum_pi", "m2_ad", "m2_pt", "m2_pi", "co_p", "n_cand",
)  # fmt: skip

_KERNELS = (  # the public functions of `_kernels`
    "any_negative",
    "bucket_codes",
    "column_stats",
    "expand_runs",
    "finite_loop",
    "group_sums",
    "keyed_sums",
    "level_sums",
    "row_sums",
    "run_starts",
    "segment_counts",
    "segment_rows",
    "sketch_add",
    "split_sums",
)


def __getattr__(name: str) -> Any:
    """A kernel, compiled on first use (module doc)."""
    if name not in _KERNELS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import _kernels

    fn = getattr(_kernels, name)
    globals()[name] = fn  # later uses skip this hook
    return fn


def finite_sums(
    d: np.ndarray,
    p: np.ndarray,
    pt: np.ndarray,
    pi: np.ndarray,
    bucket: np.ndarray,
    local: np.ndarray,
    tail: float,
    caps: np.ndarray,
    log_band: float,
    clamp: float,
    groups: int,
    seqs: int,
    line: float,
    ad: np.ndarray,
    x: np.ndarray,
    k3: np.ndarray,
    cover: np.ndarray,
    *sums: np.ndarray,
) -> None:
    """Every token sum of one batch's finite tokens (`_kernels.finite_loop` says which):
    the transcendental functions per token (expm1 of |delta| and of -delta, exp of the
    clamped log-ratio, the log1p of the eps to cover) vectorised here by numpy, whose
    SIMD exp / expm1 / log1p take about 1 ns a value here against 5-10 for a compiled
    loop's scalar calls (the same functions as metrics.py and theory.py), the rest in one
    compiled pass. Writes |delta| `ad`, 1 - p `x`, k3_t `k3` and the eps each token needs
    `cover` [m] (theory.eps_to_cover), and `sums` as `finite_loop` does."""
    from . import _kernels

    np.abs(d, out=ad)
    with np.errstate(over="ignore"):  # inf for |delta| > ~709, as the compiled loop had
        ea = np.expm1(ad)
        lr = np.negative(d)
        em1 = np.expm1(lr)
    rr = np.exp(np.clip(lr, -clamp, clamp, out=lr), out=lr)
    _kernels.finite_loop(
        d, ea, em1, rr, p, pt, pi, bucket, local, tail, caps, log_band, clamp, groups, seqs,
        line, ad, x, k3, cover, *sums,
    )  # fmt: skip
    np.log1p(cover, out=cover)
    cover *= 0.5


__all__ = ["SUMS", "finite_sums"]
