"""The (1 - p) bound on the sampled-token mismatch (docs/theory.md §3 "The (1 − p) bound"), and
how eps is estimated (§4 "Estimating ε from top-K log-probs").

Notation (one generated position, sampled token a):
    z^q = z^p + delta            logits; eps = max_i |delta_i|      (logit perturbation)
    Delta_a = log q_a - log p_a  the mismatch this tool calls `delta` (nats)
    x = 1 - p_a                  the probability mass NOT on the sampled token

Exact identity:   Delta_a = -log(p_a + x * r_a),
                  r_a = exp(-delta_a) * sum_{b != a} p_b exp(delta_b) / x
                      in [exp(-2 eps), exp(2 eps)]

so Delta_a lies in the interval
    [ -log(1 + x (exp(2 eps) - 1)),  -log(1 - x (1 - exp(-2 eps))) ]
          (r_a = exp(2 eps))               (r_a = exp(-2 eps))
Both ends are attained. The NEGATIVE end is the larger in magnitude (their product
(1 + x(e^{2eps}-1)) (1 - x(1-e^{-2eps})) = 1 + x(1-x)(e^{eps}-e^{-eps})^2 >= 1), so the tight
bound on |Delta_a| is

    |Delta_a| <= log(1 + (1 - p_a)(exp(2 eps) - 1))   <= (exp(2 eps) - 1)(1 - p_a)
                                                      ~= 2 eps (1 - p_a)      (first order)
              <= 2 eps                                                        (always)

Note: the often-quoted "exact" bound -log(1 - (1-p)(1 - exp(-2 eps))) is the bound on POSITIVE
Delta only (`envelope_exact_upper`; docs/theory.md §3 "The bounds the tool draws"). A token with Delta < 0 can
exceed it (p = 0.5, eps = 0.5: Delta = -0.620 > 0.380), so `envelope_exact` is the two-sided
bound above. All functions are vectorised: arrays of any shape broadcast against eps.
"""

from __future__ import annotations

import numpy as np

# The default global eps estimator: this quantile of the per-position eps_hat.
EPS_QUANTILE = 0.99


# ----------------------------------------------------------------------------- envelopes


def envelope_first_order(one_minus_p: np.ndarray, eps: float) -> np.ndarray:
    """First-order envelope 2 eps (1 - p): the (1 - p) shape at small eps. [...] -> [...]"""
    return 2.0 * eps * np.asarray(one_minus_p, dtype=np.float64)


def envelope_exact_upper(one_minus_p: np.ndarray, eps: float) -> np.ndarray:
    """Largest POSITIVE Delta: -log(1 - (1 - p)(1 - exp(-2 eps))) (the often-quoted form)."""
    x = np.asarray(one_minus_p, dtype=np.float64)
    return -np.log1p(x * np.expm1(-2.0 * eps))  # expm1(-2eps) = -(1 - exp(-2 eps))


def envelope_exact_lower(one_minus_p: np.ndarray, eps: float) -> np.ndarray:
    """Most NEGATIVE Delta: -log(1 + (1 - p)(exp(2 eps) - 1)) (a value <= 0)."""
    x = np.asarray(one_minus_p, dtype=np.float64)
    return -np.log1p(x * np.expm1(2.0 * eps))


def envelope_exact(one_minus_p: np.ndarray, eps: float) -> np.ndarray:
    """Tight bound on |Delta|: log(1 + (1 - p)(exp(2 eps) - 1)) = max of both signed ends."""
    return -envelope_exact_lower(one_minus_p, eps)


def envelope_weak(one_minus_p: np.ndarray, eps: float) -> np.ndarray:
    """The simpler linear bound (exp(2 eps) - 1)(1 - p) >= envelope_exact."""
    return np.expm1(2.0 * eps) * np.asarray(one_minus_p, dtype=np.float64)


def eps_to_cover(abs_delta: np.ndarray, one_minus_p: np.ndarray) -> np.ndarray:
    """Per token, the smallest eps whose exact envelope covers |Delta|: the inverse of
    `envelope_exact` in eps, eps = log(1 + (exp(|Delta|) - 1) / (1 - p)) / 2. [N] -> [N]
    (inf where 1 - p <= 0 and |Delta| > 0: a log-prob rounded above 0 is a p of 1)."""
    ad = np.asarray(abs_delta, dtype=np.float64)
    x = np.maximum(np.asarray(one_minus_p, dtype=np.float64), 0.0)
    if ad.ndim == 0 or ad.shape != x.shape:  # scalars, broadcasting: the formula as it reads
        with np.errstate(divide="ignore", invalid="ignore"):
            return 0.5 * np.log1p(np.where(ad > 0, np.expm1(ad) / x, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.expm1(ad)  # [N] then the ratio and eps, in place (no temporaries)
        ratio /= x
    ratio[~(ad > 0)] = 0.0  # |Delta| = 0 (or NaN): covered by eps = 0, at p = 1 too
    np.log1p(ratio, out=ratio)
    ratio *= 0.5
    return ratio


# ----------------------------------------------------------------------------- identity


def delta_from_ratio(p_a: np.ndarray, r_a: np.ndarray) -> np.ndarray:
    """The exact identity Delta_a = -log(p_a + (1 - p_a) r_a). [...] -> [...]"""
    p_a = np.asarray(p_a, dtype=np.float64)
    return -np.log(p_a + (1.0 - p_a) * np.asarray(r_a, dtype=np.float64))


def sampled_delta(z: np.ndarray, perturbation: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Delta_a = log softmax(z + delta)_a - log softmax(z)_a, computed directly.

    z, perturbation: [N, V] logits and logit perturbation; a: [N] token ids -> [N].
    """
    z = np.asarray(z, dtype=np.float64)
    zq = z + np.asarray(perturbation, dtype=np.float64)
    logp = z - _logsumexp(z)  # [N, V]
    logq = zq - _logsumexp(zq)  # [N, V]
    rows = np.arange(z.shape[0])
    return logq[rows, a] - logp[rows, a]


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=-1, keepdims=True)  # [N, 1]
    return m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


# ----------------------------------------------------------------------------- eps


def eps_hat_spread(logq: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """Per-position eps_hat = (max_i d_i - min_i d_i) / 2, d_i = log q_i - log p_i over the
    observed tokens (NaN / inf entries ignored). Log-probs are shift-invariant, so only the
    spread of delta is observable: this is a LOWER bound on eps. [N, K] -> [N]"""
    d = np.asarray(logq, dtype=np.float64) - np.asarray(logp, dtype=np.float64)  # [N, K]
    ok = np.isfinite(d)
    hi = np.where(ok, d, -np.inf).max(axis=1)
    lo = np.where(ok, d, np.inf).min(axis=1)
    return np.where(ok.sum(axis=1) >= 2, (hi - lo) / 2.0, 0.0)


def estimate_eps(eps_hat: np.ndarray, q: float = EPS_QUANTILE) -> float:
    """Global eps: the q-quantile (default 0.99) of the finite per-position eps_hat.

    Each eps_hat is a lower bound on its position's eps (it sees only the top-K tokens), and
    eps itself varies by position; a high quantile is a robust estimate of the typical
    worst-case perturbation, neither a strict upper bound (a max would be, of the lower
    bounds only, and is dominated by a few outliers) nor a typical value. NaN if none.
    """
    v = np.asarray(eps_hat, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(np.quantile(v, q)) if v.size else float("nan")


def eps_estimator_name(q: float = EPS_QUANTILE) -> str:
    """The label recorded with the estimate, e.g. 'q0.99 of eps_hat'."""
    return f"q{q:g} of eps_hat"
