"""The DVP primitive against brute-force numpy, its gradients and properties, and exact
agreement with what `sweep-threshold` reads from a stored run for the same logits."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mismatch_cli import dvp
from mismatch_cli import sweep as sw
from mismatch_cli.rescore import position_stats
from mismatch_cli.runs import RunDir, atomic_write_table
from mismatch_cli.sampling import Sampling, processed_logits
from mismatch_cli.schema import RHO_GRID, TOKENS_FILE

RHOS = (1e-6, 1e-3, 0.02, 0.3)


def make_logits(shape: tuple[int, ...], scale: float = 4.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis."""
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def clear_of_boundary(logp64: np.ndarray, log_thr: np.ndarray, margin: float = 1e-4) -> np.ndarray:
    """Entries whose float64 log-prob is not within `margin` of the threshold (where float32
    rounding could legitimately flip the decision)."""
    return np.abs(logp64 - log_thr) > margin


# --- safe_vocab_mask ------------------------------------------------------------------


@pytest.mark.parametrize("rho", RHOS)
def test_min_p_mask_vs_numpy(rho: float) -> None:
    logits = make_logits((3, 5, 40))
    mask = dvp.safe_vocab_mask(logits, rho).numpy()  # [3, 5, 40]
    lp = np_log_softmax(logits.double().numpy())
    p = np.exp(lp)
    expect = p >= rho * p.max(axis=-1, keepdims=True)  # the definition, on probabilities
    ok = clear_of_boundary(lp, lp.max(axis=-1, keepdims=True) + math.log(rho))
    assert mask.shape == (3, 5, 40) and mask.dtype == np.bool_
    assert (mask == expect)[ok].all()
    assert mask.any(axis=-1).all()  # the most likely token is always safe
    assert 0 < (~mask).sum() < mask.size or rho < 1e-3


@pytest.mark.parametrize("tau", RHOS)
def test_absolute_mask_vs_numpy(tau: float) -> None:
    logits = make_logits((4, 50), seed=1)
    mask = dvp.safe_vocab_mask(logits, tau, rule="absolute").numpy()
    lp = np_log_softmax(logits.double().numpy())
    ok = clear_of_boundary(lp, np.full_like(lp, math.log(tau)))
    assert (mask == (np.exp(lp) >= tau))[ok].all()


def np_top_p(p: np.ndarray, top_p: float) -> np.ndarray:
    """Brute-force nucleus, row by row: keep the most likely tokens until their mass reaches
    top_p (equivalently: drop the least likely whose total is <= 1 - top_p)."""
    keep = np.zeros_like(p, dtype=bool)
    for i, row in enumerate(p.reshape(-1, p.shape[-1])):
        total = 0.0
        for j in np.argsort(-row, kind="stable"):
            keep.reshape(-1, p.shape[-1])[i, j] = True
            total += row[j]
            if total >= top_p:
                break
    return keep


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_top_p_mask_vs_numpy(top_p: float) -> None:
    logits = make_logits((6, 30), scale=2.0, seed=2)
    mask = dvp.safe_vocab_mask(logits, top_p, rule="top-p").numpy()
    p = np.exp(np_log_softmax(logits.double().numpy()))
    expect = np_top_p(p, top_p)
    # skip rows where a cumulative sum sits within float32 rounding of the cut
    cum = np.cumsum(np.sort(p, axis=-1), axis=-1)
    ok = (np.abs(cum - (1 - top_p)) > 1e-5).all(axis=-1)
    assert ok.sum() >= 4
    assert (mask[ok] == expect[ok]).all()
    assert (dvp.safe_vocab_mask(logits, 1.0, rule="top-p")).all()


def test_mask_threshold_is_inclusive_and_float32() -> None:
    """vLLM's rule: a token exactly at float32(rho) * p_max is kept; one ulp below is pruned."""
    pmax = np.float32(0.7)
    at = pmax * np.float32(1e-3)
    below = np.nextafter(at, np.float32(0))
    probs = torch.tensor([[pmax, at, below, 1e-9]])
    assert dvp.safe_vocab_mask_from_probs(probs, 1e-3).tolist() == [[True, True, False, False]]
    tau = np.float32(0.25)
    probs = torch.tensor([[tau, np.nextafter(tau, np.float32(0))]])
    assert dvp.safe_vocab_mask_from_probs(probs, 0.25, "absolute").tolist() == [[True, False]]


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5, 1.5])
def test_bad_rho_raises(bad: float) -> None:
    with pytest.raises(ValueError, match="rho must be in"):
        dvp.safe_vocab_mask(make_logits((2, 5)), bad)


def test_bad_rule_and_temperature() -> None:
    with pytest.raises(ValueError, match="unknown rule"):
        dvp.safe_vocab_mask(make_logits((2, 5)), 0.1, rule="top-k")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        dvp.pruned_mass(make_logits((2, 5)), 0.1, temperature=0.0)


# --- pruned_logprobs ------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["min-p", "absolute", "top-p"])
def test_pruned_logprobs_normalised_over_safe_set(rule: str) -> None:
    B, T, V = 2, 3, 24
    logits = make_logits((B, T, V), seed=3)
    rho = 0.01 if rule != "top-p" else 0.9
    total = torch.zeros(B, T, dtype=torch.float64)
    mask = dvp.safe_vocab_mask(logits, rho, rule)
    for v in range(V):
        out, kept = dvp.pruned_logprobs(logits, torch.full((B, T), v), rho, rule)
        assert out.shape == kept.shape == (B, T)
        assert torch.equal(kept, mask[..., v])
        assert torch.isneginf(out[~kept]).all() and torch.isfinite(out[kept]).all()
        total += out.double().exp()
    torch.testing.assert_close(total, torch.ones(B, T, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (~mask).any()  # something was pruned, so the renormalisation mattered


def test_pruned_logprobs_vs_numpy_and_temperature() -> None:
    B, T, V, temp, rho = 3, 4, 32, 0.7, 0.02
    logits = make_logits((B, T, V), seed=4)
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    out, kept = dvp.pruned_logprobs(logits, tokens, rho, temperature=temp)
    lp = np_log_softmax(logits.double().numpy() / temp)  # [B, T, V]
    safe = lp >= lp.max(axis=-1, keepdims=True) + math.log(rho)
    log_mass = np.log(np.where(safe, np.exp(lp), 0).sum(-1))  # [B, T]
    tok = tokens.numpy()[..., None]
    expect = np.take_along_axis(lp, tok, -1)[..., 0] - log_mass
    expect_kept = np.take_along_axis(safe, tok, -1)[..., 0]
    assert np.array_equal(kept.numpy(), expect_kept)
    assert 0 < kept.sum() < kept.numel()
    np.testing.assert_allclose(out.numpy()[expect_kept], expect[expect_kept], atol=2e-5)
    # temperature is exactly "divide the logits first"
    out1, kept1 = dvp.pruned_logprobs(logits / temp, tokens, rho)
    assert torch.equal(out, out1) and torch.equal(kept, kept1)


def test_pruned_logprobs_gradients() -> None:
    """Finite on kept tokens, zero from pruned ones, and equal to the analytic gradient
    (onehot(a) - p~ on S) / temperature of log p~(a) with the safe set held fixed."""
    B, T, V, temp, rho = 2, 5, 16, 1.3, 0.05
    logits = make_logits((B, T, V), seed=5).requires_grad_(True)
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    adv = torch.randn(B, T, generator=torch.Generator().manual_seed(2))
    out, kept = dvp.pruned_logprobs(logits, tokens, rho, temperature=temp)
    assert 0 < kept.sum() < kept.numel()
    loss = -(adv * out.masked_fill(~kept, 0.0)).sum()  # a policy-gradient loss
    loss.backward()
    grad = logits.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert (grad[~kept] == 0).all()  # pruned tokens contribute nothing

    z = logits.detach().double().numpy() / temp
    lp = np_log_softmax(z)
    safe = lp >= lp.max(-1, keepdims=True) + math.log(rho)
    p_tilde = np.where(safe, np.exp(lp), 0.0)
    p_tilde /= p_tilde.sum(-1, keepdims=True)
    onehot = np.eye(V)[tokens.numpy()]
    expect = -(adv.numpy() * kept.numpy())[..., None] * (onehot - p_tilde) / temp
    np.testing.assert_allclose(grad.numpy(), expect, atol=1e-5)


def test_pruned_logprobs_low_precision_logits() -> None:
    logits = make_logits((2, 3, 20), seed=6)
    out, kept = dvp.pruned_logprobs(logits.bfloat16(), torch.zeros(2, 3, dtype=torch.long), 0.01)
    assert out.dtype == torch.float32
    ref, ref_kept = dvp.pruned_logprobs(logits.bfloat16().float(), torch.zeros(2, 3), 0.01)
    assert torch.equal(out, ref) and torch.equal(kept, ref_kept)


# --- pruned_mass and the grid ---------------------------------------------------------


@pytest.mark.parametrize("rule", ["min-p", "absolute", "top-p"])
def test_pruned_mass_vs_numpy(rule: str) -> None:
    logits = make_logits((3, 4, 40), seed=7)
    for rho in (0.9,) if rule == "top-p" else RHOS:
        m = dvp.pruned_mass(logits, rho, rule)
        assert m.shape == (3, 4)
        mask = dvp.safe_vocab_mask(logits, rho, rule).numpy()
        p = np.exp(np_log_softmax(logits.double().numpy()))
        np.testing.assert_allclose(m.numpy(), np.where(mask, 0.0, p).sum(-1), atol=1e-6)
        # and m = 1 - P(S) = TV(p, p~) where S is not empty (absolute tau > max p empties it)
        ne = mask.any(-1)
        p_t = np.where(mask, p, 0)[ne] / np.where(mask, p, 0)[ne].sum(-1, keepdims=True)
        tv = 0.5 * np.abs(p[ne] - p_t).sum(-1)
        np.testing.assert_allclose(m.numpy()[ne], tv, atol=1e-6)
        assert np.allclose(m.numpy()[~ne], 1.0, atol=1e-6)


@pytest.mark.parametrize("rule", ["min-p", "absolute"])
def test_grid_vs_looped_pruned_mass(rule: str) -> None:
    logits = make_logits((64, 100), scale=5.0, seed=8)
    logp = dvp.log_probs(logits)
    grid = dvp.pruned_mass_grid_from_logp(logp, RHO_GRID, rule)  # [64, G]
    loop = torch.stack([dvp.pruned_mass(logits, r, rule) for r in RHO_GRID], dim=-1)
    torch.testing.assert_close(grid, loop, rtol=1e-5, atol=1e-7)
    assert (grid[:, -1] > grid[:, 0]).any()


def test_grid_is_bit_exact_across_batch_shapes() -> None:
    logp = dvp.log_probs(make_logits((6, 10, 50), seed=9))
    full = dvp.pruned_mass_grid_from_logp(logp, RHO_GRID)  # [6, 10, G]
    flat = dvp.pruned_mass_grid_from_logp(logp.reshape(60, 50), RHO_GRID)
    rows = torch.stack([dvp.pruned_mass_grid_from_logp(r, RHO_GRID) for r in logp.reshape(60, 50)])
    assert full.shape == (6, 10, len(RHO_GRID))
    assert torch.equal(full.reshape(60, -1), flat) and torch.equal(flat, rows)


def test_grid_boundary_matches_mask() -> None:
    """A token exactly at the min-p threshold of a grid value is kept there, pruned above."""
    g = RHO_GRID.index(1e-3)
    pmax = np.float32(0.9)
    at = float(pmax * np.float32(1e-3))
    probs = torch.tensor([[pmax, at, 1e-12]])
    m = dvp.pruned_mass_grid(probs, RHO_GRID)[0]
    assert m[g].item() == pytest.approx(1e-12)  # only the 1e-12 token is pruned
    assert m[g + 1].item() == pytest.approx(at + 1e-12)


def test_grid_follows_the_input_device() -> None:
    """No tensor is created on the CPU behind the caller's back (CUDA inputs used to fail);
    the meta device stands in for a GPU here."""
    logp = torch.empty(3, 4, 10, device="meta")
    for rule in ("min-p", "absolute"):
        out = dvp.pruned_mass_grid_from_logp(logp, RHO_GRID, rule)
        assert out.device.type == "meta" and out.shape == (3, 4, len(RHO_GRID))


def test_grid_must_ascend() -> None:
    with pytest.raises(ValueError, match="ascending"):
        dvp.pruned_mass_grid_from_logp(torch.zeros(2, 3), (0.1, 0.01))


def test_empty_absolute_safe_set_is_all_pruned_with_zero_gradient() -> None:
    """tau above max p empties S: every token comes back -inf, not kept; no NaN gradients."""
    z = torch.tensor([[0.1, 0.0, 0.05, 0.02], [3.0, 0.0, 0.0, 0.0]], requires_grad=True)
    out, kept = dvp.pruned_logprobs(z, torch.tensor([0, 0]), 0.3, rule="absolute")
    assert kept.tolist() == [False, True] and torch.isneginf(out[0])
    out.masked_fill(~kept, 0.0).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and (z.grad[0] == 0).all()
    assert dvp.pruned_mass(z, 0.3, "absolute")[0].item() == pytest.approx(1.0)


def test_grid_rejects_top_p() -> None:
    with pytest.raises(ValueError, match="min-p and absolute"):
        dvp.pruned_mass_grid_from_logp(torch.zeros(2, 3), RHO_GRID, "top-p")  # type: ignore[arg-type]


# --- properties -----------------------------------------------------------------------

rows_st = st.lists(st.floats(-30, 30, allow_nan=False, width=32), min_size=2, max_size=24).map(
    lambda v: torch.tensor([v])
)
rho_st = st.floats(1e-9, 0.999, exclude_min=True)


@settings(max_examples=200, deadline=None)
@given(logits=rows_st, r1=rho_st, r2=rho_st, rule=st.sampled_from(["min-p", "absolute"]))
def test_pruned_mass_and_mask_monotone(logits, r1: float, r2: float, rule: str) -> None:
    lo, hi = sorted((r1, r2))
    m_lo, m_hi = dvp.pruned_mass(logits, lo, rule), dvp.pruned_mass(logits, hi, rule)
    assert (m_lo <= m_hi).all()
    mask_lo, mask_hi = dvp.safe_vocab_mask(logits, lo, rule), dvp.safe_vocab_mask(logits, hi, rule)
    assert (mask_hi <= mask_lo).all()  # a larger threshold keeps a subset
    assert ((m_lo >= 0) & (m_lo <= 1 + 1e-6)).all()


@settings(max_examples=100, deadline=None)
@given(logits=rows_st, rule=st.sampled_from(["min-p", "absolute"]))
def test_grid_monotone(logits, rule: str) -> None:
    m = dvp.pruned_mass_grid_from_logp(dvp.log_probs(logits), RHO_GRID, rule)[0]
    assert (m[1:] >= m[:-1]).all() and (m >= 0).all()


# --- exact agreement with sweep-threshold ---------------------------------------------


def stored_run(
    path: Path, logp: torch.Tensor, probs: torch.Tensor, tokens: torch.Tensor, seq_len: int
) -> Path:
    """Store a run for these training log-probs and probabilities [N, V] the way `measure`
    does (position_stats; Parquet round trip), with a small fake inference side."""
    N = logp.shape[0]
    noise = torch.randn(N, generator=torch.Generator().manual_seed(0)).double() * 0.05
    ids = torch.full((N, 2), -1)
    lq_top = torch.full((N, 2), float("-inf"))
    lq = (logp.gather(1, tokens[:, None]).squeeze(1).double() + noise).float()
    s = position_stats(logp, tokens, ids, lq_top, lq, top_k=4, probs=probs)
    logp_train = s["logp_train"].double().numpy()
    lq_np = lq.double().numpy()
    lq_np[~np.isfinite(logp_train)] = -1.0  # the engine sampled it: finite on its side
    df = pd.DataFrame(
        {
            "seq_id": np.arange(N) // seq_len,
            "logp_train": logp_train,
            "p_train": s["p_train"].double().numpy(),
            "p_max_train": s["p_max_train"].double().numpy(),
            "delta": lq_np - logp_train,
            "kept_train": np.isfinite(logp_train),
            "pruned_mass_minp": list(s["pruned_mass_minp"].numpy()),
            "pruned_mass_abs": list(s["pruned_mass_abs"].numpy()),
        }
    )
    path.mkdir(parents=True)
    atomic_write_table(path / TOKENS_FILE, pa.Table.from_pandas(df, preserve_index=False))
    RunDir(path).write_meta({"format_version": 1, "status": "complete", "rho_grid": list(RHO_GRID)})
    return path


@pytest.mark.parametrize("rule", ["min-p", "absolute"])
def test_sweep_agrees_exactly_with_dvp(tmp_path: Path, rule: str) -> None:
    N, V, temp = 400, 64, 0.8
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(N, V, generator=gen) * 4.0
    # the training side replays a top-p truncation: some sampled tokens fall outside it
    z = processed_logits(logits, Sampling(temperature=temp, top_p=0.95))  # [N, V] float32
    logp, probs = torch.log_softmax(z, -1), torch.softmax(z, -1)
    tokens = torch.multinomial(torch.softmax(logits / temp, -1), 1, generator=gen).squeeze(1)
    # put some sampled tokens exactly on a threshold, where only an exact comparison agrees
    finite = torch.isfinite(logp.gather(1, tokens[:, None]).squeeze(1))
    for i, r in zip(range(0, N, 7), [1e-3, 0.02, 0.2, 5e-5] * 100, strict=False):
        if finite[i] and probs[i].amax() > probs[i, tokens[i]]:
            base = probs[i].amax() if rule == "min-p" else torch.tensor(1.0)
            probs[i, tokens[i]] = base * torch.tensor(r, dtype=torch.float32)
    run = stored_run(tmp_path / "run", logp, probs, tokens, seq_len=20)

    inp = sw.load(run, rule)
    expect_mass = dvp.pruned_mass_grid(probs, RHO_GRID, rule).numpy()  # [N, G]
    assert np.array_equal(inp.pruned_mass, expect_mass)  # bit for bit
    res = sw.sweep(run, rule=rule)
    assert res["num_infinite"] == int((~finite).sum()) > 0
    ties = 0
    for g, row in enumerate(res["rows"]):
        rho = RHO_GRID[g]
        mask = dvp.safe_vocab_mask_from_probs(probs, rho, rule)  # [N, V]
        dvp_kept = mask.gather(1, tokens[:, None]).squeeze(1).numpy()  # [N]
        sweep_kept = inp.support & sw.kept_mask(inp.p_train, inp.p_max_train, rho, rule)
        assert np.array_equal(sweep_kept, dvp_kept), rho
        assert row["pruned_tokens"] == int((~dvp_kept).sum())
        assert row["max_pruned_mass"] == float(expect_mass[:, g].max())
        thr = (probs.amax(-1) if rule == "min-p" else 1.0) * torch.tensor(rho, dtype=torch.float32)
        ties += int((probs.gather(1, tokens[:, None]).squeeze(1) == thr).sum())
    assert ties > 0  # the boundary cases were really exercised
    # and pruned_mass's masked sum (a different summation order) agrees to float32 rounding
    mask = dvp.safe_vocab_mask_from_probs(probs, 0.02, rule)
    torch.testing.assert_close(
        probs.masked_fill(mask, 0.0).sum(-1).numpy(),
        inp.pruned_mass[:, RHO_GRID.index(0.02)],
        rtol=1e-5,
        atol=1e-7,
    )
