"""Summaries of a run's token table: buckets by p, the (1 - p) bound, tail bias, accumulation
over sequences, and the metrics RL frameworks log. The numbers behind `mismatch report`.

Conventions (also in every result under `conventions`):
- delta = logp_infer - logp_train (nats); r = exp(-delta) is the token importance ratio.
- p is the training-side probability p_train (`by="train"`), or p_infer with `by="infer"`;
  the same p is used for the buckets, the envelope, the fit and the tail split.
- Buckets are [lo, hi), except the last, which includes hi (so p = 1 is counted).
- Tokens with an infinite delta (a token one side's truncation prunes) are counted in
  `num_infinite` and excluded from every mean; sequences holding one are excluded from
  the sequence-level statistics (their log-ratio is infinite).
- Standard errors treat tokens as independent unless named `*_seq` (clustered by sequence).

Streaming (runs of 10^8 tokens in bounded memory): `aggregates.scan` reads the token table in
batches into mergeable `aggregates.Aggregates`; `report` turns them into the report dict.
One code path: the functions below that take a DataFrame (`bucket_stats`, `tail_bias`, ...)
scan it as a single batch. `GroupAccumulator` adds the per-step / per-env rows of
`report --group-by` in the same pass. Importing this module does not import torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import kernels, theory
from . import metrics as M
from .aggregates import (
    DEFAULT_EDGES,
    DEFAULT_TAIL,
    Aggregates,
    Batch,
    Moments,
    bucket_index,
    fit_from_sums,
    parse_edges,
    report_tokens,
    scan,
    scan_frame,
)
from .errors import MismatchError
from .positions import POSITION_EDGES, position_bucket, position_labels
from .quantiles import EXACT_LIMIT
from .results import json_ready
from .runs import RunMeta
from .schema import COARSE_COLUMNS, CONVENTIONS
from .tokens import BATCH_ROWS, check_by
from .verdict import verdict

if TYPE_CHECKING:
    import pandas as pd

MAX_LENGTH_BINS = 8


# ----------------------------------------------------------------------------- one table


def frame_eps(df: pd.DataFrame, q: float = theory.EPS_QUANTILE) -> float:
    """The global eps of a token table: theory.estimate_eps (q-quantile of eps_hat)."""
    if "eps_hat" not in df.columns:
        return math.nan
    return theory.estimate_eps(df["eps_hat"].to_numpy(dtype=np.float64), q)


def bucket_stats(
    df: pd.DataFrame,
    edges: Sequence[float] | np.ndarray = DEFAULT_EDGES,
    by: str | None = None,
    eps: float | None = None,
) -> pd.DataFrame:
    """One row per bucket of p: the mismatch and the bound in that bucket
    (`Aggregates.buckets`). eps None: as `analyze` chooses it."""
    return scan_frame(df, edges, by, eps=eps).buckets()


def envelope_check(df: pd.DataFrame, eps: float, by: str | None = None) -> dict[str, Any]:
    """Tokens above each envelope at eps: first order 2 eps (1 - p), exact (two-sided, tight),
    weak (exp(2 eps) - 1)(1 - p), and the flat 2 eps. {name: {num_above, frac_above}}."""
    return scan_frame(df, by=by, eps=eps).envelope_check()


def eps_needed(df: pd.DataFrame, q: float = 0.99, by: str | None = None) -> float:
    """The smallest eps whose exact envelope covers a fraction q of the finite tokens."""
    return scan_frame(df, by=by, eps=0.0).eps_needed(q)


def fit_slope(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Least squares y ~ slope * x through the origin: slope = sum xy / sum x^2.

    r2 = 1 - SS_res / SS_tot with SS_tot centred on mean y: the share of the variance of y
    the line explains (can be negative, honest for a fit without intercept). SS_res =
    sum y^2 - slope sum xy, from the same sums the streamed report keeps.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    m2 = Moments()
    m2.add(y)
    return fit_from_sums(x.size, float(x @ x), float(x @ y), float(y @ y), float(m2.m2))


# ----------------------------------------------------------------------------- tail bias


def tail_bias(
    df: pd.DataFrame, threshold: float = DEFAULT_TAIL, by: str | None = None
) -> dict[str, Any]:
    """Signed mean delta of tail tokens (p < threshold) against head tokens (p >= threshold).

    docs/theory.md, "Why sampled tail tokens are biased": sampled from q, E[delta] = KL(q || p) >= 0, and the bias lives in the tail.
    Returns threshold, n, token_share, abs_delta_share (of the run's sum |delta|), mean_delta,
    se (iid), z, p_value (two-sided, normal), se_seq / z_seq (clustered by sequence), `head`
    (n, mean_delta, se, z, p_value) and diff / se_diff / z_diff (tail minus head).
    """
    _check_tail(threshold)
    return scan_frame(df, by=by, tail=threshold, eps=0.0).tail_bias()


def _check_tail(tail: float) -> None:
    if not 0 < tail <= 1:
        raise MismatchError(f"--tail must be in (0, 1], got {tail}")


def sequence_stats(df: pd.DataFrame, by: str | None = None) -> pd.DataFrame:
    """One row per sequence: seq_id, num_tokens, num_infinite, sum_delta (+inf if any token
    is infinite), sum_abs_delta, mean_delta (the log-PPL gap, mean_t logp_infer - mean_t
    logp_train; inf likewise), sum_one_minus_p (over all its tokens, p as in `by`)."""
    return scan_frame(df, by=by, eps=0.0).sequences()


# ----------------------------------------------------------------------------- sequences


def _ols(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """y ~ a + b x: slope b, intercept a, Pearson r."""
    if x.size < 2 or np.ptp(x) == 0:
        return {"slope": math.nan, "intercept": math.nan, "corr": math.nan}
    xc, yc = x - x.mean(), y - y.mean()
    sxx, syy = float(np.dot(xc, xc)), float(np.dot(yc, yc))
    b = float(np.dot(xc, yc)) / sxx
    r = float(np.dot(xc, yc)) / math.sqrt(sxx * syy) if syy > 0 else math.nan
    return {"slope": b, "intercept": float(y.mean() - b * x.mean()), "corr": r}


def length_bins(seqs: pd.DataFrame, max_bins: int = MAX_LENGTH_BINS) -> pd.DataFrame:
    """Mean sum delta per length bin (finite sequences; bins of roughly equal count).

    Columns: lo, hi (lengths, [lo, hi), last bin includes hi), count, mean_length,
    mean_sum_delta, se_sum_delta, std_sum_delta. A linear drift of mean_sum_delta with
    length and a sqrt growth of its std are the accumulation of docs/theory.md, "Accumulation
    over a sequence"."""
    import pandas as pd

    fin = seqs[np.isfinite(seqs["sum_delta"].to_numpy())]
    L = fin["num_tokens"].to_numpy(dtype=np.float64)
    y = fin["sum_delta"].to_numpy(dtype=np.float64)
    cols = ["lo", "hi", "count", "mean_length", "mean_sum_delta", "se_sum_delta", "std_sum_delta"]
    if L.size == 0:
        return pd.DataFrame(columns=cols)
    edges = np.unique(np.round(np.quantile(L, np.linspace(0, 1, max_bins + 1))))
    if edges.size == 1:
        edges = np.array([edges[0], edges[0]])
    idx = bucket_index(L, edges)
    nb = len(edges) - 1
    count = np.bincount(idx, minlength=nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_y = np.bincount(idx, weights=y, minlength=nb) / count
        mean_l = np.bincount(idx, weights=L, minlength=nb) / count
        var = np.bincount(idx, weights=np.square(y - mean_y[idx]), minlength=nb) / (count - 1)
    std = np.where(count > 1, np.sqrt(var), np.nan)
    out = pd.DataFrame(
        {
            "lo": edges[:-1],
            "hi": edges[1:],
            "count": count.astype(np.int64),
            "mean_length": mean_l,
            "mean_sum_delta": mean_y,
            "se_sum_delta": std / np.sqrt(count),
            "std_sum_delta": std,
        }
    )
    return out[out["count"] > 0].reset_index(drop=True)


def accumulation(seqs: pd.DataFrame) -> dict[str, Any]:
    """How sum delta grows over a sequence: OLS of sum delta on length and on sum (1 - p)
    (slope, intercept, corr) over sequences without an infinite delta, plus `length_bins`."""
    fin = seqs[np.isfinite(seqs["sum_delta"].to_numpy())]
    y = fin["sum_delta"].to_numpy(dtype=np.float64)
    return {
        "num_sequences": len(fin),
        "vs_length": _ols(fin["num_tokens"].to_numpy(dtype=np.float64), y),
        "vs_sum_one_minus_p": _ols(fin["sum_one_minus_p"].to_numpy(dtype=np.float64), y),
        "length_bins": length_bins(seqs).to_dict(orient="records"),
    }


# ----------------------------------------------------------------------------- RL metrics


def rl_metrics(
    df: pd.DataFrame, seqs: pd.DataFrame | None = None, by: str | None = None
) -> dict[str, float]:
    """The metrics RL frameworks log (docs/theory.md, "The metrics RL frameworks log"), finite tokens / sequences only.

    d = -delta (verl); the token ratio r = exp(d) with d clamped to +-20 as verl clamps it
    (is_token_*, ess_token, chi2_token, k2; k1 and k3 are unclamped, like verl's kl and
    k3_kl); a sequence's ratio is the product exp(sum d) (the sum clamped to +-20, as chi2_seq)
    or the geometric mean exp(mean d). ESS is the fraction 1 / mean((w / mean w)^2). Caps
    count ratios ABOVE C (what truncated IS clips). `seqs`: the sequence table to use
    (default `sequence_stats` of df).
    """
    return scan_frame(df, by=by, eps=0.0).metrics(seqs)


# ----------------------------------------------------------------------------- imported runs

GROUP_KEYS: tuple[str, ...] = ("step", "env")


class GroupAccumulator:
    """`group_metrics` streamed: per value of a key column (step, env) the token counts and
    sums of the finite tokens, and the distinct (group, sequence) pairs. Groups are
    numbered as they first appear and sorted by value at the end; rows whose key is null
    are left out. An `Extra` of `scan` (its `columns` are the key)."""

    beside = True  # `add` reads only the batch: it may run in the scan's worker thread

    def __init__(self, key: str, tail: float = DEFAULT_TAIL) -> None:
        self.key, self.tail = key, float(tail)
        self.columns: tuple[str, ...] = (key,)
        self._index: dict[Any, int] = {}
        self._values: list[Any] = []
        self._sums = np.zeros((7, 0))  # [7, G]: n_tok n_fin sum_ad sum_d sum_k3 tail_ad n_out
        self._pairs: list[tuple[np.ndarray, np.ndarray]] = []  # (group, seq_id), per batch

    def start(self, agg: Aggregates) -> None:
        pass

    def _keys(self, b: Batch) -> tuple[np.ndarray, list[Any]] | None:
        """The batch's rows as codes [n] into its distinct key values (-1 where null)."""
        import pandas as pd

        codes, uniq = pd.factorize(b.rows[self.key])  # [n] batch-local, -1 where null
        return codes, (uniq.tolist() if hasattr(uniq, "tolist") else list(uniq))

    def add(self, b: Batch) -> None:
        keys = self._keys(b)
        if keys is None:
            return
        codes, values = keys
        lut = np.array([self._index.setdefault(v, len(self._index)) for v in values], np.int64)
        if len(self._index) > len(self._values):  # new groups: wider sums
            self._values = list(self._index)
            grow = len(self._values) - self._sums.shape[1]
            self._sums = np.concatenate([self._sums, np.zeros((7, grow))], axis=1)
        if lut.size and not np.array_equal(lut, np.arange(lut.size)):
            codes = np.where(codes >= 0, lut[np.maximum(codes, 0)], -1)
        g = np.ascontiguousarray(codes, dtype=np.intp)  # [n], -1 where null
        sid = np.ascontiguousarray(b.rows["seq_id"], dtype=np.int64)  # the index may grow
        pair_g, pair_s = np.empty(g.size, np.intp), np.empty(g.size, np.int64)
        k = kernels.keyed_sums(
            g, np.ascontiguousarray(b.fin), b.delta, b.ad, b.k3, np.ascontiguousarray(b.p),
            sid, self.tail, math.log(M.RATIO_BAND[1]), self._sums, pair_g, pair_s,
        )  # fmt: skip
        if k:  # rows are grouped: the changes, then their distinct pairs
            self._pairs.append(_distinct_pairs(pair_g[:k], pair_s[:k]))

    def result(self) -> list[dict[str, Any]]:
        """`group_metrics`' rows, ascending by key value."""
        import pandas as pd

        G = len(self._values)
        if not G:
            return []
        n_seq = np.zeros(G, np.int64)
        if self._pairs:
            pg, _ = _distinct_pairs(*(np.concatenate(a) for a in zip(*self._pairs, strict=True)))
            n_seq = np.bincount(pg, minlength=G)
        n_tok, n_fin, sum_ad, sum_d, sum_k3, tail_ad, n_out = self._sums
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_ad, mean_d, k3 = sum_ad / n_fin, sum_d / n_fin, sum_k3 / n_fin
            tail_share, frac_out = tail_ad / sum_ad, n_out / n_fin
        order = np.argsort(pd.Index(self._values), kind="stable")
        return [
            {
                self.key: self._values[g],
                "num_tokens": int(n_tok[g]),
                "num_infinite": int(n_tok[g] - n_fin[g]),
                "num_sequences": int(n_seq[g]),
                "mean_abs_delta": float(mean_ad[g]),
                "mean_delta": float(mean_d[g]),
                "k3": float(k3[g]),
                "tail_abs_delta_share": float(tail_share[g]),
                "frac_ratio_outside_0.5_2": float(frac_out[g]),
            }
            for g in order
        ]


def _distinct_pairs(g: np.ndarray, sid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (group, seq_id) pairs of g [k], sid [k]: ([u], [u])."""
    order = np.lexsort((sid, g))
    g, sid = g[order], sid[order]
    keep = np.r_[True, (g[1:] != g[:-1]) | (sid[1:] != sid[:-1])]
    return g[keep], sid[keep]


class PositionAccumulator(GroupAccumulator):
    """`scan` extra: the headline numbers per position bucket. Reads `pos`; a token table
    without it (a bare DataFrame) gives no table (`result()` is None)."""

    def __init__(self, tail: float = DEFAULT_TAIL, edges: Sequence[int] = POSITION_EDGES) -> None:
        super().__init__("pos", tail)
        self.edges = tuple(int(e) for e in edges)
        self.seen = False
        # every bucket exists from the start, in order, so the codes are the bucket indices
        self._index = {i: i for i in range(len(self.edges))}
        self._values = list(range(len(self.edges)))
        self._sums = np.zeros((7, len(self.edges)))

    def _keys(self, b: Batch) -> tuple[np.ndarray, list[Any]] | None:
        if "pos" not in b.rows:
            return None
        self.seen = True
        return position_bucket(b.rows["pos"], self.edges), self._values

    def result(self) -> list[dict[str, Any]] | None:  # type: ignore[override]
        """One row per bucket, in position order, empty ones included (num_tokens 0, the
        statistics None after `json_ready`): label, pos_lo, pos_hi (inclusive; None for the
        last), and `report --group-by`'s numbers."""
        if not self.seen:
            return None
        rows = super().result()
        labels = position_labels(self.edges)
        out = []
        for i, row in enumerate(rows):
            row.pop("pos")
            hi = self.edges[i + 1] - 1 if i + 1 < len(self.edges) else None
            out.append({"position": labels[i], "pos_lo": self.edges[i], "pos_hi": hi, **row})
        return out


def group_metrics(
    df: pd.DataFrame, key: str, tail: float = DEFAULT_TAIL, by: str = "train"
) -> list[dict[str, Any]]:
    """Headline metrics per value of column `key` (step, env), ascending: num_tokens,
    num_infinite, num_sequences, mean_abs_delta, mean_delta, k3, tail_abs_delta_share
    (share of the group's sum |delta| on tokens with p < tail) and
    frac_ratio_outside_0.5_2 (tokens with r = exp(-delta) outside [0.5, 2], i.e.
    |delta| > log 2). Finite tokens only, as everywhere; rows whose key is null are left
    out. Needs seq_id, delta, p_<by> and `key`; kept_train is optional."""
    if key not in df.columns:
        raise MismatchError(
            f"the run has no {key} column: only imported runs (`mismatch import`) carry {key}"
        )
    acc = GroupAccumulator(key, tail)
    src = report_tokens(df, max(len(df), 1))
    scan(src, edges=parse_edges(None), by=check_by(by), tail=tail, eps=0.0, extras=[acc])
    return acc.result()


def check_group_key(path: str | Path, key: str) -> None:
    """A one-line MismatchError unless `key` is a GROUP_KEYS column of the run's tokens."""
    from .runs import token_columns

    if key not in GROUP_KEYS:
        raise MismatchError(f"--group-by must be one of {', '.join(GROUP_KEYS)}, got {key!r}")
    if key not in token_columns(path):
        raise MismatchError(
            f"run {path} has no {key} column: only imported runs (`mismatch import`) carry {key}"
        )


def analyze_groups(
    path: str | Path,
    key: str,
    tail: float = DEFAULT_TAIL,
    by: str = "train",
    *,
    batch_rows: int = BATCH_ROWS,
) -> list[dict[str, Any]]:
    """`group_metrics` of a run directory, streamed (seq_id, delta, p_<by>, kept_train and
    the key column). `analyze(..., group_by=key)` gives the same rows with the report."""
    check_group_key(path, key)
    src = report_tokens(path, batch_rows)
    acc = GroupAccumulator(key, tail)
    scan(src, edges=parse_edges(None), by=check_by(by), tail=tail, eps=0.0, extras=[acc])
    return json_ready(acc.result())


# ----------------------------------------------------------------------------- distribution level


def distribution_level(
    df: pd.DataFrame, edges: Sequence[float] | np.ndarray = DEFAULT_EDGES, by: str = "train"
) -> dict[str, Any] | None:
    """Means and upper quantiles of the distribution-level measures (schema.COARSE_COLUMNS:
    TV and KL both ways on {inference top-K + sampled token, rest}; lower bounds on the
    full-vocabulary ones), over all tokens and by bucket of p_{by}. None if the table has
    none of these columns (runs written before them).

    Infinite values (a KL where the kept sets differ) and NaN are counted in `num_infinite`
    and left out of means and quantiles. Returns {"overall": {col: {count, num_infinite,
    mean, p90, p99, max}}, "buckets": [{lo, hi, count, <col>_mean, <col>_p90, <col>_p99,
    <col>_num_infinite, ...}]}.
    """
    if not any(c in df.columns for c in COARSE_COLUMNS):
        return None
    return scan_frame(df, edges, by, eps=0.0).distribution_level()


# ----------------------------------------------------------------------------- analyze


def run_info(path: Path, meta: RunMeta) -> dict[str, Any]:
    keys = ("infer_engine", "infer_dtype", "train_dtype", "temperature", "top_p", "top_k", "min_p")
    return {
        "path": str(path),
        "status": meta.status,
        "model": meta.model_name,
        **{k: meta.config.get(k) for k in keys},
        "train_engine": meta.train.get("engine"),
    }


def analyze(
    source: pd.DataFrame | str | Path,
    *,
    edges: Sequence[float] | str | None = DEFAULT_EDGES,
    by: str = "train",
    tail: float = DEFAULT_TAIL,
    eps: float | None = None,
    group_by: str | None = None,
    batch_rows: int = BATCH_ROWS,
    exact_limit: int = EXACT_LIMIT,
) -> dict[str, Any]:
    """The full report of a run (path) or token DataFrame, as a JSON-ready dict.

    Keys: run, warnings, conventions, by, num_tokens, num_finite, num_infinite,
    num_sequences, num_sequences_infinite, num_outside_edges, eps (used for the envelopes),
    eps_hat (the data's estimate, q0.99 of per-position eps_hat), eps_estimator,
    eps_hat_quantiles, eps_needed_q99, edges, buckets, envelope, fit, tail, accumulation,
    metrics, distribution_level (`distribution_level`; None for runs without those
    columns), by_position (`positions`: per position bucket in the completion; None without
    a `pos` column), quantiles ("exact", or the sketch they come from), verdict; with `group_by`
    (step, env) also group_by and groups (`group_metrics`). NaN becomes None. The table is
    streamed `batch_rows` rows at a time; quantiles are exact up to `exact_limit` values
    (module doc).
    """
    by = check_by(by)
    e = parse_edges(edges)
    _check_tail(tail)
    if eps is not None and not (math.isfinite(eps) and eps >= 0):
        raise MismatchError(f"--eps must be a finite number >= 0, got {eps}")
    run: dict[str, Any] | None = None
    if isinstance(source, (str, Path)):
        if group_by is not None:
            check_group_key(source, group_by)
    elif group_by is not None and group_by not in source.columns:
        group_metrics(source.iloc[:0], group_by)  # the one-line error
    src = report_tokens(source, batch_rows)
    if src.meta is not None:
        run = run_info(Path(source), src.meta)  # type: ignore[arg-type]
    groups = [GroupAccumulator(group_by, tail)] if group_by is not None else []
    positions = PositionAccumulator(tail)
    agg = scan(src, edges=e, by=by, tail=tail, eps=eps, exact_limit=exact_limit,
               extras=[*groups, positions])  # fmt: skip
    result = report(agg, run, src.warnings)
    result["by_position"] = json_ready(positions.result())
    if groups:
        result["group_by"] = group_by
        result["groups"] = json_ready(groups[0].result())
    return result


def report(
    agg: Aggregates,
    run: dict[str, Any] | None = None,
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    """The report dict of `analyze` from a scan's aggregates."""
    warnings = list(warnings)
    seqs = agg.sequences()
    n_seq_inf = int((seqs["num_infinite"] > 0).sum())
    num_sequences = agg.num_sequences
    if agg.num_infinite:
        warnings.append(
            f"{agg.num_infinite} token(s) have an infinite delta (kept-set disagreement): "
            "counted in num_infinite, excluded from every statistic"
        )
    eps_data, eh_q = agg.eps_hat()
    buckets = agg.buckets()
    side = f"p_{agg.by}"
    result: dict[str, Any] = {
        "run": run,
        "warnings": warnings,
        "conventions": {
            "delta": CONVENTIONS["delta"],
            "p": f"p = {side} (buckets, envelope, fit and tail use this side)",
            "buckets": "[lo, hi); the last bucket includes hi",
            "envelope_exact": (
                "log(1 + (1 - p)(exp(2 eps) - 1)), the tight two-sided bound on |delta|"
            ),
            "envelope_first_order": "2 eps (1 - p)",
            "eps_hat": CONVENTIONS["eps_hat"],
            "infinite_delta": CONVENTIONS["infinite_delta"],
            "se": "standard errors treat tokens as independent; *_seq ones cluster by sequence",
            "quantiles": (
                "counts, sums, means, standard errors and maxima are exact; quantiles (bucket "
                "p50/p90/p99 of |delta|, eps_hat, eps_needed, the distribution level's "
                f"p90/p99) are exact up to {agg.exact_limit:,} values, beyond from a quantile "
                "sketch with relative error <= 0.5% (the `quantiles` key says which)"
            ),
        },
        "by": agg.by,
        "num_tokens": agg.num_tokens,
        "num_finite": agg.num_finite,
        "num_infinite": agg.num_infinite,
        "frac_infinite": agg.num_infinite / agg.num_tokens,
        "num_sequences": num_sequences,
        "num_sequences_infinite": n_seq_inf,
        "num_outside_edges": agg.num_finite - int(buckets["count"].sum()),
        "eps": agg.eps,
        "eps_hat": eps_data,
        "eps_estimator": agg.eps_estimator,
        "eps_hat_quantiles": eh_q,
        "eps_needed_q99": agg.eps_needed(0.99),
        "edges": agg.edges,
        "buckets": buckets,
        "envelope": agg.envelope_check(),
        "fit": agg.fit(),
        "tail": agg.tail_bias(),
        "accumulation": accumulation(seqs),
        "metrics": agg.metrics(seqs),
        "distribution_level": agg.distribution_level(),
        "quantiles": agg.quantiles_label(),
    }
    result = json_ready(result)
    result["verdict"] = verdict(result)
    return result


__all__ = [
    "GROUP_KEYS",
    "GroupAccumulator",
    "PositionAccumulator",
    "accumulation",
    "analyze",
    "analyze_groups",
    "bucket_stats",
    "check_group_key",
    "distribution_level",
    "envelope_check",
    "eps_needed",
    "fit_slope",
    "frame_eps",
    "group_metrics",
    "length_bins",
    "report",
    "rl_metrics",
    "run_info",
    "sequence_stats",
    "tail_bias",
]
