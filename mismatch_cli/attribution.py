"""Which side to fix: each side's error against a precise reference, on the same tokens.

A run R scores its rollouts twice (logp_infer, logp_train); a reference run over the same
rollouts scores them once more, precisely (transformers float32, eager attention, one
sequence per pass: `diagnose` builds it; any run can serve in `compare --reference`). Per
token, with ref = the reference's logp_train:

    e_infer = logp_infer(R) - ref        e_train = logp_train(R) - ref
    delta   = logp_infer(R) - logp_train(R) = e_infer - e_train   (the gap; schema's sign)

so rms(delta)^2 = rms(e_infer)^2 + rms(e_train)^2 - 2 mean(e_infer e_train). When the two
sides' errors are independent (and centred) the cross term vanishes and the gap is their
quadrature sum, `gap_predicted_rms` = sqrt(rms(e_infer)^2 + rms(e_train)^2); the measured
`gap_rms` beside it, and the correlation `err_corr` (Pearson), say how far that holds.
Fixing one side alone (its error -> 0) leaves the other side's error: rms(e_train) if the
inference side is fixed, rms(e_infer) if the training side is. A side's `share` is its part
of the predicted gap's square. Buckets are by the REFERENCE's probability of the token
(its p_train), so every run is bucketed alike.

Tokens count where all three log-probs are finite (a token a side's replayed truncation
prunes is -inf there: it is counted in `num_not_finite`, not in the errors). Streamed
(`pairing.pair_runs`): any run size, bounded memory. No torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .aggregates import DEFAULT_EDGES, bucket_index, parse_edges
from .pairing import PairCounts, pair_runs
from .quantiles import QuantileAccumulator
from .results import json_ready
from .tokens import BATCH_ROWS

SIDE_NAMES = ("infer", "train")
_COLUMNS = ["seq_id", "pos", "token_id", "logp_infer", "logp_train", "p_train"]
# |err_corr| below this: the two sides' errors are called independent in the verdict.
INDEPENDENT_CORR = 0.1
# A side whose share of the predicted gap's square is at least this dominates.
DOMINANT_SHARE = 0.75
_STATS = ("n", "s_i", "s_t", "ss_i", "ss_t", "sa_i", "sa_t", "s_it", "ss_g")


class SideErrors(PairCounts):
    """`side_errors`' streamed sums over matched rows (a = the reference, b = the run):
    counts, sums, sums of squares and of |.| of each side's error, their cross product,
    the gap's square, all also per bucket of the reference's p; |e| quantiles per side."""

    def __init__(self, edges: np.ndarray) -> None:
        super().__init__()
        self.edges = edges
        nb = len(edges) - 1
        self.num_not_finite = 0
        self.tot = dict.fromkeys(_STATS, 0.0)
        self.buckets = {k: np.zeros(nb) for k in _STATS}
        self.abs_q = {s: QuantileAccumulator() for s in SIDE_NAMES}

    def add(self, a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
        """Matched rows: the reference's columns `a`, the run's `b`, row for row."""
        n = self.count(a, b)
        if not n:
            return
        ref = np.asarray(a["logp_train"], dtype=np.float64)
        li = np.asarray(b["logp_infer"], dtype=np.float64)
        lt = np.asarray(b["logp_train"], dtype=np.float64)
        ok = np.isfinite(ref) & np.isfinite(li) & np.isfinite(lt)
        self.num_not_finite += int(n - np.count_nonzero(ok))
        ei, et = li[ok] - ref[ok], lt[ok] - ref[ok]  # [n'] each side's error
        g = li[ok] - lt[ok]  # [n'] the gap (delta), computed as the run stores it
        terms = {
            "n": np.ones_like(ei), "s_i": ei, "s_t": et, "ss_i": ei * ei, "ss_t": et * et,
            "sa_i": np.abs(ei), "sa_t": np.abs(et), "s_it": ei * et, "ss_g": g * g,
        }  # fmt: skip
        idx = bucket_index(np.asarray(a["p_train"], dtype=np.float64)[ok], self.edges)
        inb = idx >= 0
        nb = len(self.edges) - 1
        for k, v in terms.items():
            self.tot[k] += float(v.sum())
            self.buckets[k] += np.bincount(idx[inb], weights=v[inb], minlength=nb)
        self.abs_q["infer"].add(terms["sa_i"])
        self.abs_q["train"].add(terms["sa_t"])

    def result(self) -> dict[str, Any]:
        """The per-side statistics, the law's terms and the bucket table."""
        out: dict[str, Any] = {"num_tokens": int(self.tot["n"]),
                               "num_not_finite": self.num_not_finite}  # fmt: skip
        out.update(_law(self.tot))
        for side in SIDE_NAMES:
            out[side]["p99_abs"] = float(self.abs_q[side].quantile(0.99)[0, 0])
        rows = []
        for j in range(len(self.edges) - 1):
            r = _law({k: float(v[j]) for k, v in self.buckets.items()})
            rows.append(
                {
                    "lo": float(self.edges[j]),
                    "hi": float(self.edges[j + 1]),
                    "count": int(self.buckets["n"][j]),
                    **{f"{k}_{s}": r[s][k] for s in SIDE_NAMES for k in ("rms", "mean")},
                    "err_corr": r["err_corr"],
                    "gap_rms": r["gap_rms"],
                    "gap_predicted_rms": r["gap_predicted_rms"],
                }
            )
        out["buckets"] = pd.DataFrame(rows)
        return out


def _law(t: dict[str, float]) -> dict[str, Any]:
    """From the sums: each side's rms, mean |.|, signed mean; the correlation; the measured
    and the predicted gap; the shares; what fixing one side alone leaves (NaN if empty)."""
    n = t["n"]
    nan = math.nan
    side: dict[str, dict[str, float]] = {}
    for s, k in (("infer", "i"), ("train", "t")):
        side[s] = {
            "rms": math.sqrt(t[f"ss_{k}"] / n) if n else nan,
            "mean_abs": t[f"sa_{k}"] / n if n else nan,
            "mean": t[f"s_{k}"] / n if n else nan,
        }
    corr = nan
    if n:
        mi, mt = t["s_i"] / n, t["s_t"] / n
        vi, vt = t["ss_i"] / n - mi * mi, t["ss_t"] / n - mt * mt
        if vi > 0 and vt > 0:
            corr = max(-1.0, min(1.0, (t["s_it"] / n - mi * mt) / math.sqrt(vi * vt)))
    ri, rt = side["infer"]["rms"], side["train"]["rms"]
    pred = math.hypot(ri, rt) if n else nan
    both = ri * ri + rt * rt if n else nan
    return {
        **side,
        "err_corr": corr,
        "gap_rms": math.sqrt(t["ss_g"] / n) if n else nan,
        "gap_predicted_rms": pred,
        "share_infer": ri * ri / both if n and both > 0 else nan,
        "share_train": rt * rt / both if n and both > 0 else nan,
        "gap_if_infer_fixed": rt,
        "gap_if_train_fixed": ri,
    }


def side_errors(
    reference: str | Path,
    run: str | Path,
    edges: Sequence[float] | str | None = DEFAULT_EDGES,
    *,
    batch_rows: int = BATCH_ROWS,
) -> dict[str, Any]:
    """Each side of `run` against the reference run's logp_train, over the tokens they share
    (matched on (seq_id, pos); the same token at each: otherwise `shared` is False with the
    reason). Keys: infer / train (rms, mean_abs, mean, p99_abs of each side's error, nats),
    err_corr, gap_rms, gap_predicted_rms, share_infer / share_train, gap_if_infer_fixed /
    gap_if_train_fixed, buckets (by the reference's p_train), num_tokens, num_not_finite."""
    e = parse_edges(edges)
    acc = pair_runs(
        reference, run, _COLUMNS, lambda: SideErrors(e), batch_rows=batch_rows, verb="compare"
    )
    base: dict[str, Any] = {"reference": str(reference), "run": str(run),
                            "num_common": acc.num_common}  # fmt: skip
    if (why := acc.unshared()) is not None:
        return {**base, "shared": False, "reason": why}
    return json_ready({**base, "shared": True, "reason": None, **acc.result()})


def attribution_row(name: str, errs: dict[str, Any]) -> dict[str, Any]:
    """One row of the headline table (diagnose's `attribution`, compare's): the flat keys,
    and `buckets` (by the reference's p: count, rms and signed mean of each side's error,
    err_corr, gap_rms, gap_predicted_rms)."""
    if not errs.get("shared"):
        return {"name": name, "shared": False, "reason": errs.get("reason")}
    return {
        "name": name,
        "shared": True,
        "num_tokens": errs["num_tokens"],
        "err_infer_rms": errs["infer"]["rms"],
        "err_train_rms": errs["train"]["rms"],
        "err_infer_mean": errs["infer"]["mean"],
        "err_train_mean": errs["train"]["mean"],
        "err_infer_mean_abs": errs["infer"]["mean_abs"],
        "err_train_mean_abs": errs["train"]["mean_abs"],
        "err_infer_p99": errs["infer"]["p99_abs"],
        "err_train_p99": errs["train"]["p99_abs"],
        "err_corr": errs["err_corr"],
        "gap_rms": errs["gap_rms"],
        "gap_predicted_rms": errs["gap_predicted_rms"],
        "share_infer": errs["share_infer"],
        "share_train": errs["share_train"],
        "dominant": dominant_side(errs["share_infer"]),
        "buckets": errs["buckets"],
    }


def dominant_side(share_infer: float | None) -> str | None:
    """'inference', 'training', 'both' (neither side holds DOMINANT_SHARE of the predicted
    gap's square) or None (no error on either side)."""
    if share_infer is None or not math.isfinite(share_infer):
        return None
    if share_infer >= DOMINANT_SHARE:
        return "inference"
    if share_infer <= 1 - DOMINANT_SHARE:
        return "training"
    return "both"


def attribution_verdict(row: dict[str, Any], what: str = "the run") -> str:
    """Plain words for one row: which side dominates, whether the errors are independent,
    and what fixing each side alone would leave (from the measured per-side errors)."""
    from .formatting import fmt, pct

    if not row.get("shared"):
        return f"No attribution for {what}: {row.get('reason')}."
    ri, rt, g = row["err_infer_rms"], row["err_train_rms"], row["gap_rms"]
    if not (ri or rt):
        return (
            f"Against the reference, both sides of {what} are exact on its "
            f"{row['num_tokens']:,} tokens: there is no error to attribute."
        )
    dom = row["dominant"]
    lead = {
        "inference": "the inference side dominates",
        "training": "the training side dominates",
        "both": "both sides contribute",
    }[dom]
    parts = [
        f"Against the precise reference, {what}'s inference side errs by {fmt(ri)} nats rms "
        f"and its training side by {fmt(rt)}: {lead} ({pct(row['share_infer'])} of the "
        f"predicted gap's square is the inference side's)."
    ]
    c = row["err_corr"]
    pred = row["gap_predicted_rms"]
    if c is None or not math.isfinite(c):
        parts.append(
            f"One side's error is constant, so their correlation is undefined; the gap is "
            f"{fmt(g)} nats rms."
        )
    elif abs(c) < INDEPENDENT_CORR:
        parts.append(
            f"The two errors are independent (correlation {c:.2f}): the gap is their "
            f"quadrature sum, predicted {fmt(pred)} vs measured {fmt(g)} nats rms."
        )
    else:
        how = "partly cancel in" if c > 0 else "add up in"
        parts.append(
            f"The two errors are correlated ({c:.2f}): they {how} the gap, measured {fmt(g)} "
            f"nats rms against {fmt(pred)} if they were independent."
        )
    if g:
        parts.append(
            f"Fixing the inference side alone would leave {fmt(rt)} nats rms "
            f"({pct(rt / g)} of the gap); fixing the training side alone, {fmt(ri)} "
            f"({pct(ri / g)})."
        )
    return " ".join(parts)


__all__ = [
    "DOMINANT_SHARE",
    "INDEPENDENT_CORR",
    "SideErrors",
    "attribution_row",
    "attribution_verdict",
    "dominant_side",
    "side_errors",
]
