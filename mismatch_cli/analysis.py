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

Everything is vectorised over the token table (numpy bincount / sort); the only Python loops
run over buckets or length bins. Importing this module does not import torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import metrics as M
from . import theory
from .errors import MismatchError
from .results import json_ready
from .schema import COARSE_COLUMNS, CONVENTIONS
from .tokens import REQUIRED_COLUMNS, TokenArrays, check_by, load_tokens, token_arrays
from .verdict import verdict

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
MAX_LENGTH_BINS = 8


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
        raise MismatchError(f"--edges must lie in [0, 1], got {_fmt_list(e)}")
    if np.any(np.diff(e) <= 0):
        raise MismatchError(f"--edges must be strictly increasing, got {_fmt_list(e)}")
    return e


def _fmt_list(e: np.ndarray) -> str:
    return ",".join(f"{v:g}" for v in e)


# ----------------------------------------------------------------------------- eps


def estimate_eps(df: pd.DataFrame | TokenArrays, q: float = theory.EPS_QUANTILE) -> float:
    """The global eps of a token table: theory.estimate_eps (q-quantile of eps_hat)."""
    return theory.estimate_eps(token_arrays(df).eps_hat, q)


# ----------------------------------------------------------------------------- buckets


def bucket_index(p: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bucket of each p: i with edges[i] <= p < edges[i+1]; p == edges[-1] goes to the last
    bucket; -1 for p outside [edges[0], edges[-1]]. [n] -> [n] int64"""
    nb = len(edges) - 1
    idx = np.searchsorted(edges, p, side="right") - 1  # [n]
    idx[p == edges[-1]] = nb - 1
    idx[(idx < 0) | (idx >= nb) | ~np.isfinite(p)] = -1
    return idx


def group_quantiles(
    values: np.ndarray, group: np.ndarray, num_groups: int, qs: Sequence[float]
) -> np.ndarray:
    """Quantiles (numpy's linear rule) of `values` within each group: [n], [n] -> [G, Q].

    A stable counting-style sort by group, then np.quantile (a partition, not a sort) per
    group: the loop runs over groups, never over tokens. Empty groups give NaN.
    """
    out = np.full((num_groups, len(qs)), np.nan)
    if values.size == 0:
        return out
    key = group.astype(np.int16 if num_groups < 2**15 else np.int64)
    v = values[np.argsort(key, kind="stable")]  # [n] grouped (radix sort for int16)
    counts = np.bincount(group, minlength=num_groups)
    ends = np.cumsum(counts)
    for g in np.flatnonzero(counts):
        out[g] = np.quantile(v[ends[g] - counts[g] : ends[g]], qs)
    return out


def bucket_stats(
    df: pd.DataFrame | TokenArrays,
    edges: Sequence[float] | np.ndarray = DEFAULT_EDGES,
    by: str | None = None,
    eps: float | None = None,
) -> pd.DataFrame:
    """One row per bucket of p: the mismatch and the bound in that bucket.

    Columns: lo, hi, count (finite tokens), share (of finite tokens), num_infinite,
    mean_abs_delta, mean_delta, se_delta (std / sqrt(count), ddof 1), p50/p90/p99/max_abs_delta,
    mean_one_minus_p, abs_delta_per_one_minus_p (mean |delta| / mean (1 - p)),
    envelope_first_order and envelope_exact (evaluated at the bucket's mean 1 - p),
    frac_above_envelope (tokens with |delta| above the exact envelope at their own p),
    frac_above_first_order, share_abs_delta (the bucket's share of the run's sum |delta|).
    Empty buckets have count 0 and NaN statistics. eps None: estimate_eps.
    """
    t = token_arrays(df, by)
    edges = parse_edges(edges)
    nb = len(edges) - 1
    if eps is None:
        eps = theory.estimate_eps(t.eps_hat)
    eps = float(eps)

    idx = bucket_index(t.p, edges)  # [n]
    inb = idx >= 0
    b = idx[inb]  # [m] tokens inside the edges
    d = t.delta[inb]  # [m]
    ad = np.abs(d)  # [m]
    x = 1.0 - t.p[inb]  # [m] one minus p

    count = np.bincount(b, minlength=nb).astype(np.int64)  # [B]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_d = np.bincount(b, weights=d, minlength=nb) / count
        mean_ad = np.bincount(b, weights=ad, minlength=nb) / count
        sum_ad = np.bincount(b, weights=ad, minlength=nb)
        mean_x = np.bincount(b, weights=x, minlength=nb) / count
        ss = np.bincount(b, weights=np.square(d - mean_d[b]), minlength=nb)  # two-pass variance
        se = np.sqrt(ss / (count - 1)) / np.sqrt(count)
        se[count < 2] = np.nan
        above = np.bincount(b, weights=ad > theory.envelope_exact(x, eps), minlength=nb) / count
        above1 = (
            np.bincount(b, weights=ad > theory.envelope_first_order(x, eps), minlength=nb) / count
        )
        ratio = mean_ad / mean_x

    qs = group_quantiles(ad, b, nb, (*QUANTILES, 1.0))  # [B, 4]: p50, p90, p99, max

    bi = bucket_index(t.p_infinite, edges)  # [N - n]
    n_inf = np.bincount(bi[bi >= 0], minlength=nb)
    if not math.isfinite(eps):  # no eps: no envelope, not "nothing above it"
        above[:] = np.nan
        above1[:] = np.nan
    total_ad = float(np.sum(np.abs(t.delta)))
    n_fin = max(t.num_finite, 1)
    return pd.DataFrame(
        {
            "lo": edges[:-1],
            "hi": edges[1:],
            "count": count,
            "share": count / n_fin,
            "num_infinite": n_inf.astype(np.int64),
            "mean_abs_delta": mean_ad,
            "mean_delta": mean_d,
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
            "share_abs_delta": sum_ad / total_ad if total_ad > 0 else np.full(nb, np.nan),
        }
    )


# ----------------------------------------------------------------------------- the bound


def envelope_check(
    df: pd.DataFrame | TokenArrays, eps: float, by: str | None = None
) -> dict[str, Any]:
    """Tokens above each envelope at eps: first order 2 eps (1 - p), exact (two-sided, tight),
    weak (exp(2 eps) - 1)(1 - p), and the flat 2 eps. {name: {num_above, frac_above}}."""
    t = token_arrays(df, by)
    ad = np.abs(t.delta)  # [n]
    x = t.one_minus_p  # [n]
    out: dict[str, Any] = {"eps": eps}
    bounds = {
        "first_order": theory.envelope_first_order(x, eps),
        "exact": theory.envelope_exact(x, eps),
        "weak": theory.envelope_weak(x, eps),
        "two_eps": np.full_like(x, 2.0 * eps),
    }
    for name, env in bounds.items():
        k = int(np.count_nonzero(ad > env)) if math.isfinite(eps) else 0
        out[name] = {
            "num_above": k if math.isfinite(eps) else None,
            "frac_above": k / t.num_finite if t.num_finite and math.isfinite(eps) else math.nan,
        }
    return out


def eps_needed(df: pd.DataFrame | TokenArrays, q: float = 0.99, by: str | None = None) -> float:
    """The smallest eps whose exact envelope covers a fraction q of the finite tokens."""
    t = token_arrays(df, by)
    if not t.num_finite:
        return math.nan
    return float(np.quantile(theory.eps_to_cover(np.abs(t.delta), t.one_minus_p), q))


def fit_slope(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Least squares y ~ slope * x through the origin: slope = sum xy / sum x^2.

    r2 = 1 - SS_res / SS_tot with SS_tot centred on mean y: the share of the variance of y
    the line explains (can be negative, honest for a fit without intercept).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    sxx = float(np.dot(x, x))
    if x.size == 0 or sxx == 0:
        return {"slope": math.nan, "r2": math.nan, "n": int(x.size)}
    slope = float(np.dot(x, y)) / sxx
    ss_res = float(np.sum(np.square(y - slope * x)))
    ss_tot = float(np.sum(np.square(y - y.mean())))
    return {
        "slope": slope,
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan,
        "n": int(x.size),
    }


# ----------------------------------------------------------------------------- tail bias


def _mean_se(d: np.ndarray) -> tuple[float, float]:
    if d.size == 0:
        return math.nan, math.nan
    m = float(d.mean())
    return m, float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.nan


def _z_p(mean: float, se: float) -> tuple[float, float]:
    """z = mean / se and its two-sided normal p-value."""
    if not (math.isfinite(mean) and math.isfinite(se)) or se <= 0:
        return math.nan, math.nan
    z = mean / se
    return z, math.erfc(abs(z) / math.sqrt(2.0))


def tail_bias(
    df: pd.DataFrame | TokenArrays, threshold: float = DEFAULT_TAIL, by: str | None = None
) -> dict[str, Any]:
    """Signed mean delta of tail tokens (p < threshold) against head tokens (p >= threshold).

    docs/theory.md, "Why sampled tail tokens are biased": sampled from q, E[delta] = KL(q || p) >= 0, and the bias lives in the tail.
    Returns threshold, n, token_share, abs_delta_share (of the run's sum |delta|), mean_delta,
    se (iid), z, p_value (two-sided, normal), se_seq / z_seq (clustered by sequence), `head`
    (n, mean_delta, se, z, p_value) and diff / se_diff / z_diff (tail minus head).
    """
    if not 0 < threshold <= 1:
        raise MismatchError(f"--tail must be in (0, 1], got {threshold}")
    t = token_arrays(df, by)
    is_tail = t.p < threshold  # [n]
    d_tail, d_head = t.delta[is_tail], t.delta[~is_tail]
    ad = np.abs(t.delta)
    total_ad = float(ad.sum())
    m_t, se_t = _mean_se(d_tail)
    m_h, se_h = _mean_se(d_head)
    z_t, p_t = _z_p(m_t, se_t)
    z_h, p_h = _z_p(m_h, se_h)
    # Cluster-robust (CR0) standard error: residuals summed per sequence first.
    se_seq = math.nan
    if d_tail.size > 1:
        r = np.bincount(t.seq[is_tail], weights=d_tail - m_t, minlength=t.num_sequences)  # [S]
        se_seq = float(math.sqrt(float(np.sum(np.square(r)))) / d_tail.size)
    z_seq, p_seq = _z_p(m_t, se_seq)
    diff = m_t - m_h
    se_diff = (
        math.sqrt(se_t**2 + se_h**2) if math.isfinite(se_t) and math.isfinite(se_h) else math.nan
    )
    z_diff, p_diff = _z_p(diff, se_diff)
    n = max(t.num_finite, 1)
    return {
        "threshold": float(threshold),
        "n": int(d_tail.size),
        "token_share": d_tail.size / n if t.num_finite else math.nan,
        "abs_delta_share": float(ad[is_tail].sum()) / total_ad if total_ad > 0 else math.nan,
        "mean_delta": m_t,
        "se": se_t,
        "z": z_t,
        "p_value": p_t,
        "se_seq": se_seq,
        "z_seq": z_seq,
        "p_value_seq": p_seq,
        "head": {"n": int(d_head.size), "mean_delta": m_h, "se": se_h, "z": z_h, "p_value": p_h},
        "diff": diff,
        "se_diff": se_diff,
        "z_diff": z_diff,
        "p_value_diff": p_diff,
    }


# ----------------------------------------------------------------------------- sequences


def sequence_stats(df: pd.DataFrame | TokenArrays, by: str | None = None) -> pd.DataFrame:
    """One row per sequence: seq_id, num_tokens, num_infinite, sum_delta (+inf if any token
    is infinite), sum_abs_delta, mean_delta (the log-PPL gap, mean_t logp_infer - mean_t
    logp_train; inf likewise), sum_one_minus_p (over all its tokens, p as in `by`)."""
    t = token_arrays(df, by)
    S = t.num_sequences
    n_fin = np.bincount(t.seq, minlength=S)  # [S]
    n_inf = np.bincount(t.seq_infinite, minlength=S)  # [S]
    num = n_fin + n_inf
    sum_d = np.bincount(t.seq, weights=t.delta, minlength=S)
    sum_ad = np.bincount(t.seq, weights=np.abs(t.delta), minlength=S)
    sum_x = np.bincount(t.seq, weights=t.one_minus_p, minlength=S) + np.bincount(
        t.seq_infinite, weights=1.0 - t.p_infinite, minlength=S
    )
    has_inf = n_inf > 0
    sum_d = np.where(has_inf, np.inf, sum_d)
    return pd.DataFrame(
        {
            "seq_id": t.seq_ids,
            "num_tokens": num.astype(np.int64),
            "num_infinite": n_inf.astype(np.int64),
            "sum_delta": sum_d,
            "sum_abs_delta": np.where(has_inf, np.inf, sum_ad),
            "mean_delta": sum_d / np.maximum(num, 1),
            "sum_one_minus_p": sum_x,
        }
    )


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


def _stats3(w: np.ndarray, prefix: str) -> dict[str, float]:
    if not w.size:
        return {f"{prefix}_mean": math.nan, f"{prefix}_min": math.nan, f"{prefix}_max": math.nan}
    return {
        f"{prefix}_mean": float(w.mean()),
        f"{prefix}_min": float(w.min()),
        f"{prefix}_max": float(w.max()),
    }


def rl_metrics(
    df: pd.DataFrame | TokenArrays, seqs: pd.DataFrame | None = None, by: str | None = None
) -> dict[str, float]:
    """The metrics RL frameworks log (docs/theory.md, "The metrics RL frameworks log"), finite tokens / sequences only.

    d = -delta (verl); the token ratio r = exp(d) with d clamped to +-20 as verl clamps it
    (is_token_*, ess_token, chi2_token, k2; k1 and k3 are unclamped, like verl's kl and
    k3_kl); a sequence's ratio is the product exp(sum d) (the sum clamped to +-20, as chi2_seq)
    or the geometric mean exp(mean d). ESS is the fraction 1 / mean((w / mean w)^2). Caps
    count ratios ABOVE C (what truncated IS clips).
    """
    t = token_arrays(df, by)
    seqs = sequence_stats(t) if seqs is None else seqs
    d = t.delta  # [n]
    ad = np.abs(d)
    dp = np.abs(t.p_train - t.p_infer)  # [n]
    fin = seqs[np.isfinite(seqs["sum_delta"].to_numpy())]
    sum_delta = fin["sum_delta"].to_numpy(dtype=np.float64)  # [S']
    gap = fin["mean_delta"].to_numpy(dtype=np.float64)  # [S'] log-PPL gap per sequence
    ratio = M.importance_ratio(d)  # [n] exp(clamp(-delta, +-20)), verl's token ratio
    w_seq = np.exp(np.clip(-sum_delta, -M.SEQ_LOG_CLAMP, M.SEQ_LOG_CLAMP))  # [S']
    w_geo = np.exp(-gap)  # [S']
    pearson = math.nan
    if d.size > 1 and np.std(t.p_train) > 0 and np.std(t.p_infer) > 0:
        pearson = float(np.corrcoef(t.p_train, t.p_infer)[0, 1])

    def mean_or_nan(a: np.ndarray) -> float:
        return float(a.mean()) if a.size else math.nan

    out: dict[str, float] = {
        "k1": M.k1(d),
        "k2": M.k2(d),
        "k3": M.k3(d),
        "mean_delta": M.k1(d),
        "std_delta": float(d.std()) if d.size else math.nan,
        "mean_abs_delta": M.mean_abs(d),
        "max_abs_delta": M.max_abs(d),
        "std_abs_delta": float(ad.std()) if d.size else math.nan,
        "mean_abs_dp": mean_or_nan(dp),
        "max_abs_dp": float(dp.max()) if dp.size else math.nan,
        "pearson_p": pearson,
        "log_ppl_gap_mean": mean_or_nan(gap),
        "log_ppl_gap_abs_mean": mean_or_nan(np.abs(gap)),
        "ppl_ratio": mean_or_nan(np.exp(gap)),
        "chi2_token": M.chi2_token(d),
        "chi2_seq": M.chi2_seq(-sum_delta),
        **_stats3(ratio, "is_token"),
        **_stats3(w_seq, "is_seq"),
        **_stats3(w_geo, "is_seq_geo"),
        "ess_token": M.ess(ratio),
        "ess_seq": M.ess(w_seq),
        "ess_seq_geo": M.ess(w_geo),
    }
    for c in M.CAPS:
        out[f"frac_token_above_cap_{c:g}"] = mean_or_nan(ratio > c)
        out[f"frac_seq_above_cap_{c:g}"] = mean_or_nan(w_seq > c)
    return out


# ----------------------------------------------------------------------------- imported runs

NO_EPS_HAT_ESTIMATOR = (
    "q0.99 of the eps needed to cover |delta| (this run has no eps_hat: a check of the "
    "(1 - p) shape, not an independent bound)"
)


def choose_eps(
    t: TokenArrays, eps: float | None, eps_data: float | None = None
) -> tuple[float, str]:
    """The eps of the envelopes and how it was chosen: --eps if given; else the q0.99 of
    eps_hat; else, for a run without eps_hat (imports: no dump stores the inference top-K),
    the q0.99 of the per-token eps needed to cover |delta| (`eps_needed`), which makes 1%
    of tokens exceed the exact envelope by construction (the label says so)."""
    if eps is not None:
        return float(eps), "--eps"
    est = theory.estimate_eps(t.eps_hat) if eps_data is None else eps_data
    if math.isfinite(est):
        return est, theory.eps_estimator_name()
    return eps_needed(t, 0.99), NO_EPS_HAT_ESTIMATOR


GROUP_KEYS: tuple[str, ...] = ("step", "env")
RATIO_BAND = (0.5, 2.0)


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
    kept = df["kept_train"].to_numpy(dtype=bool) if "kept_train" in df.columns else None
    return _group_metrics(
        df[key],
        df["seq_id"].to_numpy(),
        df["delta"].to_numpy(dtype=np.float64),
        df[f"p_{check_by(by)}"].to_numpy(dtype=np.float64),
        kept,
        key,
        tail,
    )


def _group_metrics(
    keys: pd.Series,
    seq: np.ndarray,
    delta: np.ndarray,
    p: np.ndarray,
    kept: np.ndarray | None,
    key: str,
    tail: float,
) -> list[dict[str, Any]]:
    """`group_metrics` on arrays: keys [N] (nulls allowed), seq / delta / p / kept [N].
    One factorize, then a bincount per statistic (no loop over tokens)."""
    codes, uniq = pd.factorize(keys, sort=True)  # [N] group index, -1 where null; [G]
    G = len(uniq)
    has = codes >= 0  # [N]
    fin = np.isfinite(delta) & has  # [N] counted in the means
    if kept is not None:
        fin &= kept
    n_tok = np.bincount(codes[has], minlength=G)  # [G]
    c = codes[fin]  # [n]
    d = delta[fin]  # [n]
    ad = np.abs(d)
    n_fin = np.bincount(c, minlength=G)
    sum_ad = np.bincount(c, weights=ad, minlength=G)
    sum_d = np.bincount(c, weights=d, minlength=G)
    sum_k3 = np.bincount(c, weights=M.k3_per_token(d), minlength=G)
    tail_ad = np.bincount(c, weights=np.where(p[fin] < tail, ad, 0.0), minlength=G)
    n_out = np.bincount(c[ad > math.log(RATIO_BAND[1])], minlength=G)  # r outside [1/2, 2]
    # sequences per group: distinct (group, sequence) pairs
    sc, su = pd.factorize(seq[has])  # [N'] sequence index, [S]
    pairs = np.unique(codes[has].astype(np.int64) * max(len(su), 1) + sc)
    n_seq = np.bincount(pairs // max(len(su), 1), minlength=G)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_ad, mean_d, k3 = sum_ad / n_fin, sum_d / n_fin, sum_k3 / n_fin
        tail_share, frac_out = tail_ad / sum_ad, n_out / n_fin
    values = uniq.tolist() if hasattr(uniq, "tolist") else list(uniq)
    return [
        {
            key: values[g],
            "num_tokens": int(n_tok[g]),
            "num_infinite": int(n_tok[g] - n_fin[g]),
            "num_sequences": int(n_seq[g]),
            "mean_abs_delta": float(mean_ad[g]),
            "mean_delta": float(mean_d[g]),
            "k3": float(k3[g]),
            "tail_abs_delta_share": float(tail_share[g]),
            "frac_ratio_outside_0.5_2": float(frac_out[g]),
        }
        for g in range(G)
    ]


def analyze_groups(
    path: str | Path, key: str, tail: float = DEFAULT_TAIL, by: str = "train"
) -> list[dict[str, Any]]:
    """`group_metrics` of a run directory, reading only the five columns it needs."""
    import pyarrow.parquet as pq

    from .schema import TOKENS_FILE

    if key not in GROUP_KEYS:
        raise MismatchError(f"--group-by must be one of {', '.join(GROUP_KEYS)}, got {key!r}")
    file = Path(path) / TOKENS_FILE
    if key not in pq.read_schema(file).names:
        raise MismatchError(
            f"run {path} has no {key} column: only imported runs (`mismatch import`) carry {key}"
        )
    side = f"p_{check_by(by)}"
    t = pq.read_table(file, columns=["seq_id", "delta", side, "kept_train", key])
    col = lambda name: t.column(name).to_numpy()  # noqa: E731
    groups = _group_metrics(
        t.column(key).to_pandas(),
        col("seq_id"),
        col("delta"),
        col(side),
        col("kept_train"),
        key,
        tail,
    )
    return json_ready(groups)


# ----------------------------------------------------------------------------- distribution level

COARSE_QUANTILES = (0.9, 0.99)


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
    cols = [c for c in COARSE_COLUMNS if c in df.columns]
    if not cols:
        return None
    e = parse_edges(edges)
    nb = len(e) - 1
    idx = bucket_index(df[f"p_{check_by(by)}"].to_numpy(dtype=np.float64), e)  # [N]
    overall: dict[str, Any] = {}
    rows: dict[str, Any] = {
        "lo": e[:-1],
        "hi": e[1:],
        "count": np.bincount(idx[idx >= 0], minlength=nb),
    }
    for c in cols:
        v = df[c].to_numpy(dtype=np.float64)  # [N]
        fin = np.isfinite(v)
        vf = v[fin]  # [m]
        q = np.quantile(vf, (*COARSE_QUANTILES, 1.0)) if vf.size else np.full(3, np.nan)
        overall[c] = {
            "count": int(vf.size),
            "num_infinite": int((~fin).sum()),
            "mean": float(vf.mean()) if vf.size else math.nan,
            "p90": q[0],
            "p99": q[1],
            "max": q[2],
        }
        keep = fin & (idx >= 0)
        b = idx[keep]  # [m'] bucket of each finite value inside the edges
        n = np.bincount(b, minlength=nb)  # [B]
        with np.errstate(invalid="ignore", divide="ignore"):
            rows[f"{c}_mean"] = np.bincount(b, weights=v[keep], minlength=nb) / n
        qs = group_quantiles(v[keep], b, nb, COARSE_QUANTILES)  # [B, 2]
        rows[f"{c}_p90"], rows[f"{c}_p99"] = qs[:, 0], qs[:, 1]
        rows[f"{c}_num_infinite"] = np.bincount(idx[~fin & (idx >= 0)], minlength=nb)
    return {"columns": cols, "overall": overall, "buckets": pd.DataFrame(rows)}


# ----------------------------------------------------------------------------- analyze


def _run_info(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    cfg = meta.get("config", {}) or {}
    keys = ("infer_engine", "infer_dtype", "train_dtype", "temperature", "top_p", "top_k", "min_p")
    return {
        "path": str(path),
        "status": meta.get("status"),
        "model": (meta.get("model") or {}).get("name") or cfg.get("model"),
        **{k: cfg.get(k) for k in keys},
        "train_engine": ((meta.get("engines") or {}).get("train") or {}).get("engine"),
    }


def analyze(
    source: pd.DataFrame | str | Path,
    *,
    edges: Sequence[float] | str | None = DEFAULT_EDGES,
    by: str = "train",
    tail: float = DEFAULT_TAIL,
    eps: float | None = None,
    sequences: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """The full report of a run (path) or token DataFrame, as a JSON-ready dict.

    Keys: run, warnings, conventions, by, num_tokens, num_finite, num_infinite,
    num_sequences, num_sequences_infinite, num_outside_edges, eps (used for the envelopes),
    eps_hat (the data's estimate, q0.99 of per-position eps_hat), eps_estimator,
    eps_hat_quantiles, eps_needed_q99, edges, buckets, envelope, fit, tail, accumulation,
    metrics, distribution_level (`distribution_level`; None for runs without those
    columns), verdict. NaN becomes None. `sequences` (optional) only supplies num_sequences
    when it lists completions the token table lacks; every statistic comes from the tokens.
    """
    by = check_by(by)
    e = parse_edges(edges)
    if not 0 < tail <= 1:
        raise MismatchError(f"--tail must be in (0, 1], got {tail}")
    if eps is not None and not (math.isfinite(eps) and eps >= 0):
        raise MismatchError(f"--eps must be a finite number >= 0, got {eps}")
    run: dict[str, Any] | None = None
    warnings: list[str] = []
    if isinstance(source, (str, Path)):
        from .runs import token_columns

        optional = [c for c in COARSE_COLUMNS if c in token_columns(source)]
        df, meta, warnings = load_tokens(source, (*REQUIRED_COLUMNS, *optional))
        run = _run_info(Path(source), meta)
    else:
        df = source
        if len(df) == 0:
            raise MismatchError("the token table is empty: nothing to report")
    t = token_arrays(df, by)
    dist = distribution_level(df, e, by)
    del df

    eps_data = theory.estimate_eps(t.eps_hat)
    eps_used, estimator = choose_eps(t, eps, eps_data)
    finite_eh = t.eps_hat[np.isfinite(t.eps_hat)]
    eh_q = (
        dict(
            zip(
                ("p50", "p90", "p99", "max"),
                np.quantile(finite_eh, [0.5, 0.9, 0.99, 1.0]),
                strict=True,
            )
        )
        if finite_eh.size
        else {}
    )

    buckets = bucket_stats(t, e, by, eps_used)
    seqs = sequence_stats(t)
    n_seq_inf = int((seqs["num_infinite"] > 0).sum())
    num_sequences = t.num_sequences
    if sequences is not None and "seq_id" in sequences.columns:
        num_sequences = max(num_sequences, int(sequences["seq_id"].nunique()))
    if t.num_infinite:
        warnings.append(
            f"{t.num_infinite} token(s) have an infinite delta (kept-set disagreement): "
            "counted in num_infinite, excluded from every statistic"
        )
    side = f"p_{by}"
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
        },
        "by": by,
        "num_tokens": t.num_tokens,
        "num_finite": t.num_finite,
        "num_infinite": t.num_infinite,
        "frac_infinite": t.num_infinite / t.num_tokens,
        "num_sequences": num_sequences,
        "num_sequences_infinite": n_seq_inf,
        "num_outside_edges": t.num_finite - int(buckets["count"].sum()),
        "eps": eps_used,
        "eps_hat": eps_data,
        "eps_estimator": estimator,
        "eps_hat_quantiles": eh_q,
        "eps_needed_q99": eps_needed(t, 0.99, by),
        "edges": e,
        "buckets": buckets,
        "envelope": envelope_check(t, eps_used, by),
        "fit": fit_slope(t.one_minus_p, np.abs(t.delta)),
        "tail": tail_bias(t, tail, by),
        "accumulation": accumulation(seqs),
        "metrics": rl_metrics(t, seqs),
        "distribution_level": dist,
    }
    result = json_ready(result)
    result["verdict"] = verdict(result)
    return result


__all__ = [
    "DEFAULT_EDGES",
    "DEFAULT_TAIL",
    "REQUIRED_COLUMNS",
    "TokenArrays",
    "accumulation",
    "analyze",
    "analyze_groups",
    "bucket_index",
    "bucket_stats",
    "choose_eps",
    "distribution_level",
    "envelope_check",
    "eps_needed",
    "estimate_eps",
    "fit_slope",
    "group_metrics",
    "group_quantiles",
    "json_ready",
    "length_bins",
    "load_tokens",
    "parse_edges",
    "rl_metrics",
    "sequence_stats",
    "tail_bias",
    "token_arrays",
    "verdict",
]
