"""The (1 - p) bound and the eps estimator: hand-computed values and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mismatch_cli import theory

# ----------------------------------------------------------------------------- hand values


def test_envelopes_hand_computed() -> None:
    # x = 1 - p = 0.5, eps = 0.5 (2 eps = 1):
    x, eps = 0.5, 0.5
    assert theory.envelope_first_order(x, eps) == pytest.approx(0.5)
    # -log(1 - 0.5 (1 - e^-1)) and log(1 + 0.5 (e - 1))
    assert theory.envelope_exact_upper(x, eps) == pytest.approx(
        -math.log(1 - 0.5 * (1 - math.e**-1))
    )
    assert theory.envelope_exact_upper(x, eps) == pytest.approx(0.3798854930)
    assert theory.envelope_exact_lower(x, eps) == pytest.approx(-0.6201145070)
    assert theory.envelope_exact(x, eps) == pytest.approx(math.log(1 + 0.5 * (math.e - 1)))
    assert theory.envelope_weak(x, eps) == pytest.approx(0.5 * (math.e - 1))


def test_envelopes_vanish_at_p_one_and_saturate_in_the_tail() -> None:
    eps = 0.2
    assert theory.envelope_exact(0.0, eps) == 0.0
    assert theory.envelope_first_order(0.0, eps) == 0.0
    assert theory.envelope_exact(1.0, eps) == pytest.approx(2 * eps)  # p -> 0: 2 eps
    x = np.array([0.0, 1e-6, 0.1, 0.5, 1.0])
    assert theory.envelope_exact(x, eps).shape == (5,)
    assert np.all(np.diff(theory.envelope_exact(x, eps)) > 0)  # increasing in 1 - p


def test_theory_md_formula_is_one_sided_counterexample() -> None:
    """p = (0.5, 0.5), logit perturbation (-0.5, +0.5): token 0 has Delta = -0.620, beyond
    theory.md's -log(1 - (1-p)(1 - e^-2eps)) = 0.380 but on the two-sided exact envelope."""
    z = np.zeros((1, 2))
    d = np.array([[-0.5, 0.5]])
    delta = theory.sampled_delta(z, d, np.array([0]))[0]
    assert delta == pytest.approx(-0.6201145070)
    assert abs(delta) > theory.envelope_exact_upper(0.5, 0.5)
    assert abs(delta) == pytest.approx(theory.envelope_exact(0.5, 0.5))


def test_delta_identity_matches_direct_computation() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 7)) * 3
    d = rng.uniform(-0.3, 0.3, size=(50, 7))
    a = rng.integers(0, 7, size=50)
    p = np.exp(z - np.log(np.exp(z).sum(1, keepdims=True)))  # [N, V]
    rows = np.arange(50)
    p_a = p[rows, a]
    others = (p * np.exp(d)).sum(1) - p_a * np.exp(d[rows, a])
    r_a = np.exp(-d[rows, a]) * others / (1 - p_a)
    np.testing.assert_allclose(
        theory.delta_from_ratio(p_a, r_a), theory.sampled_delta(z, d, a), atol=1e-12
    )
    assert np.all((r_a >= np.exp(-0.6) - 1e-12) & (r_a <= np.exp(0.6) + 1e-12))


def test_eps_to_cover_inverts_the_exact_envelope() -> None:
    x = np.array([1e-4, 0.01, 0.3, 0.9, 1.0])
    for eps in (1e-3, 0.05, 0.5, 2.0):
        env = theory.envelope_exact(x, eps)
        np.testing.assert_allclose(theory.eps_to_cover(env, x), eps, rtol=1e-9)
    assert theory.eps_to_cover(np.array([0.0]), np.array([0.0]))[0] == 0.0
    assert theory.eps_to_cover(np.array([0.1]), np.array([0.0]))[0] == np.inf


def test_estimate_eps_is_the_quantile_of_finite_eps_hat() -> None:
    v = np.concatenate([np.arange(1, 101) / 100.0, [np.nan, np.inf]])  # 0.01 .. 1.00
    assert theory.estimate_eps(v) == pytest.approx(np.quantile(np.arange(1, 101) / 100, 0.99))
    assert theory.estimate_eps(v, q=0.5) == pytest.approx(0.505)
    assert math.isnan(theory.estimate_eps(np.array([np.nan])))
    assert theory.eps_estimator_name() == "q0.99 of eps_hat"


def test_eps_hat_spread_hand_computed() -> None:
    logq = np.array([[-1.0, -2.0, -3.0], [-1.0, np.nan, -np.inf]])
    logp = np.array([[-1.1, -1.8, -3.0], [-1.0, -1.0, -1.0]])
    # row 0: d = (0.1, -0.2, 0.0): spread 0.3 -> 0.15; row 1: one finite d -> 0
    np.testing.assert_allclose(theory.eps_hat_spread(logq, logp), [0.15, 0.0])


# ----------------------------------------------------------------------------- properties


@st.composite
def logits_and_perturbation(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, float]:
    V = draw(st.integers(2, 24))
    z = draw(arrays(np.float64, (1, V), elements=st.floats(-30, 30)))
    eps = draw(st.floats(1e-4, 3.0))
    u = draw(arrays(np.float64, (1, V), elements=st.floats(-1, 1)))
    return z, u * eps, eps


@settings(max_examples=300, deadline=None)
@given(logits_and_perturbation())
def test_exact_bound_holds_for_every_token_and_perturbation(
    case: tuple[np.ndarray, np.ndarray, float],
) -> None:
    z, d, eps = case
    V = z.shape[1]
    a = np.arange(V)
    delta = theory.sampled_delta(np.repeat(z, V, 0), np.repeat(d, V, 0), a)  # every token
    logp = z[0] - np.log(np.sum(np.exp(z[0] - z[0].max()))) - z[0].max()
    x = -np.expm1(logp)  # 1 - p_a, accurate near p = 1
    tol = 1e-9 * (1 + np.abs(delta))
    assert np.all(np.abs(delta) <= theory.envelope_exact(x, eps) + tol)
    assert np.all(delta <= theory.envelope_exact_upper(x, eps) + tol)
    assert np.all(delta >= theory.envelope_exact_lower(x, eps) - tol)
    assert np.all(theory.envelope_exact(x, eps) <= theory.envelope_weak(x, eps) + 1e-12)
    assert np.all(np.abs(delta) <= 2 * eps + tol)
    # eps_hat sees only differences of delta: a lower bound on eps
    assert theory.eps_hat_spread(logp[None, :] + delta[None, :], logp[None, :])[0] <= eps + 1e-9


@settings(max_examples=100, deadline=None)
@given(
    z=arrays(np.float64, (1, 6), elements=st.floats(-10, 10)),
    eps=st.floats(1e-3, 2.0),
    a=st.integers(0, 5),
)
def test_both_ends_of_the_exact_bound_are_attained(z: np.ndarray, eps: float, a: int) -> None:
    x = -np.expm1(_logp(z, a))  # 1 - p_a
    down = np.full_like(z, eps)
    down[0, a] = -eps  # r_a = exp(2 eps): the most negative Delta
    up = -down
    lo = theory.sampled_delta(z, down, np.array([a]))[0]
    hi = theory.sampled_delta(z, up, np.array([a]))[0]
    assert lo == pytest.approx(float(theory.envelope_exact_lower(x, eps)), abs=1e-9)
    assert hi == pytest.approx(float(theory.envelope_exact_upper(x, eps)), abs=1e-9)


def _logp(z: np.ndarray, a: int) -> float:
    m = z.max()
    return float(z[0, a] - m - np.log(np.exp(z[0] - m).sum()))
