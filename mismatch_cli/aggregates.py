"""The report's streamed pass: `scan` reads a token table in batches and adds each one into
mergeable aggregates (`Aggregates`), from which `analysis.report` builds the report dict.
What lets `report`, `plot` and `compare` read runs of 10^8 tokens in bounded memory.

Each batch is split once into finite and infinite deltas (`Batch`, shared by every
accumulator); the aggregates are counts, float64 sums, means and squared deviations merged
batch by batch (`Moments`, Chan et al.), bincounts per probability bucket, per-sequence
partial sums in S-sized arrays (a sequence split across batches is summed in parts), and
quantiles from `quantiles.QuantileAccumulator` (exact while at most `exact_limit` values
were added, the mergeable sketch beyond: relative error <= 0.5%). One pass: the sequences
are added as batches bring them (`Aggregates.add_sequences`; a first pass over seq_id only
for `flag_infinite` or an extra that `needs_sequences`); eps (q0.99 of eps_hat, or of the
eps needed without it) is learnt in the same pass, and the envelope counts at it come from
the candidates kept in it (`EnvelopeCandidates`), with a pass of their own only when those
fall short. Every statistic is exact (equal to an in-memory computation up to the order of
float additions) except quantiles beyond the exact limit. Extras (`Extra`: the figures'
histograms, `analysis.GroupAccumulator`) see every batch of the second pass.
Conventions: `analysis` (module doc). Importing this module does not import torch.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from . import kernels, theory
from . import metrics as M
from .errors import MismatchError
from .formatting import number_list
from .frames import is_frame
from .per_sequence import BatchSeqs, SeqIndex, distinct, runs
from .quantiles import EXACT_LIMIT, QuantileAccumulator, sketch_label
from .schema import COARSE_COLUMNS
from .tokens import BATCH_ROWS, TokenBatches, check_by, frame_tokens, open_run_tokens, prefetch

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_EDGES: tuple[float, ...] = (
    0.0,
    1e-6,
    1e-5,
    1e-4,
    1e-3,
    1e-2,
    0.1,
    0.5,
    0.9,
    0.99,
    0.999,
    1.0,
)
DEFAULT_TAIL = 0.1
QUANTILES = (0.5, 0.9, 0.99)
# The columns a token DataFrame must have (a run's tokens.parquet: tokens.REQUIRED_COLUMNS);
# without eps_hat, eps comes from the data; without kept_train every token is kept.
NEEDED_COLUMNS: tuple[str, ...] = ("seq_id", "delta", "p_train", "p_infer")
EPS_HAT_QUANTILES = (0.5, 0.9, 0.99, 1.0)
NO_EPS_HAT_ESTIMATOR = (
    "q0.99 of the eps needed to cover |delta| (this run has no eps_hat: a check of the "
    "(1 - p) shape, not an independent bound)"
)
COARSE_QUANTILES = (0.9, 0.99)
# |delta|'s quantiles: per bucket (p50, p90, p99, max) and over every token, asked together
AD_BUCKET = (*QUANTILES, 1.0)
AD_MERGED = (0.99,)
_LOG_BAND = math.log(M.RATIO_BAND[1])  # |delta| above it: r outside [1/2, 2]
_CAPS = np.asarray(M.CAPS, dtype=np.float64)


def _f64(a: np.ndarray) -> np.ndarray:
    """a as a contiguous float64 array (no copy when it is one)."""
    return np.ascontiguousarray(a, dtype=np.float64)


# ----------------------------------------------------------------------------- inputs


def parse_edges(edges: str | Sequence[float] | None) -> np.ndarray:
    """Bucket edges from '0,1e-3,0.1,1' or a sequence (None: DEFAULT_EDGES), validated:
    at least two, finite, strictly increasing, inside [0, 1]. Raises MismatchError."""
    if edges is None:
        return np.asarray(DEFAULT_EDGES, dtype=np.float64)
    if isinstance(edges, str):
        try:
            values = [float(s) for s in edges.replace(" ", "").split(",") if s != ""]
        except ValueError as e:
            raise MismatchError(
                f"--edges must be comma-separated numbers, e.g. 0,1e-3,0.1,1; got {edges!r}"
            ) from e
    else:
        values = [float(v) for v in edges]
    e = np.asarray(values, dtype=np.float64)
    if e.size < 2:
        raise MismatchError(f"--edges needs at least two values, got {e.size}")
    if not np.all(np.isfinite(e)) or e.min() < 0 or e.max() > 1:
        raise MismatchError(f"--edges must lie in [0, 1], got {number_list(e, ',')}")
    if np.any(np.diff(e) <= 0):
        raise MismatchError(f"--edges must be strictly increasing, got {number_list(e, ',')}")
    return e


# ----------------------------------------------------------------------------- buckets


def _bucket_codes(p: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bucket of each p: i with edges[i] <= p < edges[i+1], p == edges[-1] in the last
    bucket, and nb = len(edges) - 1 for p outside [edges[0], edges[-1]] or NaN. [n] -> [n]
    intp, in one compiled pass (`kernels.bucket_codes`)."""
    out = np.empty(np.shape(p), dtype=np.intp)
    kernels.bucket_codes(_f64(p).reshape(-1), np.asarray(edges, np.float64), out.reshape(-1))
    return out


def bucket_index(p: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bucket of each p: i with edges[i] <= p < edges[i+1]; p == edges[-1] goes to the last
    bucket; -1 for p outside [edges[0], edges[-1]]. [n] -> [n] int64"""
    e = np.asarray(edges, dtype=np.float64)
    idx = _bucket_codes(p, e).astype(np.int64)
    idx[idx == len(e) - 1] = -1
    return idx


# ----------------------------------------------------------------------------- streaming


class Moments:
    """Count, mean and sum of squared deviations M2 of values in groups (any array shape),
    merged batch by batch with Chan, Golub and LeVeque's update:

        n = n_a + n_b,  mean = mean_a + (mean_b - mean_a) n_b / n,
        M2 = M2_a + M2_b + (mean_b - mean_a)^2 n_a n_b / n

    One batch gives exactly the two-pass result (mean = sum / n, M2 = sum (x - mean)^2);
    several give it up to the order of float additions, free of the cancellation of
    sum x^2 - n mean^2. Empty groups keep n = 0, mean = 0, M2 = 0."""

    def __init__(self, shape: int | tuple[int, ...] = ()) -> None:
        self.n = np.zeros(shape, dtype=np.int64)
        self.mean = np.zeros(shape)
        self.m2 = np.zeros(shape)

    def add(self, values: np.ndarray, group: np.ndarray | None = None) -> None:
        """Add values [m] to their flat groups [m] (None: one group, shape ())."""
        if group is None:
            n_b = np.int64(values.size)
            if not n_b:
                return
            mean_b = np.float64(values.sum() / n_b)
            dev = values - mean_b
            m2_b = np.float64(dev @ dev)
        else:
            G = self.n.size
            n_b = np.bincount(group, minlength=G)  # [G]
            with np.errstate(invalid="ignore", divide="ignore"):
                mean_b = np.bincount(group, weights=values, minlength=G) / n_b
            mean_b[n_b == 0] = 0.0
            dev = values - mean_b[group]  # [m]
            m2_b = np.bincount(group, weights=dev * dev, minlength=G)
            n_b, mean_b, m2_b = (a.reshape(self.n.shape) for a in (n_b, mean_b, m2_b))
        self.merge(n_b, mean_b, m2_b)

    def merge(self, n_b: Any, mean_b: Any, m2_b: Any) -> None:
        """Merge another set of moments of the same shape into these."""
        n = self.n + n_b
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(n > 0, n_b / np.maximum(n, 1), 0.0)
        step = mean_b - self.mean
        self.mean = self.mean + step * frac
        self.m2 = self.m2 + m2_b + step * step * self.n * frac
        self.n = n

    def reduce(self, axis: int | None = None) -> Moments:
        """The moments of groups merged along `axis` (None: all of them)."""
        out = Moments()
        n = self.n.sum(axis=axis)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, (self.n * self.mean).sum(axis=axis) / np.maximum(n, 1), 0.0)
        dev = self.mean - (mean if axis is None else np.expand_dims(mean, axis))
        out.n, out.mean = n, mean
        out.m2 = self.m2.sum(axis=axis) + (self.n * dev * dev).sum(axis=axis)
        return out

    def mean_or_nan(self) -> Any:
        """mean, NaN where a group is empty."""
        return np.where(self.n > 0, self.mean, np.nan)

    def std(self, ddof: int = 0) -> Any:
        """Standard deviation sqrt(M2 / (n - ddof)), NaN where n <= ddof."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n > ddof, np.sqrt(self.m2 / (self.n - ddof)), np.nan)


class Batch:
    """One batch of token rows, split once into finite and infinite deltas: what every
    accumulator reads. `rows`: the columns as read, each [n]; `seq`: each row's sequence
    index 0..S-1 [n] (None in a pass that needs none). The finite tokens' arrays ([m]:
    delta, p, p_train, p_infer, ad = |delta|, x = 1 - p, bucket) are computed once, on
    first use. A delta is infinite when kept_train is False or delta is not finite; p is
    the `by` side's probability."""

    def __init__(
        self, rows: dict[str, np.ndarray], seq: np.ndarray | None, by: str, edges: np.ndarray
    ) -> None:
        self.rows, self.seq, self.by, self.edges = rows, seq, by, edges
        self._delta = np.asarray(rows["delta"], dtype=np.float64)  # [n]
        fin = np.isfinite(self._delta)
        if "kept_train" in rows:
            fin &= np.asarray(rows["kept_train"], dtype=bool)
        self.fin = fin  # [n]
        self.n = int(fin.size)
        self.all_finite = bool(fin.all())

    def finite(self, a: np.ndarray) -> np.ndarray:
        """The finite tokens' entries of a row array: [n] -> [m]."""
        return a if self.all_finite else a[self.fin]

    def column(self, name: str) -> np.ndarray:
        """A column as float64. [n]"""
        return np.asarray(self.rows[name], dtype=np.float64)

    @cached_property
    def m(self) -> int:
        return self.n if self.all_finite else int(np.count_nonzero(self.fin))

    @cached_property
    def delta(self) -> np.ndarray:
        return self.finite(self._delta)

    @cached_property
    def p_all(self) -> np.ndarray:
        return self.column(f"p_{self.by}")

    @cached_property
    def p(self) -> np.ndarray:
        return self.finite(self.p_all)

    @cached_property
    def p_train(self) -> np.ndarray:
        return self.p if self.by == "train" else self.finite(self.column("p_train"))

    @cached_property
    def p_infer(self) -> np.ndarray:
        return self.p if self.by == "infer" else self.finite(self.column("p_infer"))

    @cached_property
    def ad(self) -> np.ndarray:
        return np.abs(self.delta)

    @cached_property
    def k3(self) -> np.ndarray:
        """k3_t of each finite token (`metrics.k3_per_token`), shared by every accumulator. [m]"""
        return M.k3_per_token(self.delta)

    @cached_property
    def x(self) -> np.ndarray:
        return 1.0 - self.p

    @cached_property
    def bucket_all(self) -> np.ndarray:
        """Bucket of every row, finite delta or not (intp, what bincount and the sketches
        index with), nb outside the edges. [n]"""
        return _bucket_codes(self.p_all, self.edges)

    @cached_property
    def bucket(self) -> np.ndarray:
        """Bucket of each finite token. [m]"""
        return self.finite(self.bucket_all)

    @cached_property
    def bucket_infinite(self) -> np.ndarray:
        """Bucket of each token with an infinite delta. [n - m]"""
        return self.bucket_all[~self.fin]

    @cached_property
    def seqs(self) -> BatchSeqs:
        """The batch's sequences over every row."""
        assert self.seq is not None
        return BatchSeqs(self.seq)

    def full(self, a: np.ndarray) -> np.ndarray:
        """A finite tokens' array back on every row, 0 on the infinite ones: [m] -> [n]."""
        if self.all_finite:
            return a
        out = np.zeros(self.n, dtype=a.dtype)
        out[self.fin] = a
        return out


ENVELOPES = ("first_order", "exact", "weak", "two_eps")


class EnvelopeCounts:
    """Finite tokens above each envelope at one eps (first order 2 eps (1 - p), exact
    log(1 + (1 - p)(exp(2 eps) - 1)), weak (exp(2 eps) - 1)(1 - p), flat 2 eps), and above
    the exact and first-order ones per bucket. Its own accumulator: eps must be known
    before the first batch (a run without eps_hat learns it from a pass over |delta|)."""

    def __init__(self, eps: float, num_buckets: int) -> None:
        self.eps = float(eps)
        self.above = dict.fromkeys(ENVELOPES, 0)
        self.by_bucket = {k: np.zeros(num_buckets + 1, np.int64) for k in ENVELOPES[:2]}

    def add(self, b: Batch) -> None:
        if b.m:
            self.add_tokens(b.ad, b.x, b.bucket)

    def add_tokens(self, ad: np.ndarray, x: np.ndarray, bucket: np.ndarray) -> None:
        """Count finite tokens: |delta| [m], 1 - p [m], bucket [m]."""
        eps = self.eps
        if not math.isfinite(eps) or not ad.size:
            return
        above = {
            "first_order": ad > theory.envelope_first_order(x, eps),
            "exact": ad > theory.envelope_exact(x, eps),
            "weak": ad > theory.envelope_weak(x, eps),
            "two_eps": ad > 2.0 * eps,
        }
        for k, mask in above.items():
            self.above[k] += int(np.count_nonzero(mask))
        for k, acc in self.by_bucket.items():
            acc += np.bincount(bucket[above[k]], minlength=acc.size)


# The first batch's own eps estimate times this is the floor of `EnvelopeCandidates`; the
# candidates kept at most (|delta|, 1 - p, bucket: 17 bytes each, ~140 MB).
FLOOR_SHARE = 0.5
CANDIDATE_LIMIT = 1 << 23


class EnvelopeCandidates:
    """The envelope counts in the main pass although eps is learnt from that same pass (the
    q0.99 of eps_hat, or of the eps needed without eps_hat): the finite tokens that could
    lie above an envelope at ANY eps >= `floor` are kept as (|delta|, 1 - p, bucket) and
    counted by `EnvelopeCounts` once eps is known, with the very same comparisons, so the
    counts are those of a pass at that eps, exactly.

    A token is a candidate unless |delta| <= 2 floor' min(1 - p, 1), floor' = floor (1 -
    1e-6): the first-order envelope is the lowest of the four for 1 - p in [0, 1] (exact
    >= first order by concavity, weak >= exact, 2 eps >= exact), every envelope grows with
    eps, and the margin absorbs their rounding. `floor` is FLOOR_SHARE of the first batch's
    own estimate. `complete(eps)` is False when the counts need a pass of their own after
    all: eps fell below the floor, or more than `limit` tokens were candidates."""

    def __init__(self, limit: int | None = None) -> None:
        self.floor: float | None = None
        self.limit = CANDIDATE_LIMIT if limit is None else int(limit)
        self.overflow = False
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._n = 0

    def set_floor(self, guess: float) -> None:
        """The floor, from the first batch's own eps estimate `guess`."""
        self.floor = FLOOR_SHARE * guess if math.isfinite(guess) and guess > 0 else 0.0

    @property
    def line(self) -> float:
        """A token is a candidate when |delta| > line min(1 - p, 1); -1 when none is kept
        any more (too many)."""
        assert self.floor is not None
        return -1.0 if self.overflow else 2.0 * (self.floor * (1.0 - 1e-6))

    def keep(self, b: Batch, idx: np.ndarray) -> None:
        """Keep the batch's candidates, the finite tokens at idx [k] (the kernel's picks)."""
        if self.overflow or not idx.size:
            return
        self._n += idx.size
        if self._n > self.limit:
            self.overflow, self._parts = True, []
            return
        code = np.min_scalar_type(len(b.edges))  # int8 for the usual dozen buckets
        self._parts.append((b.ad[idx], b.x[idx], b.bucket[idx].astype(code)))

    def complete(self, eps: float) -> bool:
        """Do the candidates hold every token above an envelope at eps?"""
        if self.overflow:
            return False
        return self.floor is None or not math.isfinite(eps) or eps >= self.floor

    def count(self, env: EnvelopeCounts) -> None:
        """Add the candidates into `env` (eps set, `complete(env.eps)` True)."""
        for ad, x, bucket in self._parts:
            env.add_tokens(ad, x, bucket)


class _Coarse:
    """One distribution-level column: finite values' count and sum, non-finite count, and
    quantiles, per bucket of p (nb = outside the edges)."""

    def __init__(self, num_buckets: int, exact_limit: int) -> None:
        G = num_buckets + 1
        self.n, self.n_inf = np.zeros(G, np.int64), np.zeros(G, np.int64)
        self.sum = np.zeros(G)
        self.q = QuantileAccumulator(G, exact_limit)

    def add(self, v: np.ndarray, bucket: np.ndarray, rows: np.ndarray) -> None:
        """Add a batch's values v [n] with their buckets [n] (intp) and the batch's rows
        per bucket [G] (the count of finite values is rows less the non-finite ones)."""
        v = _f64(v)
        inf = np.zeros(self.n.size, np.int64)
        kernels.group_sums(v, bucket, inf, self.sum)
        self.n_inf += inf
        self.n += rows - inf
        self.q.add(v, bucket)  # the non-finite values are left out there


def quantile_with_inf(acc: QuantileAccumulator, q: float, num_inf: int) -> float:
    """numpy's linear q-quantile of acc's values plus `num_inf` values of +inf (ranked
    last): +inf when its upper order statistic is one of them, NaN with no value."""
    n_fin = acc.count
    n = n_fin + num_inf
    if n == 0:
        return math.nan
    if not num_inf:
        return float(acc.quantile(q)[0, 0])
    h = q * (n - 1)  # fractional 0-based rank
    if math.ceil(h) >= n_fin:
        return math.inf
    return float(acc.quantile(h / (n_fin - 1) if n_fin > 1 else 0.0)[0, 0])


class Extra(Protocol):
    """What a `scan` can feed besides the report: `columns` it reads, `start(agg)` before
    the main pass, `add(batch)` for each batch of it. An extra that sizes arrays by the
    sequences in `start` sets `needs_sequences = True`: the scan then lists them in a
    first pass (otherwise the sequence index grows as the batches come, and `batch.seq`
    numbers a sequence by its place among those seen so far). One whose `add` reads only
    the batch and its own state sets `beside = True`: it then runs in the pass's worker
    thread (`Aggregates.side_thread`), its results read after `Scanner.finish`."""

    columns: tuple[str, ...]

    def start(self, agg: Aggregates) -> None: ...

    def add(self, b: Batch) -> None: ...


class _Side:
    """A worker thread that runs accumulator adds beside the main pass (the quantile
    sketches, the distribution-level columns, extras with `beside`; their compiled loops
    and numpy release the GIL, their Python does not), so that on two cores they overlap
    the rest of the batch's work. Tasks run in the order
    given; at most two batches' tasks are pending (their arrays held), and `settle` waits
    for every one (raising the first error) before anything reads what they add into."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mismatch-side")
        self._batches: deque[list[Future]] = deque()

    def start_batch(self) -> None:
        self._batches.append([])
        while len(self._batches) > 2:
            for f in self._batches.popleft():
                f.result()

    def run(self, fn: Callable[..., None], *args: Any, **kw: Any) -> None:
        if not self._batches:
            self._batches.append([])
        self._batches[-1].append(self._pool.submit(fn, *args, **kw))

    def settle(self) -> None:
        try:
            while self._batches:
                for f in self._batches.popleft():
                    f.result()
        finally:
            self._batches.clear()

    def close(self) -> None:
        try:
            self.settle()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


class Aggregates:
    """Everything `report` (and the figures) read of a token table, accumulated batch by
    batch in memory independent of the number of tokens: (bucket x tail) moments of delta,
    sums of |delta| and 1 - p, the RL metrics' token sums, per-sequence sums [S], and
    quantile accumulators. `add(batch)` for each batch of the main pass; the tables come
    from the methods (`buckets`, `tail_bias`, `sequences`, `metrics`, ...)."""

    def __init__(
        self,
        edges: np.ndarray,
        by: str,
        tail: float,
        seq_ids: np.ndarray,
        eps_hat: QuantileAccumulator,
        coarse: Sequence[str] = (),
        exact_limit: int = EXACT_LIMIT,
    ) -> None:
        self.edges, self.by, self.tail = edges, by, float(tail)
        self.nb = nb = len(edges) - 1
        self.seq_ids = seq_ids  # [S]
        self.eps_hat_acc = eps_hat
        self.eps: float | None = None
        self.eps_estimator = ""
        self.envelope: EnvelopeCounts | None = None
        self.candidates: EnvelopeCandidates | None = None  # eps learnt in the main pass
        self.seq_infinite: np.ndarray | None = None  # [S] bool, from the first pass if asked
        self.exact_limit = exact_limit
        self.num_tokens = 0
        G = (nb + 1, 2)  # (bucket incl. "outside", head / tail)
        self.delta = Moments(G)  # of delta
        self.sum_ad, self.sum_x = np.zeros(G), np.zeros(G)
        self.abs_delta = Moments()  # of |delta|, all finite tokens
        self.sxx = self.sxy = self.syy = 0.0  # the fit's sums: x = 1 - p, y = |delta|
        self.max_ad = -math.inf
        self.n_inf_bucket = np.zeros(nb + 1, np.int64)
        self.q_ad = QuantileAccumulator(nb + 1, exact_limit)  # |delta| by bucket
        self.q_cover = QuantileAccumulator(1, exact_limit)  # eps needed per token
        self.n_cover_inf = 0
        self._eps_needed: dict[float, float] = {}
        # RL metrics: sums over finite tokens
        self.sum_k2 = self.sum_k3 = self.sum_r = self.sum_r2 = self.sum_chi2 = 0.0
        self.min_r, self.max_r = math.inf, -math.inf
        self.above_cap = np.zeros(len(M.CAPS), np.int64)
        self.n_outside = 0  # finite tokens with r = exp(-delta) outside metrics.RATIO_BAND
        self.sum_dp, self.max_dp = 0.0, -math.inf
        self.p_train, self.p_infer = Moments(), Moments()
        self.comoment = 0.0  # sum (p_train - mean)(p_infer - mean), merged like M2
        # per sequence [S]
        S = seq_ids.size
        self.seq_n, self.seq_n_fin = np.zeros(S, np.int64), np.zeros(S)
        self.seq_sum_d, self.seq_sum_ad, self.seq_sum_x = np.zeros(S), np.zeros(S), np.zeros(S)
        self.seq_tail_n, self.seq_tail_d = np.zeros(S), np.zeros(S)
        # distribution level
        self.rows_bucket = np.zeros(nb + 1, np.int64)
        self.coarse = {c: _Coarse(nb, exact_limit) for c in coarse}
        self._side: _Side | None = None  # `side_thread`

    def side_thread(self) -> None:
        """Run the quantile and distribution-level adds in a worker thread from now on
        (`_Side`); `settle` before reading any result, `close_side` when done."""
        if self._side is None:
            self._side = _Side()

    def settle(self) -> None:
        """Wait for the worker thread's pending adds (a no-op without one)."""
        if self._side is not None:
            self._side.settle()

    def close_side(self) -> None:
        """Settle, then stop the worker thread: the adds run in the caller's thread again."""
        side, self._side = self._side, None
        if side is not None:
            side.close()

    def later(self, fn: Callable[..., None], *args: Any, **kw: Any) -> None:
        """fn(*args, **kw) in the worker thread when there is one, else now."""
        if self._side is None:
            fn(*args, **kw)
        else:
            self._side.run(fn, *args, **kw)

    # ------------------------------------------------------------------ accumulation

    def set_eps(self, eps: float, estimator: str) -> bool:
        """The eps of the envelopes: before the main pass, or after it when the envelope
        counts were deferred (`defer_envelopes`). False when they still need a pass of
        their own (`count_envelopes`)."""
        self.eps, self.eps_estimator = float(eps), estimator
        self.envelope = EnvelopeCounts(eps, self.nb)
        cand, self.candidates = self.candidates, None
        if cand is None:
            return True
        if not cand.complete(self.eps):
            return False
        cand.count(self.envelope)
        return True

    def defer_envelopes(self, limit: int | None = None) -> None:
        """Count the envelopes at an eps learnt from the main pass itself (`set_eps` after
        it), from the candidates kept as the batches come (`EnvelopeCandidates`)."""
        self.candidates = EnvelopeCandidates(limit)

    def _guess_eps(self, b: Batch) -> float:
        """A batch's own eps estimate: q0.99 of its eps_hat, else of the eps it needs."""
        v = b.rows.get("eps_hat")
        if v is not None:
            v = np.asarray(v, dtype=np.float64)
            v = v[np.isfinite(v)]
            if v.size:
                return float(np.quantile(v, theory.EPS_QUANTILE))
        cover = theory.eps_to_cover(b.ad, b.x)
        cover = cover[np.isfinite(cover)]
        return float(np.quantile(cover, theory.EPS_QUANTILE)) if cover.size else math.nan

    _PER_SEQUENCE = (
        "seq_n", "seq_n_fin", "seq_sum_d", "seq_sum_ad", "seq_sum_x", "seq_tail_n", "seq_tail_d"
    )  # fmt: skip

    def extend_sequences(self, ids: np.ndarray) -> None:
        """Add sequences (ids [k], sorted, all above the current ones) to the per-sequence
        arrays: for a stream whose batches bring new, whole sequences (a trainer's steps,
        `monitor.StepMonitor`), where no first pass can list them all."""
        ids = np.asarray(ids)
        if ids.size and self.seq_ids.size and ids[0] <= self.seq_ids[-1]:
            raise ValueError("new sequence ids must come after the current ones")
        S, k = self.seq_ids.size, ids.size
        names = ("seq_ids", *self._PER_SEQUENCE)
        buf = self.__dict__.setdefault("_seq_buffers", {})
        id_type = np.result_type(self.seq_ids.dtype, ids.dtype)
        views = buf and all(getattr(self, n).base is buf[n] for n in names)  # not after a copy
        if not views or buf["seq_ids"].size < S + k or buf["seq_ids"].dtype != id_type:
            # room for twice as many: appending a batch's sequences copies nothing, where
            # growing every array by concatenation cost O(S) per batch (O(S^2) per pass)
            cap = max(2 * (S + k), 1024)
            for name in names:
                a = getattr(self, name)
                dtype = id_type if name == "seq_ids" else a.dtype
                b = np.zeros(cap, dtype)
                b[:S] = a
                buf[name] = b
        buf["seq_ids"][S : S + k] = ids
        for name in names:
            setattr(self, name, buf[name][: S + k])  # views of the buffers
        self._forget()

    def add_sequences(self, ids: np.ndarray) -> None:
        """Make room for the sequences `ids` (distinct, sorted) in the per-sequence arrays,
        for `scan`'s one-pass mode: appended when they come after the current ones (the
        writers' order: a batch's first sequence may continue the last one), else merged
        in (the arrays re-spread: a table in another order costs a copy per batch)."""
        ids = np.asarray(ids)
        have = self.seq_ids
        if not ids.size:
            return
        if not have.size or ids[0] > have[-1]:
            self.extend_sequences(ids)
            return
        new = ids[ids > have[-1]]
        old = ids[ids <= have[-1]]
        at = np.minimum(np.searchsorted(have, old), have.size - 1)
        if bool(np.all(have[at] == old)):  # only the new ones are new
            if new.size:
                self.extend_sequences(new)
            return
        merged = np.union1d(have, ids)
        where = np.searchsorted(merged, have)  # [S_old] each old sequence's new index
        for name in self._PER_SEQUENCE:
            a = getattr(self, name)
            b = np.zeros(merged.size, a.dtype)
            b[where] = a
            setattr(self, name, b)
        self.seq_ids = merged
        self.__dict__.pop("_seq_buffers", None)  # the arrays are no longer views of them
        self._forget()

    def _forget(self) -> None:
        """Drop what was computed from the sums so far (they changed)."""
        for name in ("_sequences", "_eps_hat"):
            self.__dict__.pop(name, None)
        self._eps_needed.clear()

    def add(self, b: Batch) -> None:
        """Add one batch of token rows (main pass)."""
        nb1 = self.nb + 1
        if self._side is not None:
            self._side.start_batch()
        self.num_tokens += b.n
        s = b.seqs
        k = s.ids.size
        # every row, finite delta or not: its bucket, the rows per bucket and per sequence,
        # the sequences' sums of 1 - p (one compiled pass)
        bucket, rows = np.empty(b.n, np.intp), np.zeros(nb1, np.int64)
        seq_n, seq_x = np.zeros(k, np.int64), np.zeros(k)
        kernels.row_sums(_f64(b.p_all), self.edges, s.local, bucket, rows, seq_n, seq_x)
        b.__dict__["bucket_all"] = bucket
        self.seq_n[s.ids] += seq_n
        self.seq_sum_x[s.ids] += seq_x
        if not b.all_finite:
            self.n_inf_bucket += np.bincount(b.bucket_infinite, minlength=nb1)
        if self.coarse:
            self.rows_bucket += rows
            for c, acc in self.coarse.items():
                self.later(acc.add, b.column(c), b.bucket_all, rows)
        if "eps_hat" in b.rows:  # every row; NaN (imports) ignored
            self.later(self.eps_hat_acc.add, b.rows["eps_hat"])
        c = self.candidates
        if c is not None and c.floor is None and b.m:
            c.set_floor(self._guess_eps(b))
        if b.m:
            self._add_finite(b)  # the candidates' picks too
        if self.envelope is not None:
            self.envelope.add(b)
        self._forget()

    def _add_finite(self, b: Batch) -> None:
        """The finite tokens' sums, in one compiled pass (`kernels.finite_sums`); its |delta|,
        1 - p and k3_t become the batch's (`Batch.ad`, `x`, `k3`) for what reads them next."""
        m, nb1 = b.m, self.nb + 1
        G = nb1 * 2
        bs = b.seqs
        k = bs.ids.size
        ad, x, k3, cover = (np.empty(m) for _ in range(4))
        g_n, g_mean, g_m2, g_ad, g_x = np.empty(G, np.int64), *(np.empty(G) for _ in range(4))
        per_seq = [np.empty(k) for _ in range(5)]
        above = np.zeros(len(M.CAPS), np.int64)
        cands = self.candidates if self.envelope is None else None
        line = cands.line if cands is not None else -1.0
        picks = np.empty(m if line >= 0 else 0, np.intp)
        sums = np.empty(len(kernels.SUMS))
        kernels.finite_sums(
            b.delta, _f64(b.p), _f64(b.p_train), _f64(b.p_infer), b.bucket,
            b.finite(bs.local), self.tail, _CAPS, _LOG_BAND, M.LOG_RATIO_CLAMP, G, k, line,
            ad, x, k3, cover, g_n, g_mean, g_m2, g_ad, g_x, above, *per_seq, picks, sums,
        )  # fmt: skip
        v = dict(zip(kernels.SUMS, sums.tolist(), strict=True))
        b.__dict__.update(ad=ad, x=x, k3=k3)  # the cached properties, computed here
        if cands is not None:
            cands.keep(b, picks[: int(v["n_cand"])])
        shape = self.sum_ad.shape
        self.delta.merge(g_n.reshape(shape), g_mean.reshape(shape), g_m2.reshape(shape))
        self.sum_ad += g_ad.reshape(shape)
        self.sum_x += g_x.reshape(shape)
        self.abs_delta.merge(np.int64(m), np.float64(v["sum_ad"] / m), np.float64(v["m2_ad"]))
        self.sxx += v["sxx"]
        self.sxy += v["sxy"]
        self.syy += v["syy"]
        self.max_ad = max(self.max_ad, v["max_ad"])
        self.later(self.q_ad.add, ad, b.bucket, finite=True)
        self.n_cover_inf += int(v["n_cover_inf"])
        self.later(self.q_cover.add, cover)
        # the RL metrics' token sums (metrics.py: c = -delta clamped to +-20, r = exp(c))
        self.sum_k2 += v["sum_k2"]
        self.sum_k3 += v["sum_k3"]
        self.sum_r += v["sum_r"]
        self.sum_r2 += v["sum_r2"]
        self.min_r, self.max_r = min(self.min_r, v["min_r"]), max(self.max_r, v["max_r"])
        self.sum_chi2 += v["sum_chi2"]
        self.above_cap += above
        self.n_outside += int(v["n_outside"])  # r outside RATIO_BAND
        self.sum_dp += v["sum_dp"]
        self.max_dp = max(self.max_dp, v["max_dp"])
        self._merge_pearson(m, v)
        # per sequence: the batch's sequences' partial sums
        ids = bs.ids
        for acc, part in zip(
            (self.seq_n_fin, self.seq_sum_d, self.seq_sum_ad, self.seq_tail_n, self.seq_tail_d),
            per_seq,
            strict=True,
        ):
            acc[ids] += part

    def _merge_pearson(self, n_b: int, v: dict[str, float]) -> None:
        """Merge a batch's moments and co-moment of (p_train, p_infer) (Chan et al.)."""
        mt, mi = v["sum_pt"] / n_b, v["sum_pi"] / n_b
        a, b = self.p_train, self.p_infer
        frac = n_b / (a.n + n_b)
        self.comoment += v["co_p"] + float((mt - a.mean) * (mi - b.mean) * a.n * frac)
        a.merge(np.int64(n_b), np.float64(mt), np.float64(v["m2_pt"]))
        b.merge(np.int64(n_b), np.float64(mi), np.float64(v["m2_pi"]))

    def count_envelopes(self, batches: Iterable[dict[str, np.ndarray]]) -> None:
        """The envelope counts in a pass of their own (eps learnt from the main pass)."""
        assert self.envelope is not None
        for rows in batches:
            self.envelope.add(Batch(rows, None, self.by, self.edges))

    # ------------------------------------------------------------------ results

    @property
    def num_sequences(self) -> int:
        return int(self.seq_ids.size)

    @property
    def num_finite(self) -> int:
        return int(self.delta.n.sum())

    @property
    def num_infinite(self) -> int:
        return self.num_tokens - self.num_finite

    @property
    def exact(self) -> bool:
        """Are all quantiles exact (every accumulator under its limit)?"""
        accs = [self.q_ad, self.q_cover, self.eps_hat_acc, *(c.q for c in self.coarse.values())]
        return all(a.exact for a in accs)

    def quantiles_label(self) -> str:
        """'exact', or which sketch the quantiles beyond the exact limit come from."""
        return sketch_label(self.exact)

    def eps_hat(self) -> tuple[float, dict[str, float]]:
        """The data's eps estimate (q0.99 of the finite eps_hat; NaN if none) and the
        eps_hat quantiles p50 / p90 / p99 / max ({} if none)."""
        return self._eps_hat

    @cached_property
    def _eps_hat(self) -> tuple[float, dict[str, float]]:
        acc = self.eps_hat_acc
        if not acc.count:
            return math.nan, {}
        q = acc.quantile((*EPS_HAT_QUANTILES, theory.EPS_QUANTILE))[0]
        names = ("p50", "p90", "p99", "max")
        return float(q[-1]), {k: float(v) for k, v in zip(names, q, strict=False)}

    def eps_needed(self, q: float = 0.99) -> float:
        """The smallest eps whose exact envelope covers a fraction q of the finite tokens:
        the q-quantile of theory.eps_to_cover (+inf for |delta| > 0 at p = 1)."""
        if q not in self._eps_needed:  # an exact quantile of 10^7 values costs ~0.3 s
            self._eps_needed[q] = quantile_with_inf(self.q_cover, q, self.n_cover_inf)
        return self._eps_needed[q]

    def abs_delta_quantile(self, q: Sequence[float] | float) -> np.ndarray:
        """Quantiles of |delta| over every finite token. [Q]"""
        q = np.atleast_1d(np.asarray(q, dtype=np.float64))
        if set(q.tolist()) <= set(AD_MERGED):  # what the report reads: one computation
            every = self.q_ad.quantiles(AD_BUCKET, AD_MERGED)[1]
            return every[[AD_MERGED.index(v) for v in q.tolist()]]
        return self.q_ad.quantile_merged(q)

    def buckets(self) -> pd.DataFrame:
        """One row per bucket of p: the mismatch and the bound in that bucket.

        Columns: lo, hi, count (finite tokens), share (of finite tokens), num_infinite,
        mean_abs_delta, mean_delta, se_delta (std / sqrt(count), ddof 1),
        p50/p90/p99/max_abs_delta, mean_one_minus_p, abs_delta_per_one_minus_p (mean |delta|
        / mean (1 - p)), envelope_first_order and envelope_exact (evaluated at the bucket's
        mean 1 - p), frac_above_envelope (tokens with |delta| above the exact envelope at
        their own p), frac_above_first_order, share_abs_delta (the bucket's share of the
        run's sum |delta|). Empty buckets have count 0 and NaN statistics."""
        import pandas as pd

        nb, e = self.nb, self.edges
        mom = self.delta.reduce(axis=1)  # [nb + 1] over head and tail
        count = mom.n[:nb]
        sum_ad = self.sum_ad.sum(axis=1)  # [nb + 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_ad = sum_ad[:nb] / count
            mean_x = self.sum_x.sum(axis=1)[:nb] / count
            se = mom.std(ddof=1)[:nb] / np.sqrt(count)
            ratio = mean_ad / mean_x
        eps = math.nan if self.eps is None else self.eps
        env = self.envelope
        if env is not None and math.isfinite(eps):
            with np.errstate(invalid="ignore", divide="ignore"):
                above = env.by_bucket["exact"][:nb] / count
                above1 = env.by_bucket["first_order"][:nb] / count
        else:  # no eps: no envelope, not "nothing above it"
            above = above1 = np.full(nb, np.nan)
        qs = self.q_ad.quantiles(AD_BUCKET, AD_MERGED)[0][:nb]  # [B, 4]: p50, p90, p99, max
        total_ad = float(sum_ad.sum())
        n_fin = max(self.num_finite, 1)
        return pd.DataFrame(
            {
                "lo": e[:-1],
                "hi": e[1:],
                "count": count.astype(np.int64),
                "share": count / n_fin,
                "num_infinite": self.n_inf_bucket[:nb].astype(np.int64),
                "mean_abs_delta": mean_ad,
                "mean_delta": mom.mean_or_nan()[:nb],
                "se_delta": se,
                "p50_abs_delta": qs[:, 0],
                "p90_abs_delta": qs[:, 1],
                "p99_abs_delta": qs[:, 2],
                "max_abs_delta": qs[:, 3],
                "mean_one_minus_p": mean_x,
                "abs_delta_per_one_minus_p": ratio,
                "envelope_first_order": theory.envelope_first_order(mean_x, eps),
                "envelope_exact": theory.envelope_exact(mean_x, eps),
                "frac_above_envelope": above,
                "frac_above_first_order": above1,
                "share_abs_delta": sum_ad[:nb] / total_ad if total_ad > 0 else np.full(nb, np.nan),
            }
        )

    def envelope_check(self) -> dict[str, Any]:
        """Tokens above each envelope at eps: first order 2 eps (1 - p), exact (two-sided,
        tight), weak (exp(2 eps) - 1)(1 - p), and the flat 2 eps.
        {eps, name: {num_above, frac_above}}."""
        eps = math.nan if self.eps is None else self.eps
        ok = math.isfinite(eps) and self.envelope is not None
        n = self.num_finite
        out: dict[str, Any] = {"eps": eps}
        for name in ENVELOPES:
            k = self.envelope.above[name] if ok and self.envelope is not None else 0
            out[name] = {
                "num_above": k if ok else None,
                "frac_above": k / n if n and ok else math.nan,
            }
        return out

    def fit(self) -> dict[str, float]:
        """Least squares |delta| ~ slope (1 - p) through the origin (`fit_slope`)."""
        return fit_from_sums(self.num_finite, self.sxx, self.sxy, self.syy, self.abs_delta.m2)

    def tail_bias(self) -> dict[str, Any]:
        """Signed mean delta of tail tokens (p < tail) against head tokens (see `tail_bias`)."""
        by_tail = self.delta.reduce(axis=0)  # [2]: head, tail
        n_h, n_t = (int(v) for v in by_tail.n)
        mean, se = by_tail.mean_or_nan(), by_tail.std(ddof=1) / np.sqrt(np.maximum(by_tail.n, 1))
        m_h, m_t = float(mean[0]), float(mean[1])
        se_h, se_t = float(se[0]), float(se[1])
        z_t, p_t = _z_p(m_t, se_t)
        z_h, p_h = _z_p(m_h, se_h)
        # Cluster-robust (CR0) standard error: residuals summed per sequence first,
        # r_s = sum_{t in s, tail} (delta_t - mean) = S_s - n_s mean.
        se_seq = math.nan
        if n_t > 1:
            r = self.seq_tail_d - self.seq_tail_n * m_t  # [S]
            se_seq = float(math.sqrt(float(r @ r)) / n_t)
        z_seq, p_seq = _z_p(m_t, se_seq)
        diff = m_t - m_h
        se_diff = (
            math.sqrt(se_t**2 + se_h**2)
            if math.isfinite(se_t) and math.isfinite(se_h)
            else math.nan
        )
        z_diff, p_diff = _z_p(diff, se_diff)
        tail_ad, total_ad = float(self.sum_ad[:, 1].sum()), float(self.sum_ad.sum())
        n = max(self.num_finite, 1)
        return {
            "threshold": self.tail,
            "n": n_t,
            "token_share": n_t / n if self.num_finite else math.nan,
            "abs_delta_share": tail_ad / total_ad if total_ad > 0 else math.nan,
            "mean_delta": m_t,
            "se": se_t,
            "z": z_t,
            "p_value": p_t,
            "se_seq": se_seq,
            "z_seq": z_seq,
            "p_value_seq": p_seq,
            "head": {"n": n_h, "mean_delta": m_h, "se": se_h, "z": z_h, "p_value": p_h},
            "diff": diff,
            "se_diff": se_diff,
            "z_diff": z_diff,
            "p_value_diff": p_diff,
        }

    @cached_property
    def _sequences(self) -> pd.DataFrame:
        import pandas as pd

        n_inf = self.seq_n - self.seq_n_fin.astype(np.int64)
        has_inf = n_inf > 0
        sum_d = np.where(has_inf, np.inf, self.seq_sum_d)
        return pd.DataFrame(
            {
                "seq_id": self.seq_ids,
                "num_tokens": self.seq_n.astype(np.int64),
                "num_infinite": n_inf.astype(np.int64),
                "sum_delta": sum_d,
                "sum_abs_delta": np.where(has_inf, np.inf, self.seq_sum_ad),
                "mean_delta": sum_d / np.maximum(self.seq_n, 1),
                "sum_one_minus_p": self.seq_sum_x,
            }
        )

    def sequences(self) -> pd.DataFrame:
        """One row per sequence: seq_id, num_tokens, num_infinite, sum_delta (+inf if any
        token is infinite), sum_abs_delta, mean_delta (the log-PPL gap, mean_t logp_infer -
        mean_t logp_train; inf likewise), sum_one_minus_p (over all its tokens)."""
        return self._sequences.copy()

    def metrics(self, seqs: pd.DataFrame | None = None) -> dict[str, float]:
        """The metrics RL frameworks log (`rl_metrics`): token sums from the batches,
        sequence ones from `seqs` (default `sequences()`)."""
        seqs = self._sequences if seqs is None else seqs
        n = self.num_finite

        def mean(s: float) -> float:
            return s / n if n else math.nan

        overall = self.delta.reduce()
        pearson = math.nan
        m2t, m2i = float(self.p_train.m2), float(self.p_infer.m2)
        if n > 1 and m2t > 0 and m2i > 0:
            pearson = float(np.clip(self.comoment / math.sqrt(m2t * m2i), -1.0, 1.0))
        fin = seqs[np.isfinite(seqs["sum_delta"].to_numpy())]
        sum_delta = fin["sum_delta"].to_numpy(dtype=np.float64)  # [S']
        gap = fin["mean_delta"].to_numpy(dtype=np.float64)  # [S'] log-PPL gap per sequence
        w_seq = np.exp(np.clip(-sum_delta, -M.SEQ_LOG_CLAMP, M.SEQ_LOG_CLAMP))  # [S']
        w_geo = np.exp(-gap)  # [S']

        def mean_or_nan(a: np.ndarray) -> float:
            return float(a.mean()) if a.size else math.nan

        k1 = float(overall.mean) if n else math.nan
        out: dict[str, float] = {
            "k1": k1,
            "k2": mean(self.sum_k2) / 2,
            "k3": mean(self.sum_k3),
            "mean_delta": k1,
            "std_delta": float(overall.std()),
            "mean_abs_delta": mean(float(self.sum_ad.sum())),
            "max_abs_delta": self.max_ad if n else math.nan,
            "p99_abs_delta": float(self.abs_delta_quantile(0.99)[0]) if n else math.nan,
            "std_abs_delta": float(self.abs_delta.std()),
            "mean_abs_dp": mean(self.sum_dp),
            "max_abs_dp": self.max_dp if n else math.nan,
            "pearson_p": pearson,
            "log_ppl_gap_mean": mean_or_nan(gap),
            "log_ppl_gap_abs_mean": mean_or_nan(np.abs(gap)),
            "ppl_ratio": mean_or_nan(np.exp(gap)),
            "chi2_token": mean(self.sum_chi2),
            "chi2_seq": M.chi2_seq(-sum_delta),
            "is_token_mean": mean(self.sum_r),
            "is_token_min": self.min_r if n else math.nan,
            "is_token_max": self.max_r if n else math.nan,
            **_stats3(w_seq, "is_seq"),
            **_stats3(w_geo, "is_seq_geo"),
            "ess_token": self.sum_r**2 / (n * self.sum_r2) if n else math.nan,
            "ess_seq": M.ess(w_seq),
            "ess_seq_geo": M.ess(w_geo),
            "frac_ratio_outside_0.5_2": mean(float(self.n_outside)),
        }
        for i, c in enumerate(M.CAPS):
            out[f"frac_token_above_cap_{c:g}"] = mean(float(self.above_cap[i]))
            out[f"frac_seq_above_cap_{c:g}"] = mean_or_nan(w_seq > c)
        return out

    def distribution_level(self) -> dict[str, Any] | None:
        """The distribution-level section (`distribution_level`); None without its columns."""
        import pandas as pd

        if not self.coarse:
            return None
        nb, e = self.nb, self.edges
        overall: dict[str, Any] = {}
        rows: dict[str, Any] = {"lo": e[:-1], "hi": e[1:], "count": self.rows_bucket[:nb]}
        for c, acc in self.coarse.items():
            n = int(acc.n.sum())
            per, q = acc.q.quantiles(COARSE_QUANTILES, (*COARSE_QUANTILES, 1.0))  # [G, 2], [3]
            overall[c] = {
                "count": n,
                "num_infinite": int(acc.n_inf.sum()),
                "mean": float(acc.sum.sum()) / n if n else math.nan,
                "p90": q[0],
                "p99": q[1],
                "max": q[2],
            }
            with np.errstate(invalid="ignore", divide="ignore"):
                rows[f"{c}_mean"] = acc.sum[:nb] / acc.n[:nb]
            qs = per[:nb]  # [B, 2]
            rows[f"{c}_p90"], rows[f"{c}_p99"] = qs[:, 0], qs[:, 1]
            rows[f"{c}_num_infinite"] = acc.n_inf[:nb]
        return {"columns": list(self.coarse), "overall": overall, "buckets": pd.DataFrame(rows)}


def fit_from_sums(n: int, sxx: float, sxy: float, syy: float, m2y: float) -> dict[str, float]:
    """`fit_slope` from sums: slope = sxy / sxx, SS_res = syy - slope sxy, SS_tot = M2 of y."""
    if n == 0 or sxx == 0:
        return {"slope": math.nan, "r2": math.nan, "n": int(n)}
    slope = sxy / sxx
    ss_res = max(syy - slope * sxy, 0.0)
    return {
        "slope": slope,
        "r2": 1.0 - ss_res / m2y if m2y > 0 else math.nan,
        "n": int(n),
    }


# ----------------------------------------------------------------------------- scanning


def report_tokens(
    source: pd.DataFrame | str | Path, batch_rows: int = BATCH_ROWS, *, complete: bool = True
) -> TokenBatches:
    """The token table `report` reads: a run (`tokens.open_run_tokens`: the report's
    columns; an incomplete run is refused unless `complete=False`, which reads it with a
    warning) or a DataFrame (the NEEDED_COLUMNS)."""
    if is_frame(source):
        return frame_tokens(source, verb="report", needed=NEEDED_COLUMNS, batch_rows=batch_rows)
    return open_run_tokens(source, verb="report", batch_rows=batch_rows, complete=complete)


def _batches(src: TokenBatches, columns: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
    """src's batches of `columns` (those it has), read one batch ahead in a thread."""
    have = set(src.columns)
    cols = list(dict.fromkeys(c for c in columns if c in have))
    return prefetch(src.read(cols)) if src.file is not None else src.read(cols)


class Scanner:
    """`scan` one batch at a time, for a caller that reads the batches itself (`compare`
    reads two runs in lockstep, each batch feeding both runs' scans and the moves between
    them): construct (the first pass, when asked for, runs here), `feed` every batch of
    `columns` in table order, then `finish` (eps learnt, the envelope counts) for the
    aggregates. `scan` is this with its own reader."""

    def __init__(
        self,
        src: TokenBatches,
        *,
        edges: np.ndarray,
        by: str = "train",
        tail: float = DEFAULT_TAIL,
        eps: float | None = None,
        exact_limit: int = EXACT_LIMIT,
        extras: Sequence[Extra] = (),
        flag_infinite: bool = False,
    ) -> None:
        self.src, self.by, self.edges, self.extras = src, by, edges, list(extras)
        have = set(src.columns)
        self._kept = ["kept_train"] if "kept_train" in have else []
        coarse = [c for c in COARSE_COLUMNS if c in have]
        eps_hat = QuantileAccumulator(1, exact_limit)
        self.first_pass = flag_infinite or any(getattr(x, "needs_sequences", False) for x in extras)
        if self.first_pass:
            index, flags = _first_pass(src, by, edges, flag_infinite)
            agg = Aggregates(edges, by, tail, index.ids, eps_hat, coarse, exact_limit)
            agg.seq_infinite = flags
        else:  # one pass: the sequences are added as the batches bring them
            agg = Aggregates(edges, by, tail, np.empty(0, np.int64), eps_hat, coarse, exact_limit)
        if eps is not None:
            agg.set_eps(eps, "--eps")
        else:
            agg.defer_envelopes()
        for x in extras:
            x.start(agg)
        agg.side_thread()  # closed by finish (or `close`)
        self.agg = agg
        hat = ["eps_hat"] if "eps_hat" in have else []
        cols = [
            *NEEDED_COLUMNS,
            *self._kept,
            *hat,
            *coarse,
            *(c for x in extras for c in x.columns),
        ]
        # the columns each batch must hold (those the table has)
        self.columns = list(dict.fromkeys(c for c in cols if c in have))

    def feed(self, rows: dict[str, np.ndarray]) -> None:
        """Add one batch (a dict holding at least `columns`), in table order."""
        agg = self.agg
        sid = np.asarray(rows["seq_id"])
        starts, first = runs(sid)  # the rows' sequences found once, for every use below
        grouped = bool(np.all(first[1:] > first[:-1]))  # the writers' order
        if not self.first_pass:
            agg.add_sequences(first if grouped else np.unique(sid))
        if grouped and sid.size:
            at = np.searchsorted(agg.seq_ids, first)  # [r] each run's sequence index
            seqs = BatchSeqs.grouped(at, starts, sid.size)
            b = Batch(rows, seqs.seq, self.by, self.edges)
            b.__dict__["seqs"] = seqs
        else:
            b = Batch(rows, SeqIndex(agg.seq_ids).codes(sid), self.by, self.edges)
        agg.add(b)
        for x in self.extras:
            if getattr(x, "beside", False):
                agg.later(x.add, b)
            else:
                x.add(b)

    def close(self) -> None:
        """Stop the worker thread of a pass left unfinished (an error, an interrupt)."""
        try:
            self.agg.close_side()
        except Exception:  # the pass's own error is the one to report
            pass

    def finish(self) -> Aggregates:
        """The aggregates, eps set (learnt from the pass unless given) and the envelopes
        counted (a pass of their own only when the candidates fell short)."""
        agg = self.agg
        agg.close_side()
        if agg.eps is None:  # eps from this pass: q0.99 of eps_hat, else of the eps needed
            eps_data, _ = agg.eps_hat()
            if math.isfinite(eps_data):
                counted = agg.set_eps(eps_data, theory.eps_estimator_name())
            else:
                counted = agg.set_eps(agg.eps_needed(0.99), NO_EPS_HAT_ESTIMATOR)
            if not counted:  # the candidates fell short: the counts in a pass of their own
                agg.count_envelopes(_batches(self.src, ["delta", f"p_{self.by}", *self._kept]))
        return agg


def scan(
    src: TokenBatches,
    *,
    edges: np.ndarray,
    by: str = "train",
    tail: float = DEFAULT_TAIL,
    eps: float | None = None,
    exact_limit: int = EXACT_LIMIT,
    extras: Sequence[Extra] = (),
    flag_infinite: bool = False,
) -> Aggregates:
    """Aggregate a token table in streamed passes (module doc): (1) only for
    `flag_infinite` (which sequences hold an infinite delta, `Aggregates.seq_infinite`) or
    an extra that `needs_sequences`: seq_id (and delta / kept_train), the sequence index;
    (2) every column, eps_hat included, each batch also handed to `extras`, the sequences
    added as they come unless (1) listed them; eps (unless given) is learnt from it, and
    the envelope counts at eps come from its candidates; (3) only when those fall short
    (eps below their floor, too many of them): the envelope counts in a pass of their own.
    (`Scanner` is the same pass fed by the caller.)"""
    sc = Scanner(
        src, edges=edges, by=by, tail=tail, eps=eps, exact_limit=exact_limit,
        extras=extras, flag_infinite=flag_infinite,
    )  # fmt: skip
    try:
        for rows in _batches(src, sc.columns):
            sc.feed(rows)
    except BaseException:
        sc.close()
        raise
    return sc.finish()


def _first_pass(
    src: TokenBatches, by: str, edges: np.ndarray, flag_infinite: bool
) -> tuple[SeqIndex, np.ndarray | None]:
    """seq_id (and, when `flag_infinite`, delta / kept_train): the sequence index [S] and
    which sequences hold an infinite delta ([S] bool; None unless flagged)."""
    kept = ["kept_train"] if "kept_train" in src.columns else []
    parts, infinite = [], []
    for rows in _batches(src, ["seq_id", *(["delta", *kept] if flag_infinite else [])]):
        sid = rows["seq_id"]
        parts.append(distinct(sid))
        if flag_infinite:
            bad = ~Batch(rows, None, by, edges).fin
            if bad.any():
                infinite.append(distinct(sid[bad]))
    index = SeqIndex.scan(parts)
    if not flag_infinite:
        return index, None
    flags = np.zeros(index.num, dtype=bool)
    if infinite:
        flags[index.codes(np.unique(np.concatenate(infinite)))] = True
    return index, flags


def scan_frame(
    df: pd.DataFrame,
    edges: Sequence[float] | str | None = DEFAULT_EDGES,
    by: str | None = "train",
    tail: float = DEFAULT_TAIL,
    eps: float | None = None,
) -> Aggregates:
    """`scan` of a token DataFrame as one batch (`analysis`'s one-table functions use it)."""
    src = report_tokens(df, max(len(df), 1))
    return scan(src, edges=parse_edges(edges), by=check_by(by or "train"), tail=tail, eps=eps)


def _z_p(mean: float, se: float) -> tuple[float, float]:
    """z = mean / se and its two-sided normal p-value."""
    if not (math.isfinite(mean) and math.isfinite(se)) or se <= 0:
        return math.nan, math.nan
    z = mean / se
    return z, math.erfc(abs(z) / math.sqrt(2.0))


def _stats3(w: np.ndarray, prefix: str) -> dict[str, float]:
    if not w.size:
        return {f"{prefix}_mean": math.nan, f"{prefix}_min": math.nan, f"{prefix}_max": math.nan}
    return {
        f"{prefix}_mean": float(w.mean()),
        f"{prefix}_min": float(w.min()),
        f"{prefix}_max": float(w.max()),
    }


__all__ = [
    "DEFAULT_EDGES",
    "DEFAULT_TAIL",
    "NO_EPS_HAT_ESTIMATOR",
    "Aggregates",
    "Batch",
    "EnvelopeCounts",
    "Extra",
    "Moments",
    "Scanner",
    "bucket_index",
    "fit_from_sums",
    "parse_edges",
    "quantile_with_inf",
    "report_tokens",
    "scan",
    "scan_frame",
]
