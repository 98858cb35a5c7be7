"""Per-token and per-sequence mismatch metrics, under the names RL frameworks log them.

Inputs are 1-D numpy arrays of FINITE deltas (callers drop the infinite ones, which are
kept-set disagreements, and report them separately). Conventions (theory.md section 5):
    delta = logp_infer - logp_train        (this tool)
    d     = logp_train - logp_infer = -delta  (verl)
    rho   = p_train / p_infer = exp(d)     (per-token importance ratio)
"""

from __future__ import annotations

import numpy as np

CAPS: tuple[float, ...] = (2.0, 3.0, 5.0)
SEQ_LOG_CLAMP = 20.0


def k1(delta: np.ndarray) -> float:
    """k1 estimate of KL(q || p): mean(-d) = mean(delta). Can be negative on finite samples."""
    return float(np.mean(delta)) if delta.size else float("nan")


def k2(delta: np.ndarray) -> float:
    """k2 = mean(d^2 / 2)."""
    return float(np.mean(np.square(delta) / 2)) if delta.size else float("nan")


def k3(delta: np.ndarray) -> float:
    """k3 = mean(exp(d) - 1 - d), d = -delta; always >= 0."""
    if not delta.size:
        return float("nan")
    d = -delta
    return float(np.mean(np.expm1(d) - d))


def mean_abs(delta: np.ndarray) -> float:
    return float(np.mean(np.abs(delta))) if delta.size else float("nan")


def max_abs(delta: np.ndarray) -> float:
    return float(np.max(np.abs(delta))) if delta.size else float("nan")


def chi2_token(delta: np.ndarray) -> float:
    """Token chi-square: mean(rho^2 - 1), rho = exp(-delta)."""
    return float(np.mean(np.expm1(-2 * delta))) if delta.size else float("nan")


def chi2_seq(seq_sum_d: np.ndarray) -> float:
    """Sequence chi-square: mean(exp(2 * clamp(sum_t d, -20, 20)) - 1), d = -delta."""
    if not seq_sum_d.size:
        return float("nan")
    return float(np.mean(np.expm1(2 * np.clip(seq_sum_d, -SEQ_LOG_CLAMP, SEQ_LOG_CLAMP))))


def ess(weights: np.ndarray) -> float:
    """Effective sample size fraction 1 / mean((w / mean w)^2), in (0, 1]."""
    if not weights.size:
        return float("nan")
    w = weights / np.mean(weights)
    return float(1.0 / np.mean(np.square(w)))
