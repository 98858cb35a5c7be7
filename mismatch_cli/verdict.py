"""The verdicts in plain words: the report's paragraph (`verdict`, from an analyze() result)
and the short findings a run ends with (`findings`: the (1 - p) shape, the tail's share and
sign, the recommended threshold and the correction to use).

Nothing here computes a statistic; every number comes from the result dicts and is
formatted by `formatting`.
"""

from __future__ import annotations

import math
from typing import Any

from .formatting import bucket_label, edge, fmt, pct, ratio_x


def verdict(result: dict[str, Any]) -> str:
    """The plain-words paragraph: the bound, the tail, the accumulation, the RL metrics."""
    parts: list[str] = []
    n, ni = result["num_tokens"], result["num_infinite"]
    if ni:
        parts.append(
            f"{ni} of {n} tokens ({pct(ni / n)}) have an infinite delta (a token one side's "
            "truncation prunes) and are left out of every statistic below."
        )
    env, eps = result["envelope"], result["eps"]
    side = "p_train" if result["by"] == "train" else "p_infer"
    if eps is not None and math.isfinite(eps):
        hold = 1 - env["exact"]["frac_above"] if env["exact"]["frac_above"] is not None else None
        hold1 = (
            1 - env["first_order"]["frac_above"]
            if env["first_order"]["frac_above"] is not None
            else None
        )
        parts.append(
            f"The exact (1 - p) bound holds for {pct(hold)} of tokens with eps = {fmt(eps)} "
            f"({result['eps_estimator']}), the first-order 2 eps (1 - p) envelope for "
            f"{pct(hold1)}; covering 99% of tokens would need "
            f"eps = {fmt(result['eps_needed_q99'])}."
        )
    fit = result["fit"]
    parts.append(
        f"|delta| against (1 - p) through the origin: slope {fmt(fit['slope'])} nats, "
        f"R^2 = {fmt(fit['r2'])}."
    )
    tl = result["tail"]
    if tl["n"]:
        z = tl["z"]
        if z is None or not math.isfinite(z):
            sig = "too few tokens for a standard error"
        elif abs(z) < 2:
            sig = f"{abs(z):.1f} standard errors from zero: not distinguishable from zero"
        else:
            sig = f"{abs(z):.1f} standard errors {'above' if z > 0 else 'below'} zero"
        parts.append(
            f"Tokens with {side} < {tl['threshold']:g} are {pct(tl['token_share'])} of tokens "
            f"but carry {pct(tl['abs_delta_share'])} of total |delta|; their signed mean is "
            f"{fmt(tl['mean_delta'], sign=True)} nats ({sig}), against "
            f"{fmt(tl['head']['mean_delta'], sign=True)} for the other tokens."
        )
    else:
        parts.append(f"No token has {side} < {tl['threshold']:g}.")
    acc = result["accumulation"]
    vl, vx = acc["vs_length"], acc["vs_sum_one_minus_p"]
    if acc["num_sequences"] > 1 and vl["slope"] is not None:
        parts.append(
            f"Per sequence, sum delta drifts by {fmt(vl['slope'], sign=True)} nats per token "
            f"(correlation with length {fmt(vl['corr'])}, with sum (1 - p) {fmt(vx['corr'])})."
        )
    m = result["metrics"]
    parts.append(
        f"RL metrics: k3 = {fmt(m['k3'])}, mean |delta| = {fmt(m['mean_abs_delta'])} "
        f"(slime fails CI above 0.1), mean |delta p| = {fmt(m['mean_abs_dp'])} (verl: below "
        f"0.005 normal, above 0.01 suspicious); {pct(m['frac_token_above_cap_2'])} of tokens "
        f"and {pct(m['frac_seq_above_cap_2'])} of sequences have an importance ratio above 2."
    )
    return " ".join(parts)


def _significance(z: float | None) -> str:
    if z is None or not math.isfinite(z):
        return "too few tokens to tell its sign"
    if abs(z) < 2:
        return f"not resolved in this run ({abs(z):.1f} standard errors from zero)"
    return f"{abs(z):.1f} standard errors {'above' if z > 0 else 'below'} zero"


def findings(
    report: dict[str, Any],
    sweep: dict[str, Any] | None = None,
    corrections: dict[str, Any] | None = None,
) -> list[str]:
    """The findings that matter, one sentence each, from the results of `report`,
    `sweep-threshold` and `corrections` on one run: (1) the (1 - p) shape (mean |delta| of
    the least and the most confident non-empty buckets, the share under the exact envelope),
    (2) the tail's share of |delta| and its sign, (3) the recommended rho and its cost, and
    the correction to use (the corrections decision)."""
    out: list[str] = []
    side = "p_train" if report["by"] == "train" else "p_infer"
    b = [r for r in report["buckets"] if r["count"] and r["mean_abs_delta"] is not None]
    if len(b) >= 2:
        lo, hi = b[0], b[-1]
        ratio = lo["mean_abs_delta"] / hi["mean_abs_delta"] if hi["mean_abs_delta"] else None
        shape = (
            f"{ratio:,.0f}x"
            if ratio is not None and ratio >= 10
            else (f"{ratio:.2g}x" if ratio is not None else "infinitely")
        )
        held = report["envelope"]["exact"]["frac_above"]
        env = (
            f"; {pct(1 - held)} of tokens lie under the exact envelope at eps = "
            f"{fmt(report['eps'])}"
            if held is not None
            else ""
        )
        out.append(
            f"The (1 - p) shape: mean |delta| is {fmt(lo['mean_abs_delta'])} nats for "
            f"{side} in {bucket_label(lo['lo'], lo['hi'], False)} and "
            f"{fmt(hi['mean_abs_delta'])} in {bucket_label(hi['lo'], hi['hi'], hi['hi'] == 1)}, "
            f"{shape} smaller where the model is confident{env}."
        )
    tl = report["tail"]
    if tl["n"]:
        out.append(
            f"The tail: tokens with {side} < {tl['threshold']:g} are {pct(tl['token_share'])} "
            f"of the tokens and carry {pct(tl['abs_delta_share'])} of the total |delta|; their "
            f"signed mean delta is {fmt(tl['mean_delta'], sign=True)} nats, "
            f"{_significance(tl['z'])}."
        )
    if sweep is not None:
        rec = sweep["recommended"]
        rho = rec["rho"]
        row = next((r for r in sweep["rows"] if r["rho"] == rho), None) if rho is not None else None
        if row is not None:
            out.append(
                f"Pruning: the recommended rho = {edge(rho)} ({sweep['rule']}) removes "
                f"{pct(row['pruned_token_frac'])} of the sampled tokens at a mean per-sequence "
                f"bias bound of {fmt(row['seq_bias_bound_mean'])} (budget "
                f"{fmt(sweep['max_bias'])}) and leaves kept mean |delta| at "
                f"{ratio_x(row['kept_mean_abs_delta_rel'])} of no pruning."
            )
        else:
            out.append(f"Pruning: no rho recommended ({rec['reason']}).")
    if corrections is not None and corrections.get("decision"):
        d = corrections["decision"]
        what = "no correction" if d["method"] == "none" else d["method"]
        out.append(f"Correction: {what}; {d['reason']}.")
    return out
