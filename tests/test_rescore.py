"""Training-side replay and per-position quantities, on synthetic logits.

The replay of top-k / top-p is checked against vLLM's own sampler function (the real code,
imported from the installed engine), min-p against its formula, and everything stored per
position against brute-force numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mismatch_cli.rescore import (
    Sampling,
    SeqInput,
    forward_logits,
    make_batches,
    position_stats,
    processed_logprobs,
    score_sequences,
)
from mismatch_cli.schema import RHO_GRID


def _logits(n: int = 16, v: int = 50, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale


def test_temperature_only_is_log_softmax_of_scaled_logits() -> None:
    z = _logits()
    got = processed_logprobs(z, Sampling(temperature=0.7))
    assert torch.allclose(got, torch.log_softmax(z / 0.7, -1), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("top_k", "top_p"), [(5, None), (None, 0.9), (7, 0.8), (None, 0.3), (1, None)]
)
def test_top_k_top_p_replay_matches_vllms_sampler(top_k: int | None, top_p: float | None) -> None:
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    z = _logits(32, 100, seed=1) / 0.8
    k = torch.full((32,), top_k, dtype=torch.long) if top_k else None
    p = torch.full((32,), top_p) if top_p else None
    vllm_logp = torch.log_softmax(apply_top_k_top_p_pytorch(z.clone(), k, p), -1)
    ours = processed_logprobs(z, Sampling(top_k=top_k or -1, top_p=top_p or 1.0))
    assert torch.equal(torch.isinf(ours), torch.isinf(vllm_logp))
    fin = torch.isfinite(ours)
    assert torch.allclose(ours[fin], vllm_logp[fin], atol=1e-6)


def test_min_p_replay_matches_its_formula_and_renormalises() -> None:
    z = _logits(8, 40, seed=2)
    s = Sampling(temperature=1.3, min_p=0.1)
    got = processed_logprobs(z, s)
    p = torch.softmax(z / 1.3, -1)
    keep = p >= 0.1 * p.amax(-1, keepdim=True)
    assert torch.equal(torch.isfinite(got), keep)
    assert torch.allclose(got.exp().sum(-1), torch.ones(8), atol=1e-6)
    expect = torch.log(p / (p * keep).sum(-1, keepdim=True))
    assert torch.allclose(got[keep], expect[keep], atol=1e-5)


def test_position_stats_against_numpy() -> None:
    z = _logits(12, 30, seed=3)
    logp = torch.log_softmax(z, -1)
    logq = torch.log_softmax(
        z + 0.05 * torch.randn(12, 30, generator=torch.Generator().manual_seed(4)), -1
    )
    tok = torch.randint(0, 30, (12,), generator=torch.Generator().manual_seed(5))
    qtop = logq.topk(6, -1)
    lq = logq.gather(1, tok[:, None]).squeeze(1)
    out = position_stats(logp, tok, qtop.indices, qtop.values, lq, top_k=4)

    P, Q = logp.double().numpy(), logq.double().numpy()
    t = tok.numpy()
    np.testing.assert_allclose(out["logp_train"].numpy(), P[np.arange(12), t], atol=1e-6)
    np.testing.assert_allclose(out["logp_max_train"].numpy(), P.max(1), atol=1e-6)
    np.testing.assert_allclose(out["entropy_train"].numpy(), -(np.exp(P) * P).sum(1), atol=1e-5)
    np.testing.assert_array_equal(out["topk_ids_train"].numpy(), np.argsort(-P, 1)[:, :4])
    for i in range(12):
        ids = set(qtop.indices[i].tolist()) | {int(t[i])}
        d = np.array([Q[i, j] - P[i, j] for j in ids])
        assert out["eps_hat"][i].item() == pytest.approx((d.max() - d.min()) / 2, abs=1e-6)
        for g, rho in enumerate(RHO_GRID):
            pruned = np.exp(P[i])[P[i] < P[i].max() + np.log(rho)].sum()
            assert out["pruned_mass_minp"][i, g].item() == pytest.approx(pruned, abs=1e-6)
            pruned_abs = np.exp(P[i])[P[i] < np.log(rho)].sum()
            assert out["pruned_mass_abs"][i, g].item() == pytest.approx(pruned_abs, abs=1e-6)


def test_eps_hat_ignores_tokens_one_side_pruned() -> None:
    logp = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, -1.0]]), -1)
    logp_trunc = logp.clone()
    logp_trunc[0, 3] = float("-inf")
    ids = torch.tensor([[0, 1, 2, 3]])
    lq = torch.log_softmax(torch.tensor([[3.1, 2.0, 1.0, -1.0]]), -1)
    out = position_stats(logp_trunc, torch.tensor([0]), ids, lq, lq[:, 0], top_k=2)
    d = (lq[0, :3] - logp_trunc[0, :3]).double()
    assert out["eps_hat"].item() == pytest.approx(((d.max() - d.min()) / 2).item(), abs=1e-7)


@given(
    st.lists(st.tuples(st.integers(1, 40), st.integers(1, 60)), min_size=1, max_size=30),
    st.integers(8, 400),
)
@settings(max_examples=60, deadline=None)
def test_batches_partition_and_respect_the_token_budget(lengths, budget) -> None:
    batches = make_batches(lengths, budget)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for b in batches:
        padded = max(lengths[i][0] + lengths[i][1] for i in b) * len(b)
        assert len(b) == 1 or padded <= budget


def _seqs(n: int, seed: int = 0) -> list[SeqInput]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        P, T = int(rng.integers(2, 12)), int(rng.integers(1, 15))
        out.append(
            SeqInput(
                rng.integers(0, 97, P).tolist(),
                rng.integers(0, 97, T).tolist(),
                np.full((T, 3), -1, np.int32),
                np.full((T, 3), -np.inf, np.float32),
                np.zeros(T),
            )
        )
    return out


def test_batched_forward_equals_one_sequence_at_a_time(tiny_llama) -> None:
    """Padding must not leak into real positions (float32 rounding of BLAS shapes only)."""
    seqs = _seqs(7)
    logits, slices = forward_logits(tiny_llama, seqs, torch.device("cpu"))
    for s, sl in zip(seqs, slices, strict=True):
        ids = torch.tensor([list(s.prompt_token_ids) + list(s.response_token_ids)])
        with torch.no_grad():
            ref = tiny_llama(ids).logits[0]
        P, T = len(s.prompt_token_ids), len(s.response_token_ids)
        torch.testing.assert_close(logits[sl], ref[P - 1 : P - 1 + T], atol=2e-6, rtol=0)


def test_scores_do_not_depend_on_the_batch_budget(tiny_llama) -> None:
    """Same tokens, different batching: same per-position quantities (to float32 rounding)."""
    seqs = _seqs(9, seed=1)
    a = score_sequences(
        tiny_llama, seqs, Sampling(temperature=0.9, top_p=0.95), 5, torch.device("cpu"), 10_000
    )
    b = score_sequences(
        tiny_llama, seqs, Sampling(temperature=0.9, top_p=0.95), 5, torch.device("cpu"), 16
    )
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            if x[k].dtype.kind in "iu":
                np.testing.assert_array_equal(x[k], y[k])
            else:
                np.testing.assert_allclose(x[k], y[k], atol=2e-6, rtol=0)


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a)
    a.setflags(write=False)  # what Parquet / Arrow hands back
    return a


def test_batches_of_empty_responses_do_not_crash(tiny_llama) -> None:
    """A batch holding only empty responses used to raise IndexError; mixed batches work."""
    empty = SeqInput(
        [1, 2, 3], [], np.zeros((0, 3), np.int32), np.zeros((0, 3), np.float32), np.zeros(0)
    )
    seqs = [empty, *_seqs(3, seed=5), empty]
    dev = torch.device("cpu")
    only = score_sequences(tiny_llama, [empty, empty], Sampling(), 5, dev, 64)
    assert [r["logp_train"].shape for r in only] == [(0,), (0,)]
    assert only[0]["pruned_mass_minp"].shape == (0, len(RHO_GRID))
    mixed = score_sequences(tiny_llama, seqs, Sampling(), 5, dev, 10_000)
    alone = score_sequences(tiny_llama, seqs[1:4], Sampling(), 5, dev, 10_000)
    assert mixed[0]["logp_train"].size == 0 and mixed[-1]["logp_train"].size == 0
    for x, y in zip(mixed[1:4], alone, strict=True):
        np.testing.assert_allclose(x["logp_train"], y["logp_train"], atol=2e-6)


def test_read_only_arrays_raise_no_warning(tiny_llama) -> None:
    """Arrays read back from Parquet are not writable; torch must never be handed them."""
    import warnings

    seqs = [
        SeqInput(
            s.prompt_token_ids,
            _readonly(s.response_token_ids),
            _readonly(s.topk_ids_infer),
            _readonly(s.topk_logp_infer),
            _readonly(s.logp_infer),
        )
        for s in _seqs(4, seed=6)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        score_sequences(tiny_llama, seqs, Sampling(), 5, torch.device("cpu"), 10_000)
