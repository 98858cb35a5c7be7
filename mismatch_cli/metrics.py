"""Per-token and per-sequence mismatch metrics, under the names RL frameworks log them.

Inputs are 1-D numpy arrays of FINITE deltas (callers drop the infinite ones and report them
separately). Conventions (docs/theory.md, "The metrics RL frameworks log"):
    delta = logp_infer - logp_train           (this tool)
    d     = logp_train - logp_infer = -delta  (verl's log_ratio)
    r     = p_train / p_infer = exp(d)        (the per-token importance ratio)

verl clamps d to +-20 (`SAFETY_BOUND`, verl/trainer/ppo/rollout_corr_helper.py @1dda039)
before its importance weights, its rejection statistics (k2) and chi2_token, and clamps the
sequence SUM to +-20 in chi2_seq; k1 (`kl`) and k3 (`k3_kl`) are not clamped. Metrics here that
carry a verl name follow the same rule, so a token with |delta| > 20 gives verl's number.
"""

from __future__ import annotations

import numpy as np

CAPS: tuple[float, ...] = (2.0, 3.0, 5.0)
RATIO_BAND = (0.5, 2.0)  # frac_ratio_outside_0.5_2: r = exp(-delta) outside it, |delta| > log 2
LOG_RATIO_CLAMP = 20.0  # verl's SAFETY_BOUND
SEQ_LOG_CLAMP = LOG_RATIO_CLAMP


# (key, label, note) in display order; caps are appended.
METRIC_ROWS: tuple[tuple[str, str, str], ...] = (
    ("k1", "k1  mean(delta)", "KL(q||p) estimate; can be < 0"),
    ("k2", "k2  mean(d^2 / 2)", "d = -delta"),
    ("k3", "k3  mean(e^d - 1 - d)", ">= 0"),
    ("mean_abs_delta", "mean |delta|", "slime: > 0.1 fails CI"),
    ("max_abs_delta", "max |delta|", ""),
    ("p99_abs_delta", "p99 |delta|", "exact up to 2^20 tokens, the sketch beyond"),
    ("std_abs_delta", "std |delta|", ""),
    ("mean_abs_dp", "mean |delta p|", "verl: < 0.005 normal, > 0.01 suspicious"),
    ("max_abs_dp", "max |delta p|", ""),
    ("pearson_p", "Pearson(p_train,p_infer)", ""),
    ("log_ppl_gap_mean", "log-PPL gap, mean", "per sequence mean_t delta"),
    ("log_ppl_gap_abs_mean", "log-PPL gap, mean |.|", ""),
    ("ppl_ratio", "PPL ratio  mean exp(gap)", "PPL_train / PPL_infer"),
    ("chi2_token", "chi^2 token mean(r^2-1)", ""),
    ("chi2_seq", "chi^2 sequence", "log-ratio clamped to +-20"),
    ("is_token_mean", "IS ratio token: mean", "r = exp(-delta)"),
    ("is_token_min", "IS ratio token: min", ""),
    ("is_token_max", "IS ratio token: max", ""),
    ("is_seq_mean", "IS ratio seq (product): mean", "exp(-sum delta)"),
    ("is_seq_min", "IS ratio seq (product): min", ""),
    ("is_seq_max", "IS ratio seq (product): max", ""),
    ("is_seq_geo_mean", "IS ratio seq (geo mean): mean", "exp(-mean delta)"),
    ("is_seq_geo_min", "IS ratio seq (geo mean): min", ""),
    ("is_seq_geo_max", "IS ratio seq (geo mean): max", ""),
    ("ess_token", "ESS token", "fraction 1 / mean((w / mean w)^2)"),
    ("ess_seq", "ESS seq (product)", ""),
    ("ess_seq_geo", "ESS seq (geo mean)", ""),
    ("frac_ratio_outside_0.5_2", "share with r outside [0.5, 2]", "|delta| > log 2"),
)

# One line each: what the metric is, in this tool's sign (delta = logp_infer - logp_train,
# r = exp(-delta)); the report page shows it as the metric's hover title
# (docs/theory.md §7 "The metrics RL frameworks log" has the formulas and the frameworks' names).
METRIC_DEFINITIONS: dict[str, str] = {
    "k1": "mean(delta): the sample estimate of KL(q||p) from tokens drawn from q (verl's kl)",
    "k2": "mean(delta^2 / 2), delta clamped to +-20 (verl's token_k2)",
    "k3": "mean(exp(-delta) - 1 + delta), always >= 0, unclamped (verl's k3_kl)",
    "mean_abs_delta": "mean |logp_infer - logp_train| over finite tokens (slime's CI check)",
    "max_abs_delta": "largest |delta| over finite tokens",
    "p99_abs_delta": "99th percentile of |delta| (exact up to 2^20 tokens, a sketch beyond)",
    "std_abs_delta": "standard deviation of |delta|",
    "mean_abs_dp": "mean |p_train - p_infer| of the sampled token (verl's rollout_probs_diff)",
    "max_abs_dp": "largest |p_train - p_infer|",
    "pearson_p": "Pearson correlation of p_train and p_infer over tokens",
    "log_ppl_gap_mean": "mean over sequences of mean_t delta (log PPL_train - log PPL_infer)",
    "log_ppl_gap_abs_mean": "mean over sequences of |mean_t delta|",
    "ppl_ratio": "mean over sequences of exp(mean_t delta) = PPL_train / PPL_infer",
    "chi2_token": "mean(r^2) - 1 with r = exp(clamp(-delta, +-20))",
    "chi2_seq": "mean(exp(2 clamp(-sum_t delta, +-20)) - 1) over sequences",
    "is_token_mean": "mean token importance ratio r = exp(-delta) (clamped log-ratio)",
    "is_token_min": "smallest token importance ratio",
    "is_token_max": "largest token importance ratio",
    "is_seq_mean": "mean sequence ratio exp(-sum_t delta) (clamped to +-20)",
    "is_seq_min": "smallest sequence ratio exp(-sum_t delta)",
    "is_seq_max": "largest sequence ratio exp(-sum_t delta)",
    "is_seq_geo_mean": "mean geometric-mean sequence ratio exp(-mean_t delta)",
    "is_seq_geo_min": "smallest exp(-mean_t delta)",
    "is_seq_geo_max": "largest exp(-mean_t delta)",
    "ess_token": "effective sample size fraction 1 / mean((w / mean w)^2) of the token ratios",
    "ess_seq": "effective sample size fraction of the sequence (product) ratios",
    "ess_seq_geo": "effective sample size fraction of the geometric-mean sequence ratios",
    "frac_ratio_outside_0.5_2": "share of tokens with r = exp(-delta) outside [0.5, 2] (|delta| > log 2)",
}


def clamped_log_ratio(delta: np.ndarray) -> np.ndarray:
    """d = -delta clamped to [-20, 20], as verl clamps its log-ratio. [n] -> [n]"""
    return np.clip(-np.asarray(delta, dtype=np.float64), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def importance_ratio(delta: np.ndarray) -> np.ndarray:
    """Token importance ratio r = exp(clamp(d, +-20)) (verl's token IS weight before any cap)."""
    return np.exp(clamped_log_ratio(delta))


def k1(delta: np.ndarray) -> float:
    """k1 estimate of KL(q || p): mean(-d) = mean(delta), unclamped (verl `kl`). Can be < 0."""
    return float(np.mean(delta)) if delta.size else float("nan")


def k2(delta: np.ndarray) -> float:
    """k2 = mean(d^2 / 2), d clamped to +-20 (verl's `token_k2`)."""
    return float(np.mean(np.square(clamped_log_ratio(delta)) / 2)) if delta.size else float("nan")


def k3_per_token(delta: np.ndarray) -> np.ndarray:
    """k3_t = exp(d) - 1 - d, d = -delta, unclamped; always >= 0. [n] -> [n]"""
    d = -np.asarray(delta, dtype=np.float64)
    return np.expm1(d) - d


def k3_per_token_clamped(delta: np.ndarray) -> np.ndarray:
    """k3_t on the log-ratio clamped to +-20 (verl's `seq_mean_k3` mask); >= 0. [n] -> [n]"""
    c = clamped_log_ratio(delta)
    return np.expm1(c) - c


def k3(delta: np.ndarray) -> float:
    """k3 = mean(exp(d) - 1 - d), unclamped (verl `k3_kl`); always >= 0."""
    return float(np.mean(k3_per_token(delta))) if delta.size else float("nan")


def mean_abs(delta: np.ndarray) -> float:
    """Mean |delta| (TRL's sampling_logp_difference/mean, slime's logprob_abs_diff)."""
    return float(np.mean(np.abs(delta))) if delta.size else float("nan")


def max_abs(delta: np.ndarray) -> float:
    """Largest |delta|."""
    return float(np.max(np.abs(delta))) if delta.size else float("nan")


def p99_abs(delta: np.ndarray) -> float:
    """99th percentile of |delta| (numpy's linear interpolation): the tail a mean hides."""
    return float(np.percentile(np.abs(delta), 99)) if delta.size else float("nan")


def frac_ratio_outside(delta: np.ndarray, lo: float = 0.5, hi: float = 2.0) -> float:
    """Share of tokens whose ratio r = exp(-delta) lies outside [lo, hi], i.e. delta > -log lo
    or delta < -log hi (compared in log space: no overflow). [n] -> float"""
    if not delta.size:
        return float("nan")
    d = np.asarray(delta, dtype=np.float64)
    return float(np.mean((d > -np.log(lo)) | (d < -np.log(hi))))


def chi2_token(delta: np.ndarray) -> float:
    """Token chi-square: mean(r^2) - 1 with r = exp(clamp(d, +-20)) (verl `chi2_token`)."""
    if not delta.size:
        return float("nan")
    return float(np.mean(np.expm1(2 * clamped_log_ratio(delta))))


def chi2_seq(seq_sum_d: np.ndarray) -> float:
    """Sequence chi-square: mean(exp(2 * clamp(sum_t d, -20, 20)) - 1), d = -delta."""
    if not seq_sum_d.size:
        return float("nan")
    return float(np.mean(np.expm1(2 * np.clip(seq_sum_d, -SEQ_LOG_CLAMP, SEQ_LOG_CLAMP))))


def ess(weights: np.ndarray) -> float:
    """Effective sample size fraction 1 / mean((w / mean w)^2) = (sum w)^2 / (n sum w^2)."""
    if not weights.size:
        return float("nan")
    w = weights / np.mean(weights)
    return float(1.0 / np.mean(np.square(w)))


__all__ = [
    "CAPS",
    "LOG_RATIO_CLAMP",
    "METRIC_DEFINITIONS",
    "METRIC_ROWS",
    "RATIO_BAND",
    "chi2_seq",
    "chi2_token",
    "clamped_log_ratio",
    "ess",
    "frac_ratio_outside",
    "importance_ratio",
    "k1",
    "k2",
    "k3",
    "k3_per_token",
    "k3_per_token_clamped",
    "max_abs",
    "mean_abs",
    "p99_abs",
]
