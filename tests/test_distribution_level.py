"""Distribution-level mismatch (`rescore.coarse_mismatch`, via `position_stats`) against a
brute-force numpy computation on synthetic logits, and its place in `report`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mismatch_cli.rescore import REST_FLOOR, position_stats
from mismatch_cli.sampling import Sampling, processed_logprobs


def _brute(logq: np.ndarray, logp: np.ndarray, top_ids: np.ndarray, tok: np.ndarray):
    """Per row: the partition {each id of top-K U {sampled}} + {rest}, then TV and both KLs,
    one Python loop per row (the reference, not the implementation)."""
    tv, kqp, kpq = [], [], []
    for i in range(len(tok)):
        S = sorted({int(j) for j in top_ids[i] if j >= 0} | {int(tok[i])})
        q = np.exp(logq[i, S].astype(np.float64))
        p = np.exp(logp[i, S].astype(np.float64))
        qr, pr = max(1 - q.sum(), 0.0), max(1 - p.sum(), 0.0)
        if qr < REST_FLOOR and pr < REST_FLOOR:
            qr = pr = 0.0
        qc, pc = np.append(q, qr), np.append(p, pr)
        tv.append(0.5 * np.abs(qc - pc).sum())

        def kl(a: np.ndarray, b: np.ndarray) -> float:
            with np.errstate(divide="ignore"):
                terms = [x * (math.log(x) - (math.log(y) if y > 0 else -math.inf))
                         for x, y in zip(a, b, strict=True) if x > 0]  # fmt: skip
            return max(sum(terms), 0.0)

        kqp.append(kl(qc, pc))
        kpq.append(kl(pc, qc))
    return np.array(tv), np.array(kqp), np.array(kpq)


def _case(n: int, V: int, K: int, seed: int, sampling: Sampling = Sampling()):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, generator=g) * 3
    logp = processed_logprobs(z, sampling)  # training side [n, V]
    logq = processed_logprobs(z + 0.2 * torch.randn(n, V, generator=g), sampling)  # inference
    probs = logq.exp()
    tok = torch.multinomial(probs, 1, generator=g).squeeze(1)  # sampled from q
    top = logq.topk(K, dim=-1)
    ids, vals = top.indices.clone(), top.values.clone()
    return logp, logq, tok, ids, vals


@pytest.mark.parametrize(("V", "K"), [(40, 5), (64, 1), (30, 30), (50, 0)])
def test_coarse_measures_match_brute_force(V: int, K: int) -> None:
    logp, logq, tok, ids, vals = _case(64, V, K, seed=V + K)
    ids[::3, -1:] = -1  # some rows padded, as a run whose engine returned fewer than K
    vals[::3, -1:] = -math.inf
    lq = logq.gather(1, tok[:, None]).squeeze(1)
    out = position_stats(logp, tok, ids, vals, lq, top_k=4)
    tv, kqp, kpq = _brute(logq.numpy(), logp.numpy(), ids.numpy(), tok.numpy())
    np.testing.assert_allclose(out["tv_coarse"].numpy(), tv, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out["kl_qp_coarse"].numpy(), kqp, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(out["kl_pq_coarse"].numpy(), kpq, rtol=1e-7, atol=1e-12)
    assert (out["tv_coarse"] > 0).all()  # the sides differ at every row


def test_coarse_measures_are_lower_bounds_on_the_full_vocabulary() -> None:
    logp, logq, tok, ids, vals = _case(64, 80, 6, seed=7)
    lq = logq.gather(1, tok[:, None]).squeeze(1)
    out = position_stats(logp, tok, ids, vals, lq, top_k=4)
    P, Q = logp.double().exp(), logq.double().exp()
    tv_full = 0.5 * (Q - P).abs().sum(1)
    kl_qp = (Q * (logq.double() - logp.double())).sum(1)
    kl_pq = (P * (logp.double() - logq.double())).sum(1)
    assert (out["tv_coarse"] <= tv_full + 1e-7).all()
    assert (out["kl_qp_coarse"] <= kl_qp + 1e-7).all()
    assert (out["kl_pq_coarse"] <= kl_pq + 1e-7).all()
    # and not trivially: the coarse partition keeps a good part of the full TV here
    assert float((out["tv_coarse"] / tv_full).mean()) > 0.3


def test_identical_sides_give_exactly_zero() -> None:
    logp, _, tok, _, _ = _case(32, 50, 5, seed=3)
    top = logp.topk(5, dim=-1)
    lq = logp.gather(1, tok[:, None]).squeeze(1)
    out = position_stats(logp, tok, top.indices, top.values, lq, top_k=5)
    for k in ("tv_coarse", "kl_qp_coarse", "kl_pq_coarse"):
        assert torch.equal(out[k], torch.zeros(32, dtype=torch.float64)), k


def test_truncation_gives_infinite_kl_only_where_the_kept_sets_differ() -> None:
    s = Sampling(min_p=0.1)
    logp, logq, tok, ids, vals = _case(64, 40, 12, seed=11, sampling=s)
    lq = logq.gather(1, tok[:, None]).squeeze(1)
    out = position_stats(logp, tok, ids, vals, lq, top_k=4)
    tv, kqp, kpq = _brute(logq.numpy(), logp.numpy(), ids.numpy(), tok.numpy())
    np.testing.assert_allclose(out["kl_qp_coarse"].numpy(), kqp, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(out["kl_pq_coarse"].numpy(), kpq, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(out["tv_coarse"].numpy(), tv, rtol=1e-9, atol=1e-12)
    # kept sets differ on some top-K id in some rows: infinite there, finite elsewhere
    kept_q = torch.isfinite(logq.gather(1, ids))
    kept_p = torch.isfinite(logp.gather(1, ids))
    differ = (kept_q & ~kept_p).any(1)
    assert differ.any() and (~differ).any()
    assert torch.isinf(out["kl_qp_coarse"][differ]).all()
    assert torch.isfinite(out["tv_coarse"]).all()


def test_two_sides_known_on_their_top_k_only_use_the_common_ids() -> None:
    """`topk_pair_stats` (two decodes): the partition is {ids in both top-Ks} U {sampled}."""
    from mismatch_cli.rescore import topk_pair_stats

    logp, logq, tok, q_ids, q_vals = _case(48, 40, 8, seed=5)
    p_top = logp.topk(8, dim=-1)
    r = torch.arange(48)
    out = topk_pair_stats(tok, q_ids, q_vals, logq[r, tok], p_top.indices, p_top.values,
                          logp[r, tok])  # fmt: skip
    common = np.full((48, 8), -1)
    for i in range(48):
        ids = [j for j in q_ids[i].tolist() if j in set(p_top.indices[i].tolist())]
        common[i, : len(ids)] = ids
    tv, kqp, kpq = _brute(logq.numpy(), logp.numpy(), common, tok.numpy())
    np.testing.assert_allclose(out["tv_coarse"].numpy(), tv, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out["kl_qp_coarse"].numpy(), kqp, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(out["kl_pq_coarse"].numpy(), kpq, rtol=1e-7, atol=1e-12)
    assert (common == -1).any()  # some top-K ids were not shared: the case is not trivial


def test_report_has_the_section_and_older_runs_still_work(tmp_path) -> None:
    """`report`: means and upper quantiles by bucket when the columns exist; runs written
    before them report `distribution_level: null` and print no such table."""
    import json

    from rich.console import Console

    from mismatch_cli.analysis import analyze
    from mismatch_cli.render import print_report
    from mismatch_cli.runs import read_sequences, read_tokens, write_run
    from mismatch_cli.synthetic import synthetic_meta, write_synthetic_run

    new = write_synthetic_run(tmp_path / "new", num_sequences=12, seed=2)
    r = analyze(new)
    json.dumps(r, allow_nan=False)
    dist = r["distribution_level"]
    tv = read_tokens(new)["tv_coarse"].to_numpy()
    assert dist["overall"]["tv_coarse"]["mean"] == pytest.approx(tv.mean())
    assert dist["overall"]["tv_coarse"]["p99"] == pytest.approx(np.quantile(tv, 0.99))
    counts = [b["count"] for b in dist["buckets"]]
    assert sum(counts) == len(tv)
    con = Console(record=True, width=100)
    print_report(r, con)
    assert "Distribution-level mismatch" in con.export_text()

    tok = read_tokens(new).drop(columns=["tv_coarse", "kl_qp_coarse", "kl_pq_coarse"])
    old = write_run(tmp_path / "old", tok, read_sequences(new), synthetic_meta())
    r_old = analyze(old)
    assert r_old["distribution_level"] is None
    assert r_old["metrics"] == r["metrics"]  # the rest of the report is unchanged
    con = Console(record=True, width=100)
    print_report(r_old, con)
    assert "Distribution-level" not in con.export_text()
