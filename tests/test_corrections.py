"""`mismatch corrections`: every rule against a hand-computed table and a brute-force loop,
verl's and SkyRL's definitions transcribed from their source, DVP taken from the sweep, the
optional advantage / step columns, the JSON keys of the issue, the figure, and every bad
input as one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mismatch_cli import correction_rules as R
from mismatch_cli import corrections as C
from mismatch_cli import sweep as sw
from mismatch_cli.errors import MismatchError
from mismatch_cli.runs import token_frame, write_run
from mismatch_cli.synthetic import synthetic_meta, write_synthetic_run

from .conftest import assert_one_line_error, cli_in_process

INF = math.inf
LN3, LN4 = math.log(3), math.log(4)

# The keys the issue lists for a method object, and the documented extras.
ISSUE_KEYS = {
    "name", "params", "tokens_masked", "sequences_masked", "tokens_clipped", "weight_mean",
    "weight_std", "weight_max", "ess_token", "ess_seq", "left_mean_abs_delta", "left_k3",
    "left_p99_abs_delta", "left_max_abs_delta", "left_frac_ratio_outside_0.5_2",
    "removed_token_share", "removed_abs_delta_share", "clipped_mass_per_seq", "bias_bound",
    "by_bucket", "by_step",
}  # fmt: skip
EXTRA_KEYS = {"level", "kind", "skipped", "removed_advantage_share"}


def arrays(seqs: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """delta [N] and sequence index [N] of a ragged list of per-sequence deltas."""
    delta = np.array([x for s in seqs for x in s], dtype=np.float64)
    seq = np.repeat(np.arange(len(seqs)), [len(s) for s in seqs])
    return delta, seq


def table(seqs: list[list[float]], p: float | list[float] = 0.5, **extra) -> pd.DataFrame:
    delta, seq = arrays(seqs)
    n = delta.size
    df = pd.DataFrame(
        {
            "seq_id": seq.astype(np.int64),
            "delta": delta,
            "p_train": np.broadcast_to(np.asarray(p, dtype=np.float64), (n,)).copy(),
            "kept_train": np.isfinite(delta),
        }
    )
    for k, v in extra.items():
        df[k] = v
    return df


# --- a table computed by hand -----------------------------------------------------------
# seq 0: r = 1, 3, 1/4       S = log(3/4), G = S / 3, mean k3 = (0 + 0.9014 + 0.6363) / 3
# seq 1: r = e^-0.1, e^0.1   S = 0
# seq 2: an infinite delta (the training side's truncation removed it), then r = e^-0.2
# seq 3: r = e^-12 (< 1e-4: the veto)
HAND = [[0.0, -LN3, LN4], [0.1, -0.1], [INF, 0.2], [12.0]]


def rule(name: str, **over: float) -> R.Applied:
    delta, seq = arrays(HAND)
    params = R.resolve_params(name, over)
    return R.METHODS[name].rule(delta, seq, **params)  # type: ignore[misc]


def test_hand_token_rules() -> None:
    e = math.exp
    a = rule("none")
    assert a.masked.tolist() == [0, 0, 0, 0, 0, 1, 0, 0]
    assert a.weight.tolist() == [1, 1, 1, 1, 1, 0, 1, 1]

    a = rule("tis-token")  # C = 2: only r = 3 is clipped, by 1
    np.testing.assert_allclose(a.weight, [1, 2, 0.25, e(-0.1), e(0.1), 0, e(-0.2), e(-12)])
    assert a.clipped.tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    np.testing.assert_allclose(a.excess, [0, 1, 0, 0, 0, 0, 0, 0], atol=1e-12)
    assert rule("cispo").clipped.sum() == 0  # cap 5 > 3

    a = rule("icepop")  # [0.5, 5]: r = 1/4, e^-12 and the infinite token are masked
    assert a.masked.tolist() == [0, 0, 1, 0, 0, 1, 0, 1]
    np.testing.assert_allclose(a.weight, [1, 3, 0, e(-0.1), e(0.1), 0, e(-0.2), 0])
    assert rule("icepop-narrow").masked.tolist() == [0, 1, 1, 0, 0, 1, 0, 1]  # [0.5, 2]


def test_hand_sequence_rules() -> None:
    def masked_seqs(a: R.Applied) -> list[int]:
        _, seq = arrays(HAND)
        return sorted({int(s) for s in seq[a.masked]})

    a = rule("tis-seq")  # C = 5: exp(S) = 0.75, 1; seq 2 (infinite) masked; seq 3 e^-12
    np.testing.assert_allclose(a.weight, [0.75] * 3 + [1, 1] + [0, 0] + [math.exp(-12)])
    assert masked_seqs(a) == [2] and a.clipped.sum() == 0
    assert masked_seqs(rule("tis-seq", C=0.8)) == [2]
    assert rule("tis-seq", C=0.8).clipped.tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    assert masked_seqs(rule("seq-mask-product")) == [2, 3]  # 0.75, 1 in [0.5, 2]
    assert masked_seqs(rule("seq-mask-geo")) == [0, 2, 3]  # exp(log(0.75)/3) = 0.909
    assert masked_seqs(rule("seq-mask-geo", lo=0.9)) == [2, 3]
    # mean k3: seq 0 0.513, seq 1 (0.004837 + 0.005171) / 2 = 0.005004 < 0.01
    assert masked_seqs(rule("seq-mask-k3")) == [0, 2, 3]
    assert masked_seqs(rule("seq-mask-k3", tau=0.005)) == [0, 1, 2, 3]
    assert masked_seqs(rule("seq-veto")) == [2, 3]  # e^-12 < 1e-4
    assert masked_seqs(rule("seq-veto", tau=1e-6)) == [2]
    # mean exp|delta|: seq 0 (1 + 3 + 4) / 3 = 2.67, seq 1 e^0.1 = 1.105
    assert masked_seqs(rule("nemo-seq-mult")) == [0, 2, 3]
    assert masked_seqs(rule("nemo-seq-mult", tau=3)) == [2, 3]
    a = rule("gspo-clip")  # exp(G) = 0.909 and e^-12 clipped up to 1 - 3e-4; exp(0) inside
    assert masked_seqs(a) == [2]
    assert a.clipped.tolist() == [1, 1, 1, 0, 0, 0, 0, 1]
    np.testing.assert_allclose(a.weight[:3], 1 - 3e-4)
    np.testing.assert_allclose(a.excess[0], 1 - 3e-4 - 0.75 ** (1 / 3))


def test_hand_summary() -> None:
    t = C.run_tokens(table(HAND, p=[0.9, 0.9, 0.05, 0.5, 0.5, 0.0, 0.5, 1e-4]))
    s = C.summarize_method(rule("icepop-narrow"), t)
    left = [0.0, 0.1, 0.1, 0.2]  # |delta| of the 4 tokens it keeps
    assert s["tokens_masked"] == 4 / 8
    assert s["sequences_masked"] == 1 / 4  # seq 3 (seq 2 keeps its finite token)
    assert s["removed_token_share"] == pytest.approx(3 / 7)
    total = LN3 + LN4 + 0.1 + 0.1 + 0.2 + 12
    assert s["removed_abs_delta_share"] == pytest.approx((LN3 + LN4 + 12) / total)
    assert s["left_mean_abs_delta"] == pytest.approx(sum(left) / 4)
    assert s["left_max_abs_delta"] == pytest.approx(max(left))
    assert s["left_p99_abs_delta"] == pytest.approx(0.1 + 0.97 * 0.1)  # linear interpolation
    k3 = [0.0, math.exp(-0.1) - 0.9, math.exp(0.1) - 1.1, math.exp(-0.2) - 0.8]
    assert s["left_k3"] == pytest.approx(sum(k3) / 4)
    assert s["left_frac_ratio_outside_0.5_2"] == 0.0
    w = np.exp([0.0, -0.1, 0.1, -0.2])
    assert s["weight_mean"] == pytest.approx(w.mean())
    assert s["ess_token"] == pytest.approx(w.sum() ** 2 / (4 * (w**2).sum()))
    ws = np.array([1.0, 1.0, np.exp(-0.2)])  # per-sequence mean weight: seqs 0, 1, 2
    ws[1] = (np.exp(-0.1) + np.exp(0.1)) / 2
    assert s["ess_seq"] == pytest.approx(ws.sum() ** 2 / (3 * (ws**2).sum()))
    # buckets of p_train (default edges): [0.9, 0.99) holds t0, t1: t1 masked
    b = {(r["lo"], r["hi"]): r for r in s["by_bucket"]}
    assert b[(0.9, 0.99)]["num_tokens"] == 2 and b[(0.9, 0.99)]["masked"] == 0.5
    assert b[(0.0, 1e-6)]["masked"] == 1.0  # the infinite token (p_train 0)
    assert s["clipped_mass_per_seq"] == 0.0
    tis = C.summarize_method(rule("tis-token"), t)
    assert tis["tokens_clipped"] == 1 / 8 and tis["clipped_mass_per_seq"] == pytest.approx(1 / 4)
    assert tis["removed_token_share"] == 0.0 and tis["sequences_masked"] == 0.0


# --- a brute-force loop over a random run -----------------------------------------------


def _r(x: float) -> float:
    return math.exp(max(-20.0, min(20.0, -x)))


def loop_rule(name: str, seqs: list[list[float]], p: dict) -> list[tuple[float, bool, bool]]:
    """(weight, masked, clipped) per token, one sequence and one token at a time."""
    out = []
    for toks in seqs:
        fin = [math.isfinite(x) for x in toks]
        S = sum(-x for x in toks if math.isfinite(x))
        T = len(toks)
        G = S / T
        eS, eG = math.exp(max(-20, min(20, S))), math.exp(max(-20, min(20, G)))
        bad = not all(fin)
        for x, f in zip(toks, fin, strict=True):
            w, m, c = 1.0, not f, False
            if name in ("tis-token", "cispo"):
                cap = p["C"] if name == "tis-token" else p["cap"]
                w, c = min(_r(x), cap), f and _r(x) > cap
            elif name in ("icepop", "icepop-narrow"):
                w = _r(x)
                m = m or not (p["lo"] <= w <= p["hi"])
            elif name != "none":  # sequence-level
                m = bad
                if name == "tis-seq":
                    w, c = min(eS, p["C"]), eS > p["C"]
                elif name == "gspo-clip":
                    w, c = min(max(eG, p["lo"]), p["hi"]), not (p["lo"] <= eG <= p["hi"])
                elif name == "seq-mask-product":
                    m = m or not (p["lo"] <= eS <= p["hi"])
                elif name == "seq-mask-geo":
                    m = m or not (p["lo"] <= eG <= p["hi"])
                elif name == "seq-mask-k3":
                    ds = [max(-20, min(20, -y)) for y in toks if math.isfinite(y)]
                    m = m or sum(math.exp(d) - 1 - d for d in ds) / T > p["tau"]
                elif name == "seq-veto":
                    m = m or any(math.isfinite(y) and -y < math.log(p["tau"]) for y in toks)
                elif name == "nemo-seq-mult":
                    m = m or sum(math.exp(abs(y)) for y in toks if math.isfinite(y)) / T > p["tau"]
            out.append((0.0 if m else w, m, c and not m))
    return out


def loop_summary(seqs: list[list[float]], applied: list[tuple[float, bool, bool]]) -> dict:
    flat = [x for s in seqs for x in s]
    sid = [i for i, s in enumerate(seqs) for _ in s]
    kept = [i for i, (_, m, _) in enumerate(applied) if not m]
    w = [applied[i][0] for i in kept]
    ad = [abs(flat[i]) for i in kept]
    fin = [i for i, x in enumerate(flat) if math.isfinite(x)]
    seq_w = []
    for s in range(len(seqs)):
        ws = [applied[i][0] for i in kept if sid[i] == s]
        if ws:
            seq_w.append(sum(ws) / len(ws))

    def ess(v: list[float]) -> float:
        return sum(v) ** 2 / (len(v) * sum(x * x for x in v)) if v else math.nan

    return {
        "tokens_masked": sum(m for _, m, _ in applied) / len(flat),
        "sequences_masked": 1 - len(seq_w) / len(seqs),
        "tokens_clipped": sum(c for _, _, c in applied) / len(flat),
        "weight_mean": sum(w) / len(w) if w else math.nan,
        "ess_token": ess(w),
        "ess_seq": ess(seq_w),
        "left_mean_abs_delta": sum(ad) / len(ad) if ad else math.nan,
        "left_k3": (
            sum(math.exp(-flat[i]) - 1 + flat[i] for i in kept) / len(kept) if kept else math.nan
        ),
        "left_max_abs_delta": max(ad) if ad else math.nan,
        "left_frac_ratio_outside_0.5_2": (
            sum(not (0.5 <= math.exp(-flat[i]) <= 2) for i in kept) / len(kept)
            if kept
            else math.nan
        ),
        "removed_token_share": (sum(applied[i][1] for i in fin) / len(fin) if fin else math.nan),
    }


TOKEN = st.one_of(
    st.floats(-3, 3, allow_nan=False),
    st.sampled_from([INF, 12.0, -4.0, 0.0, 0.69, -0.7, 1e-3]),
)
SEQS = st.lists(st.lists(TOKEN, min_size=1, max_size=9), min_size=1, max_size=8)
LOOP_METHODS = [n for n in R.METHOD_NAMES if R.METHODS[n].rule is not None]


@settings(max_examples=60, deadline=None)
@given(seqs=SEQS, scale=st.sampled_from([0.5, 1.0, 2.0]))
def test_rules_equal_a_brute_force_loop(seqs: list[list[float]], scale: float) -> None:
    delta, seq = arrays(seqs)
    t = C.run_tokens(table(seqs))
    for name in LOOP_METHODS:
        d = R.METHODS[name].defaults  # bounds widened or narrowed around 1, caps scaled
        p = {k: v**scale if k in ("lo", "hi") else v * scale for k, v in d.items()}
        p = R.resolve_params(name, p)
        a = R.METHODS[name].rule(delta, seq, **p)
        ref = loop_rule(name, seqs, p)
        assert a.masked.tolist() == [m for _, m, _ in ref], name
        assert a.clipped.tolist() == [c for _, _, c in ref], name
        np.testing.assert_allclose(a.weight, [w for w, _, _ in ref], rtol=1e-12, err_msg=name)
        got, want = C.summarize_method(a, t), loop_summary(seqs, ref)
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-15, nan_ok=True), (name, k)


# --- verl and SkyRL, transcribed from their source --------------------------------------


def padded(seqs: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """A framework batch: log_ratio = old - rollout = -delta [B, T] and its mask, padded."""
    B, T = len(seqs), max(len(s) for s in seqs)
    lr, mask = np.zeros((B, T)), np.zeros((B, T))
    for i, s in enumerate(seqs):
        lr[i, : len(s)] = [-x for x in s]
        mask[i, : len(s)] = 1
    return lr, mask


def unpad(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return x[mask.astype(bool)]


FINITE_SEQS = st.lists(
    st.lists(st.floats(-2, 2, allow_nan=False), min_size=1, max_size=9), min_size=1, max_size=8
)


@settings(max_examples=40, deadline=None)
@given(seqs=FINITE_SEQS)
def test_verl_definitions(seqs: list[list[float]]) -> None:
    """verl-project/verl @1dda039b9c6311889a9c9a26040677e1254814f9,
    verl/trainer/ppo/rollout_corr_helper.py: compute_rollout_correction_weights (token and
    sequence IS, IcePop via rollout_is_threshold "lo_hi") and compute_rollout_rejection_mask
    (seq_mean_k3, seq_sum_k1, seq_mean_k1), SAFETY_BOUND = 20; masked_mean divides by
    mask.sum() + 1e-8 (verl/utils/torch_functional.py)."""
    lr, mask = padded(seqs)
    delta, seq = arrays(seqs)
    SB = 20.0
    # token TIS: raw = exp(clamp(log_ratio, +-SB)) * mask; weights = raw.clamp(max=upper)
    raw = np.exp(np.clip(lr, -SB, SB)) * mask
    np.testing.assert_allclose(
        unpad(np.minimum(raw, 2.0), mask), R.rule_tis_token(delta, seq, C=2.0).weight
    )
    # token IcePop: where((raw >= lower) & (raw <= upper), raw, 0), "0.5_5.0"
    ice = np.where((raw >= 0.5) & (raw <= 5.0), raw, 0.0)
    np.testing.assert_allclose(unpad(ice, mask), R.rule_icepop(delta, seq, lo=0.5, hi=5.0).weight)
    # sequence TIS: exp(clamp(masked_sum(log_ratio), +-SB)) broadcast, clamp(max=upper)
    seq_w = np.exp(np.clip((lr * mask).sum(-1, keepdims=True), -SB, SB)) * mask
    np.testing.assert_allclose(
        unpad(np.minimum(seq_w, 5.0), mask), R.rule_tis_seq(delta, seq, C=5.0).weight
    )
    # seq_mean_k3: token_k3 = exp(lrs) - 1 - lrs on the clamped lr; keep = stat <= upper
    lrs = np.clip(lr, -SB, SB)
    k3 = np.exp(lrs) - 1.0 - lrs
    stat = (k3 * mask).sum(-1) / (mask.sum(-1) + 1e-8)
    keep = stat <= 0.01
    ours = R.rule_seq_mask_k3(delta, seq, tau=0.01)
    assert np.array_equal(unpad(np.broadcast_to(~keep[:, None], mask.shape), mask), ours.masked)
    # seq_sum_k1 / seq_mean_k1: statistic token_k1 = -log_ratio_safe (= OUR delta), kept iff
    # log(lower) <= stat <= log(upper). With reciprocal bounds ("0.5_2.0") this is our
    # exp(S) in [0.5, 2]; in general it is exp(S) in [1/upper, 1/lower].
    k1 = -lrs
    for agg, rule in (("sum", R.rule_seq_mask_product), ("mean", R.rule_seq_mask_geo)):
        s = (k1 * mask).sum(-1)
        if agg == "mean":
            s = s / (mask.sum(-1) + 1e-8)
        for lo, hi in ((0.5, 2.0), (0.8, 1.1), (0.999, 1.001)):
            keep = (s >= math.log(lo)) & (s <= math.log(hi))
            ours = rule(delta, seq, lo=1 / hi, hi=1 / lo)  # our bounds on exp(+S)
            want = unpad(np.broadcast_to(~keep[:, None], mask.shape), mask)
            assert np.array_equal(want, ours.masked), (agg, lo, hi)


def test_verl_k1_sign_differs_for_asymmetric_bounds() -> None:
    """verl's seq_sum_k1 with "0.5_5.0" keeps -S in [log 0.5, log 5] (our delta sign), so a
    sequence with exp(S) = 3 is REJECTED by verl and KEPT by `seq-mask-product` [0.5, 5]
    (the issue's rule, exp(S) in [lo, hi], as SkyRL). docs/theory.md says so."""
    delta, seq = arrays([[-math.log(3)]])  # d = log 3: exp(S) = 3
    stat = float(delta.sum())  # verl's seq_sum_k1: sum of token_k1 = -log_ratio = delta
    assert not (math.log(0.5) <= stat <= math.log(5.0))  # verl "0.5_5.0" rejects it
    assert not R.rule_seq_mask_product(delta, seq, lo=0.5, hi=5.0).masked[0]  # we keep it
    assert R.rule_seq_mask_product(delta, seq, lo=1 / 5.0, hi=1 / 0.5).masked[0]  # = verl


@settings(max_examples=40, deadline=None)
@given(seqs=FINITE_SEQS)
def test_skyrl_definitions(seqs: list[list[float]]) -> None:
    """NovaSky-AI/SkyRL @a9564572eb8e91076be43c1bd5e4615e3de17265,
    skyrl/backends/skyrl_train/utils/off_policy_correction_utils.py
    (compute_off_policy_correction) with safe_exp_delta = clamp(x, -20, 20).exp()
    (skyrl/backends/skyrl_train/utils/torch_utils.py): token TIS clamp(max=2.0), sequence
    TIS on the masked SUM clamp(max=5.0), geometric mask on S / mask.sum().clamp(min=1)
    within [0.99, 1.01], product mask within [0.5, 2.0], outlier low (a masked-in token with
    safe_exp(d) < low drops its sequence), token mask (IcePop) removing tokens."""
    lr, mask = padded(seqs)
    delta, seq = arrays(seqs)

    def safe_exp(x: np.ndarray) -> np.ndarray:
        return np.exp(np.clip(x, -20.0, 20.0))

    tok = np.minimum(safe_exp(lr), 2.0)
    np.testing.assert_allclose(unpad(tok, mask), R.rule_tis_token(delta, seq, C=2.0).weight)
    S = (lr * mask).sum(-1, keepdims=True)
    seqw = np.minimum(safe_exp(S), 5.0) * np.ones_like(lr)
    np.testing.assert_allclose(unpad(seqw, mask), R.rule_tis_seq(delta, seq, C=5.0).weight)
    G = S / np.maximum(mask.sum(-1, keepdims=True), 1)
    for x, lo, hi, rule in ((G, 0.99, 1.01, R.rule_seq_mask_geo), (S, 0.5, 2.0, R.rule_seq_mask_product)):  # fmt: skip
        keep = (safe_exp(x) >= lo) & (safe_exp(x) <= hi)
        want = unpad(np.broadcast_to(~keep, mask.shape), mask)
        assert np.array_equal(want, rule(delta, seq, lo=lo, hi=hi).masked)
    low = 1e-1
    outlier = ((safe_exp(lr) < low) & (mask > 0)).any(-1, keepdims=True)
    want = unpad(np.broadcast_to(outlier, mask.shape), mask)
    assert np.array_equal(want, R.rule_seq_veto(delta, seq, tau=low).masked)
    tm = (safe_exp(lr) >= 0.5) & (safe_exp(lr) <= 2.0)
    assert np.array_equal(unpad(~tm, mask), R.rule_icepop(delta, seq, lo=0.5, hi=2.0).masked)


# --- the registry and bad input -----------------------------------------------------------


def test_defaults_are_the_issue_table() -> None:
    d = {n: dict(m.defaults) for n, m in R.METHODS.items()}
    assert d["tis-token"] == {"C": 2.0} and d["tis-seq"] == {"C": 5.0}
    assert d["icepop"] == {"lo": 0.5, "hi": 5.0} and d["icepop-narrow"] == {"lo": 0.5, "hi": 2.0}
    assert d["seq-mask-product"] == {"lo": 0.5, "hi": 2.0}
    assert d["seq-mask-geo"] == {"lo": 0.99, "hi": 1.01}
    assert d["seq-mask-k3"] == {"tau": 0.01} and d["seq-veto"] == {"tau": 1e-4}
    assert d["gspo-clip"] == {"lo": 1 - 3e-4, "hi": 1 + 4e-4}
    assert d["cispo"] == {"cap": 5.0} and d["nemo-seq-mult"] == {"tau": 1.5}
    assert d["dvp-minp"] == d["dvp-abs"] == {"rho": None} and d["none"] == {}


def test_parse_sets_and_methods() -> None:
    assert R.parse_sets(["icepop.lo=0.8,icepop.hi=3", "tis-token.C=4"]) == {
        "icepop": {"lo": 0.8, "hi": 3.0},
        "tis-token": {"C": 4.0},
    }
    assert R.check_methods(["icepop,none", "tis-token"]) == ["none", "tis-token", "icepop"]
    assert R.resolve_params("icepop", {"lo": 0.8}) == {"lo": 0.8, "hi": 5.0}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: R.check_methods(["tis"]), "unknown method 'tis'"),
        (lambda: R.check_methods([" , "]), "--method needs at least one"),
        (lambda: R.parse_sets(["icepop.lo"]), "is not NAME.KEY=VALUE"),
        (lambda: R.parse_sets(["icepop=3"]), "is not NAME.KEY=VALUE"),
        (lambda: R.parse_sets(["icepop.lo="]), "is not NAME.KEY=VALUE"),
        (lambda: R.parse_sets(["ice.lo=3"]), "unknown method 'ice'"),
        (lambda: R.parse_sets(["icepop.C=3"]), "icepop has no parameter 'C'"),
        (lambda: R.parse_sets(["none.C=3"]), "it has no parameters"),
        (lambda: R.parse_sets(["icepop.lo=abc"]), "'abc' is not a number"),
        (lambda: R.resolve_params("icepop", {"lo": 3.0, "hi": 2.0}), "icepop.lo (3) must be <="),
        (lambda: R.resolve_params("tis-token", {"C": 0.0}), "tis-token.C must be > 0"),
        (lambda: R.resolve_params("cispo", {"cap": -1.0}), "cispo.cap must be > 0"),
        (lambda: R.resolve_params("seq-veto", {"tau": 0.0}), "seq-veto.tau must be > 0"),
        (lambda: R.resolve_params("icepop", {"lo": -0.1}), "icepop.lo must be >= 0"),
        (lambda: R.resolve_params("tis-token", {"C": math.inf}), "must be > 0, got inf"),
        (lambda: R.resolve_params("dvp-minp", {"rho": 1.5}), "dvp-minp.rho must be in (0, 1)"),
    ],
)
def test_library_bad_input(call, message: str) -> None:
    with pytest.raises(MismatchError) as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value)


# --- runs: DVP from the sweep, advantage and step ------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_run(
        tmp_path_factory.mktemp("corr") / "run", num_sequences=48, eps=0.6, seed=3
    )


@pytest.fixture(scope="module")
def result(run_dir: Path) -> dict:
    return C.corrections(run_dir)


def test_result_keys_and_strict_json(result: dict) -> None:
    json.dumps(result, allow_nan=False)
    assert {"run", "methods", "pareto", "verdict"} <= set(result)
    assert [m["name"] for m in result["methods"]] == list(R.METHOD_NAMES)
    for m in result["methods"]:
        assert set(m) == ISSUE_KEYS | EXTRA_KEYS and list(m) == list(C.METHOD_KEYS)
        assert m["skipped"] is None
        for k in ("tokens_masked", "sequences_masked", "tokens_clipped", "removed_token_share"):
            assert 0 <= m[k] <= 1, (m["name"], k)
        assert m["by_step"] is None and m["removed_advantage_share"] is None
        assert (m["bias_bound"] is None) == (not m["name"].startswith("dvp"))
    assert result["pareto"] and set(result["pareto"]) <= set(R.METHOD_NAMES)


def test_dvp_rows_are_the_sweep(run_dir: Path, result: dict) -> None:
    rows = {m["name"]: m for m in result["methods"]}
    for name, rule in (("dvp-minp", "min-p"), ("dvp-abs", "absolute")):
        sweep = sw.sweep(run_dir, rule=rule)
        rec = sweep["recommended"]["rho"]
        assert rec is not None
        row = next(r for r in sweep["rows"] if r["rho"] == rec)
        m = rows[name]
        assert m["params"]["rho"] == rec and m["params"]["rho_from"] == "recommended"
        assert m["bias_bound"] == row["seq_bias_bound_mean"]
        assert m["tokens_masked"] == pytest.approx(row["pruned_token_frac"])
        assert m["left_k3"] == pytest.approx(row["kept_k3"])
        assert m["left_p99_abs_delta"] == pytest.approx(row["kept_p99_abs_delta"])
        curve = next(c for c in result["dvp_curves"] if c["name"] == name)
        assert [p["rho"] for p in curve["points"]] == [r["rho"] for r in sweep["rows"]]
        at = next(p for p in curve["points"] if p["rho"] == rec)
        assert at["removed_token_share"] == pytest.approx(m["removed_token_share"])
        assert at["left_k3"] == pytest.approx(m["left_k3"])


def test_rho_picks_the_dvp_threshold(run_dir: Path) -> None:
    res = C.corrections(run_dir, ["dvp-minp", "dvp-abs"], rho=0.01)
    row = next(r for r in sw.sweep(run_dir, rhos=[0.01])["rows"])
    m = res["methods"][0]
    assert m["params"] == {"rho": 0.01, "rho_from": "given"}
    assert m["tokens_masked"] == pytest.approx(row["pruned_token_frac"])
    res = C.corrections(run_dir, ["dvp-minp"], {"dvp-minp": {"rho": 0.001}}, rho=0.01)
    assert res["methods"][0]["params"]["rho"] == 0.001  # --set beats --rho
    with pytest.raises(MismatchError, match="not on the run's pruning grid"):
        C.corrections(run_dir, ["dvp-minp"], rho=3e-3)


def test_without_the_grid_dvp_rows_say_so(run_dir: Path, tmp_path: Path) -> None:
    tokens = pd.read_parquet(run_dir / "tokens.parquet")
    tokens = tokens.drop(columns=["pruned_mass_minp", "pruned_mass_abs"])
    seqs = pd.read_parquet(run_dir / "sequences.parquet")
    run = write_run(tmp_path / "nogrid", tokens, seqs, synthetic_meta())
    res = C.corrections(run)
    rows = {m["name"]: m for m in res["methods"]}
    for n in ("dvp-minp", "dvp-abs"):
        assert "without the pruning grid" in rows[n]["skipped"]
        assert rows[n]["tokens_masked"] is None
    assert rows["icepop"]["skipped"] is None and rows["icepop"]["left_k3"] is not None
    assert "dvp-minp" not in res["pareto"] and "Skipped: dvp-minp" in res["verdict"]
    json.dumps(res, allow_nan=False)


def test_advantage_and_step(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n_seq, T = 12, 10
    seq_id = np.repeat(np.arange(n_seq), T)
    step = seq_id // 4  # steps 0, 1, 2; the mismatch grows with the step
    delta = rng.normal(0, 0.2, n_seq * T) * (1 + step)
    adv = np.repeat(rng.normal(0, 1, n_seq), T)
    lt = np.log(rng.uniform(0.01, 1, delta.size))
    tokens = token_frame(
        {"seq_id": seq_id, "logp_infer": lt + delta, "logp_train": lt, "step": step,
         "advantage": adv}
    )  # fmt: skip
    seqs = pd.DataFrame({"seq_id": np.arange(n_seq)})
    run = write_run(tmp_path / "imported", tokens, seqs, synthetic_meta())
    res = C.corrections(run, ["none", "icepop-narrow", "seq-mask-geo"])
    assert res["has_advantage"] and res["has_step"]
    assert res["pareto_axes"]["x"] == "removed_advantage_share"
    df = pd.read_parquet(run / "tokens.parquet")
    r = np.exp(-df["delta"])
    masked = ~((r >= 0.5) & (r <= 2.0))
    m = next(x for x in res["methods"] if x["name"] == "icepop-narrow")
    a = df["advantage"].abs()
    assert m["removed_advantage_share"] == pytest.approx(a[masked].sum() / a.sum())
    by = masked.groupby(df["step"]).mean()
    assert [s["step"] for s in m["by_step"]] == [0, 1, 2]
    np.testing.assert_allclose([s["masked"] for s in m["by_step"]], by.to_numpy())
    gap = df["delta"].abs().groupby(df["step"]).mean()
    np.testing.assert_allclose([s["mean_abs_delta"] for s in res["steps"]], gap.to_numpy())
    assert all(len(x["by_step"]) == 3 for x in res["methods"])


def test_pareto_front() -> None:
    rows = [
        {"name": "a", "x": 0.0, "y": 3.0},
        {"name": "b", "x": 0.0, "y": 3.0},  # a tie stays
        {"name": "c", "x": 0.1, "y": 2.0},
        {"name": "d", "x": 0.2, "y": 2.5},  # beaten by c
        {"name": "e", "x": 0.5, "y": 1.0},
        {"name": "f", "x": None, "y": 0.1},  # skipped
    ]
    assert C.pareto(rows, "x", "y") == ["a", "b", "c", "e"]


def test_infinite_tokens_masked_everywhere() -> None:
    res = C.corrections(table(HAND), grid=(0.01, 0.2))
    assert res["num_infinite"] == 1
    for m in res["methods"]:
        if m["skipped"] is None:
            assert m["tokens_masked"] >= 1 / 8, m["name"]
            if m["level"] == "sequence":
                assert m["tokens_masked"] >= 2 / 8, m["name"]  # the whole of seq 2


def test_figure_draws_the_result(run_dir: Path, result: dict) -> None:
    from mismatch_cli import plots as P

    runs = P.load_runs([run_dir])
    fig = P.figure("corrections", runs)
    label = runs[0].label
    for m in result["methods"]:
        y = P.plotted(fig, f"left_k3-{m['name']}:{label}")
        if m["left_k3"] is None:  # it masks every token: named in the panel instead
            assert y is None and any(m["name"] in t.get_text() for t in fig.axes[0].texts)
        else:
            assert y is not None and y[0] == pytest.approx(m["left_k3"])
    for c in result["dvp_curves"]:
        y = P.plotted(fig, f"dvp-left_k3-{c['name']}:{label}")
        np.testing.assert_allclose(y, [p["left_k3"] for p in c["points"]])
    front = P.plotted(fig, f"pareto-left_k3:{label}")
    assert front is not None and len(front) == len(result["pareto"])
    heat = next(im for ax in fig.axes for im in ax.images if im.get_gid() == f"bites:{label}")
    assert heat.get_array().shape == (len(R.METHOD_NAMES), len(result["edges"]) - 1)
    P.plt.close(fig)


# --- the CLI ------------------------------------------------------------------------------


def test_cli_table(run_dir: Path) -> None:
    proc = cli_in_process("corrections", str(run_dir), check=True)
    assert "Pareto front" in proc.stdout and "verdict" in proc.stdout
    for n in R.METHOD_NAMES:
        assert n in proc.stdout


def test_cli_json_csv_method_set(run_dir: Path, tmp_path: Path) -> None:
    csv = tmp_path / "rows.csv"
    proc = cli_in_process(
        "corrections", str(run_dir), "--json", "--csv", str(csv), "--method", "icepop,none",
        "--method", "dvp-minp", "--set", "icepop.lo=0.8", "--rho", "0.001",
        "--edges", "0,0.01,1", check=True,
    )  # fmt: skip
    res = json.loads(proc.stdout)
    assert set(res) >= {"run", "methods", "pareto", "verdict"}
    assert [m["name"] for m in res["methods"]] == ["none", "icepop", "dvp-minp"]
    assert all(set(m) == ISSUE_KEYS | EXTRA_KEYS for m in res["methods"])
    assert res["methods"][1]["params"] == {"lo": 0.8, "hi": 5.0}
    assert res["methods"][2]["params"]["rho"] == 0.001
    assert len(res["methods"][0]["by_bucket"]) == 2
    df = pd.read_csv(csv)
    assert list(df["name"]) == ["none", "icepop", "dvp-minp"]
    assert df.loc[1, "params"] == "lo=0.8;hi=5"
    assert df["pareto"].tolist() == [m["name"] in res["pareto"] for m in res["methods"]]
    assert df.loc[1, "left_k3"] == pytest.approx(res["methods"][1]["left_k3"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "tis"], "unknown method 'tis'"),
        (["--set", "icepop.lo"], "is not NAME.KEY=VALUE"),
        (["--set", "icepop.tau=3"], "icepop has no parameter 'tau'"),
        (["--set", "icepop.lo=x"], "is not a number"),
        (["--set", "icepop.lo=3", "--set", "icepop.hi=2"], "icepop.lo (3) must be <="),
        (["--set", "tis-token.C=0"], "tis-token.C must be > 0"),
        (["--set", "seq-mask-k3.tau=-1"], "seq-mask-k3.tau must be > 0"),
        (["--method", "none", "--set", "icepop.lo=0.2"], "--method does not select"),
        (["--rho", "2"], "--rho must be in (0, 1)"),
        (["--rho", "3e-3"], "not on the run's pruning grid"),
        (["--edges", "1,0"], "--edges"),
        (["--csv", "/nonexistent-dir/x.csv"], "cannot write"),
    ],
)
def test_cli_bad_input(run_dir: Path, args: list[str], message: str) -> None:
    assert_one_line_error(cli_in_process("corrections", str(run_dir), *args), message)


def test_cli_missing_run(tmp_path: Path) -> None:
    assert_one_line_error(cli_in_process("corrections", str(tmp_path / "nope")), "not found")


def _decision_input(points: dict[str, tuple[float, float]], x: str = "removed_token_share"):
    """A corrections result reduced to what `decide` reads: (removed, k3 left) per method."""
    methods = [
        {"name": n, "params": {"lo": 0.5, "hi": 2.0} if n == "icepop" else {}, x: a, "left_k3": b}
        for n, (a, b) in points.items()
    ]
    res = {"methods": methods, "pareto_axes": {"x": x}, "all_tokens": {"k3": points["none"][1]}}
    res["pareto"] = C.pareto(methods, x)
    return res


def test_decision_takes_the_best_method_within_the_budget() -> None:
    res = _decision_input(
        {"none": (0.0, 1e-3), "icepop": (0.005, 5e-4), "seq-mask-geo": (0.2, 1e-4)}
    )
    d = C.decide(res)
    assert d["method"] == "icepop" and d["gain"] == pytest.approx(0.5)
    assert d["removed"] == 0.005 and "0.50x none" in d["reason"]
    # a tighter budget leaves nothing that qualifies: no correction, and the reason says
    # what the cheapest improvement beyond the budget would cost
    d = C.decide(res, budget=0.001)
    assert d["method"] == "none"
    assert (
        "no method removing at most 0.1%" in d["reason"] and "icepop, removes 0.5%" in d["reason"]
    )


def test_decision_is_none_when_the_gain_within_budget_is_too_small() -> None:
    """The demo's picture: DVP removes 0.07% for a 1% cut, sequence masks remove 5.6% and
    more for a few percent: no correction, said with the numbers."""
    res = _decision_input(
        {"none": (0.0, 1.06e-3), "dvp-minp": (7e-4, 1.05e-3), "seq-mask-geo": (0.0556, 1.03e-3)}
    )
    d = C.decide(res)
    assert d["method"] == "none" and d["gain"] == 0.0
    assert "dvp-minp" in d["reason"] and "seq-mask-geo, removes 5.56%" in d["reason"]
    assert (
        C.decide(_decision_input({"none": (0.0, 0.0), "icepop": (0.001, 0.0)}))["method"] == "none"
    )


def test_decision_reads_the_advantage_axis_and_leads_the_verdict(result: dict) -> None:
    res = _decision_input(
        {"none": (0.0, 1e-3), "icepop": (0.004, 2e-4)}, x="removed_advantage_share"
    )
    d = C.decide(res)
    assert d["method"] == "icepop" and "advantage-weighted signal" in d["reason"]
    assert result["verdict"].startswith("Decision: ")
    assert result["decision"] == C.decide(result)
    assert result["decision"]["method"] in [m["name"] for m in result["methods"]]


def test_the_corrections_pass_holds_the_sweep(run_dir: Path) -> None:
    """`plot` draws the sweep figure from the corrections' second pass when it draws both:
    that pass's min-p accumulator gives exactly `sweep.sweep` of the run."""
    sweeps: dict = {}
    C.corrections(run_dir, sweeps_out=sweeps)
    assert set(sweeps) == {"min-p", "absolute"}
    assert sweeps["min-p"].result(run=str(run_dir)) == sw.sweep(run_dir)
    assert sweeps["absolute"].result(run=str(run_dir)) == sw.sweep(run_dir, rule="absolute")
